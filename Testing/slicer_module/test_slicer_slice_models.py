"""Issue 16, part 2, in the Slicer logic: the slice axis of a 2D model reaches the engine from the parameters."""

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

SPEC2D = "toy_models:unet2d"


@pytest.fixture()
def case(tmp_path):
    slicer_fixtures.clear_scene()
    torch.manual_seed(2)
    weights = str(tmp_path / "unet2d.pt")
    torch.save(toy_models.unet2d().state_dict(), weights)
    image = np.random.RandomState(0).randn(14, 22, 18).astype(np.float32)
    volume = slicer.util.addVolumeFromArray(image, IJK_TO_RAS, name="oblique")
    segmentation, segmentId = selftest.sphereSegmentOnOtherGrid(volume, radiusMm=7.0, spacingMm=1.9, angleDeg=35)
    return {"volume": volume, "image": image, "segmentation": segmentation, "segmentId": segmentId,
            "weights": weights}


def test_slice_axis_of_the_parameters_reaches_the_engine(case):
    logic = SegHiResCAM.SegHiResCAMLogic()
    p = logic.getParameterNode()
    assert p.sliceAxis == "auto"
    p.inputVolume, p.modelSource, p.modelPath = case["volume"], "file", "/unused"
    p.targetKind, p.segmentationNode, p.segmentId = "segment", case["segmentation"], case["segmentId"]
    p.sliceAxis = "coronal"
    logic.modelSpec = lambda parameters: SPEC2D  # a factory spec (the panel offers files and folders)
    request = logic.prepareFromParameters(p)
    request.weights, request.layer = case["weights"], "dec"
    assert request.sliceAxis == "coronal"
    result = logic.compute(request)
    assert result.metadata["slices"]["axis"] == "coronal"
    volume = case["volume"]
    mask = mrml.segment_mask(case["segmentation"], case["segmentId"], volume)
    model = load_model(SPEC2D, weights=case["weights"])
    expected = {axis: explain_image(model, case["image"], mrml.volume_geometry(volume), [TargetSpec(1, mask=mask)],
                                    layers="dec", slice_axis=axis).heatmaps[0].array for axis in ("coronal", "axial")}
    np.testing.assert_allclose(result.heatmap, np.clip(expected["coronal"], 0, 1), atol=1e-6)
    assert np.abs(expected["coronal"] - expected["axial"]).max() > 0.05
    heatmap = logic.process(volume, model=SPEC2D, weights=case["weights"], segmentationNode=case["segmentation"],
                            segmentId=case["segmentId"], layer="dec", sliceAxis="axial")
    np.testing.assert_allclose(slicer.util.arrayFromVolume(heatmap), np.clip(expected["axial"], 0, 1), atol=1e-6)
    np.testing.assert_array_equal(mrml.ijk_to_ras(heatmap), mrml.ijk_to_ras(volume))
    with pytest.raises(InputError, match="sliceAxis must be one of"):
        logic.process(volume, model=SPEC2D, weights=case["weights"], sliceAxis="oblique")
    with pytest.raises(ValueError):
        p.sliceAxis = "oblique"


def test_evaluate_and_sa_score_of_the_panel_take_the_slice_axis_of_the_parameters(case):
    """The panel's Evaluate and SA buttons (prepareAnalysisFromParameters -> computeAnalysis, in this process and
    in the worker process) run a 2D model along the parameter node's sliceAxis: the results equal the Python calls
    with that axis, and differ from the default axial ones."""
    from SegHiResCAMLib.analysis.evaluate import evaluate_image
    from SegHiResCAMLib.analysis.segmentation_ability import sa_score_image
    from SegHiResCAMLib.slicer_logic import job as slicer_job
    logic = SegHiResCAM.SegHiResCAMLogic()
    p = logic.getParameterNode()
    p.inputVolume, p.modelSource, p.modelPath = case["volume"], "file", "/unused"
    p.targetKind, p.segmentationNode, p.segmentId = "segment", case["segmentation"], case["segmentId"]
    p.sliceAxis, p.evaluateSteps, p.layer = "coronal", 2, "dec"
    logic.modelSpec = lambda parameters: SPEC2D
    volume = case["volume"]
    geometry = mrml.volume_geometry(volume)
    mask = mrml.segment_mask(case["segmentation"], case["segmentId"], volume)
    model = load_model(SPEC2D, weights=case["weights"])
    requests = {}
    for kind in ("evaluation", "segmentation-ability"):
        requests[kind] = logic.prepareAnalysisFromParameters(p, kind)
        requests[kind].explain.weights = case["weights"]
        assert requests[kind].explain.sliceAxis == "coronal"
    evaluation = logic.computeAnalysis(requests["evaluation"])
    expected = {axis: evaluate_image(model, case["image"], geometry, TargetSpec(1, mask=mask), methods=[p.method],
                                     layers="dec", steps=2, slice_axis=axis) for axis in ("coronal", "axial")}
    assert evaluation.metadata["slices"]["axis"] == "coronal"
    np.testing.assert_equal(evaluation.table(), expected["coronal"].table())  # NaN (n/a) cells equal too
    with pytest.raises(AssertionError):
        np.testing.assert_equal(expected["axial"].table(), expected["coronal"].table())
    sa = {axis: sa_score_image(model, case["image"], geometry, reference=mask, class_index=1, layers="all",
                               map_layer="dec", slice_axis=axis) for axis in ("coronal", "axial")}
    assert sa["coronal"].mean_sa != pytest.approx(sa["axial"].mean_sa, abs=1e-6)
    runner = slicer_job.ProcessRunner()  # the panel's worker process gets the same request (pickled)
    try:
        status = runner.submit("computeAnalysis", requests["segmentation-ability"]).wait(120)
    finally:
        runner.close()
    assert status.finished and status.error is None, status.error
    assert status.result.mean_sa == pytest.approx(sa["coronal"].mean_sa, abs=1e-9)
    np.testing.assert_array_equal(status.result.sa_map, sa["coronal"].sa_map)
