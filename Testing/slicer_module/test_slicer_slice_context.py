"""The panel's slice context (a 2.5D model on a 3D scan) reaches the engine from the parameter node."""

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

import slicer_fixtures
import slicer_standalone
import toy_models
from slicer_fixtures import IJK_TO_RAS

slicer = slicer_standalone.setup()

import SegHiResCAM  # noqa: E402  (needs the stand-ins above)
from SegHiResCAMLib.analysis.explain import TargetSpec, explain_image  # noqa: E402
from SegHiResCAMLib.errors import InputError  # noqa: E402
from SegHiResCAMLib.models import load_model  # noqa: E402
from SegHiResCAMLib.slicer_logic import bridge as mrml  # noqa: E402
from SegHiResCAMLib.slicer_logic import selftest  # noqa: E402

UI = Path(__file__).resolve().parents[2] / "SegHiResCAM" / "Resources" / "UI" / "SegHiResCAM.ui"


def test_the_panel_has_a_slice_context_spin_box_bound_to_the_parameter():
    widgets = {w.get("name"): w for w in ET.parse(str(UI)).iter("widget")}
    box = widgets["sliceContextSpinBox"]
    assert box.get("class") == "QSpinBox"
    bound = [p.find("string").text for p in box.iter("property") if p.get("name") == "SlicerParameterName"]
    assert bound == ["sliceContext"]


def test_slice_context_of_the_parameters_reaches_the_engine(tmp_path):
    slicer_fixtures.clear_scene()
    torch.manual_seed(2)
    weights = str(tmp_path / "unet2d3.pt")
    torch.save(toy_models.unet2d(in_channels=3).state_dict(), weights)
    image = np.random.RandomState(0).randn(10, 14, 12).astype(np.float32)
    volume = slicer.util.addVolumeFromArray(image, IJK_TO_RAS, name="scan")
    segmentation, segmentId = selftest.sphereSegmentOnOtherGrid(volume, radiusMm=7.0, spacingMm=1.9, angleDeg=35)
    logic = SegHiResCAM.SegHiResCAMLogic()
    p = logic.getParameterNode()
    assert p.sliceContext == 0
    p.inputVolume, p.modelSource, p.modelPath = volume, "file", "/unused"
    p.targetKind, p.segmentationNode, p.segmentId = "segment", segmentation, segmentId
    p.sliceContext = 1
    spec = "toy_models:unet2d"
    logic.modelSpec = lambda parameters: spec
    request = logic.prepareFromParameters(p)
    request.weights, request.layer = weights, "dec"
    request.model = load_model(spec, weights=weights, model_args={"in_channels": 3})
    assert request.sliceContext == 1
    result = logic.compute(request)
    assert result.metadata["slices"]["context"] == 1
    mask = mrml.segment_mask(segmentation, segmentId, volume)
    expected = explain_image(request.model, image, mrml.volume_geometry(volume), [TargetSpec(1, mask=mask)],
                             layers="dec", slice_context=1).heatmaps[0].array
    np.testing.assert_allclose(result.heatmap, np.clip(expected, 0, 1), atol=1e-6)
    assert expected.max() > 0
    with pytest.raises(InputError, match="slice context 1"):  # without the context the 3-channel model fails
        logic.process(volume, model=request.model, segmentationNode=segmentation, segmentId=segmentId, layer="dec")
    with pytest.raises(InputError, match="sliceContext must be a number of slices >= 0"):
        logic.process(volume, model=request.model, sliceContext=-1)
    with pytest.raises(ValueError):
        p.sliceContext = -1
