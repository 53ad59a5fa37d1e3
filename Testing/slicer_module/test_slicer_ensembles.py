"""Ensembles from the module panel (issue 18, section 3): several weights files of the chosen model, and every fold
of an nnU-Net model folder. The heatmap is the mean map of ``seghirescam explain --weights A --weights B`` (and of
``--model-args '{"fold": "auto"}'``), the spread map a second volume, the agreement in the summary line; bad input
gives one error and adds nothing. The panel runs on the stand-in widgets of the real .ui (``slicer_standalone``),
with the real logic, scene and models; one test goes through the real worker process.
"""

import json
import os
import types

import numpy as np
import pytest
import torch

import slicer_fixtures
import slicer_standalone
import toy_models
from slicer_fixtures import SPEC, node_ids

slicer = slicer_standalone.setup()

import SegHiResCAM  # noqa: E402
from SegHiResCAMLib.cli import main  # noqa: E402
from SegHiResCAMLib.errors import InputError  # noqa: E402
from SegHiResCAMLib.imaging import files as io  # noqa: E402
from SegHiResCAMLib.slicer_logic import bridge as mrml  # noqa: E402
from SegHiResCAMLib.slicer_logic import job as slicer_job  # noqa: E402

SHAPE = (10, 16, 12)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Two weights files of the tiny factory model (seeds 0 and 1): two members that differ."""
    folder = tmp_path_factory.mktemp("members")
    paths = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        paths.append(str(folder / ("member%d.pt" % seed)))
        torch.save(toy_models.unet3d().state_dict(), paths[-1])
    return paths


def panel_on(monkeypatch, runner=None):
    """The module's panel (``setup()`` on the real .ui, ``enter()``) on a random scan, the model chosen as a
    file (the factory spec); ``runner``: the job runner (default: the panel's own worker process)."""
    slicer_fixtures.clear_scene()
    volume = slicer.util.addVolumeFromArray(np.random.RandomState(1).randn(*SHAPE).astype("float32"), name="scan")
    app = slicer.app
    widget, errors = slicer_fixtures.open_panel(SegHiResCAM, monkeypatch)
    if runner is not None:
        widget.runner.close()
        widget.runner = runner(widget.logic)
    p = widget._parameterNode
    p.modelSource, p.modelPath, p.layer, p.addPrediction = "file", SPEC, "dec", False
    return types.SimpleNamespace(widget=widget, ui=widget.ui, p=p, volume=volume, errors=errors, app=app)


@pytest.fixture()
def panel(monkeypatch):
    made = panel_on(monkeypatch, slicer_job.ThreadRunner)
    yield made
    made.app.quit()


def run_until_done(widget, timeout=120.0):
    slicer.app.runEventLoop(until=lambda: widget._job is None, timeout=timeout)
    assert widget._job is None, "the job did not finish"


def add_weights(ui, paths):
    """Choose each file in the path field and press Add, as a user does."""
    for path in paths:
        ui.weightsPathLineEdit.currentPath = path
        ui.addWeightsButton.click()



def apply_ensemble(panel, kind="ensemble", timeout=120.0):
    """Apply; the heatmap and its spread node (named for ``kind``), after checking the run had no error."""
    panel.ui.applyButton.click()
    run_until_done(panel.widget, timeout)
    assert not panel.errors, panel.errors
    heatmap = panel.p.outputVolume
    spread = heatmap.GetNodeReference("SegHiResCAMSpread")
    assert spread is not None and spread.GetName() == "scan heatmap spread (%s)" % kind
    return heatmap, spread

def cli_ensemble(tmp_path, volume, model_args):
    """``seghirescam explain`` on the panel's scan (written to a file): the mean map, the spread map, the JSON."""
    image, geometry = mrml.image_from_volume(volume)
    path, out, spread, record = (str(tmp_path / name) for name in ("scan.nii.gz", "mean.nii.gz", "spread.nii.gz",
                                                                     "run.json"))
    io.write_image(path, image, geometry)
    code = main(["explain", "--image", path, "--class", "1", "--device", "cpu", "--quiet", "--out", out,
                 "--spread", spread, "--json", record] + model_args)
    assert code == 0
    return io.read_image(out)[0], io.read_image(spread)[0], json.load(open(record))


def test_two_weights_files_in_the_panel_give_the_command_lines_ensemble(panel, weights, tmp_path):
    """Add two weights files, Apply: the heatmap is the CLI's ``--weights A --weights B`` mean map, the spread map
    a second volume, the agreement in the summary; Clear and Apply: a plain run without a spread map."""
    widget, ui, p = panel.widget, panel.ui, panel.p
    add_weights(ui, weights + [weights[0]])  # the same file twice: listed once
    assert p.weightsPaths.split(";") == weights and ui.weightsPathLineEdit.currentPath == ""
    assert ui.weightsListLabel.text.startswith("2 weights files, an ensemble") and ui.clearWeightsButton.enabled
    assert ui.applyButton.enabled, ui.applyButton.toolTip
    heatmap, spread = apply_ensemble(panel)
    mean, spread_map, record = cli_ensemble(tmp_path, panel.volume,
                                            ["--model", SPEC, "--layer", "dec", "--weights", weights[0],
                                             "--weights", weights[1]])
    assert len(record["ensemble"]["members"]) == 2 and record["ensemble"]["kind"] == ["models"]
    np.testing.assert_allclose(slicer.util.arrayFromVolume(heatmap), mean, atol=1e-5)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(spread), spread_map, atol=1e-4, rtol=1e-4)
    assert float(spread_map.max()) > 0  # the members differ
    agreement = "%.3f" % record["agreement"]
    assert mrml.get_attributes(heatmap)["agreement"] == agreement
    assert "ensemble of weights files: mean of 2 maps, agreement %s" % agreement in ui.summaryLabel.text
    files = mrml.get_attributes(heatmap)["modelFiles"].split(";")  # the provenance names every member's file
    assert "member0.pt" in files and "member1.pt" in files
    ui.clearWeightsButton.click()
    assert p.weightsPaths == "" and not ui.clearWeightsButton.enabled
    assert ui.weightsListLabel.text == "No weights files: the model's own weights."
    add_weights(ui, weights[1:])  # one file: the model's weights (the CLI's single --weights), no ensemble
    assert ui.weightsListLabel.text == "1 weights file: member1.pt"
    ui.applyButton.click()
    run_until_done(widget)
    assert not panel.errors, panel.errors
    assert p.outputVolume is heatmap and heatmap.GetNodeReference("SegHiResCAMSpread") is None
    assert "agreement" not in ui.summaryLabel.text
    single = str(tmp_path / "single.nii.gz")
    assert main(["explain", "--model", SPEC, "--weights", weights[1], "--layer", "dec", "--image",
                 str(tmp_path / "scan.nii.gz"), "--class", "1", "--device", "cpu", "--quiet", "--out", single]) == 0
    np.testing.assert_allclose(slicer.util.arrayFromVolume(heatmap), io.read_image(single)[0], atol=1e-5)
    assert not np.allclose(io.read_image(single)[0], mean, atol=1e-3)  # one member's map is not the mean


# ---------------------------------------------------------------------------------------------- nnU-Net folds
ARCH = {"n_stages": 2, "features_per_stage": [4, 8], "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [2, 2, 2]], "n_conv_per_stage": [1, 1],
        "n_conv_per_stage_decoder": [1], "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True}}


def write_nnunet(folder, folds):
    """A tiny nnU-Net v2 trained-model folder (2-stage PlainConvUNet, 2 classes) with these folds, each its own
    random weights, laid out as nnUNetv2_train leaves it."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    os.makedirs(folder)
    plans = {"dataset_name": "Dataset901_Tiny", "plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2],
             "transpose_backward": [0, 1, 2], "image_reader_writer": "SimpleITKIO",
             "configurations": {"3d_fullres": {
                 "patch_size": [8, 16, 16], "spacing": [1.0, 1.0, 1.0],
                 "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False], "architecture": {
                     "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                     "arch_kwargs": ARCH, "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}},
             "foreground_intensity_properties_per_channel": {}}
    with open(os.path.join(folder, "plans.json"), "w") as handle:
        json.dump(plans, handle)
    with open(os.path.join(folder, "dataset.json"), "w") as handle:
        json.dump({"channel_names": {"0": "MRI"}, "labels": {"background": 0, "blob": 1}, "numTraining": 2,
                   "file_ending": ".nii.gz"}, handle)
    kwargs = dict(ARCH, conv_op=torch.nn.Conv3d, norm_op=torch.nn.InstanceNorm3d, nonlin=torch.nn.LeakyReLU)
    for fold in folds:
        torch.manual_seed(10 + fold)
        net = PlainConvUNet(input_channels=1, num_classes=2, deep_supervision=False, **kwargs)
        with torch.no_grad():  # both classes about equally likely: each fold predicts some of each
            net.decoder.seg_layers[-1].bias.zero_()
        os.makedirs(os.path.join(folder, "fold_%d" % fold))
        torch.save({"network_weights": net.state_dict(), "trainer_name": "nnUNetTrainer",
                    "init_args": {"configuration": "3d_fullres", "fold": fold}},
                   os.path.join(folder, "fold_%d" % fold, "checkpoint_final.pth"))
    return folder



def apply_folds_like_the_cli(panel, tmp_path, folder, folds, members):
    """Apply a fold ensemble; its mean and spread maps must be the CLI's ``--model-args '{"fold": folds}'``, with
    ``members`` (fold folder names); returns the heatmap node and the CLI's record."""
    heatmap, spread = apply_ensemble(panel)
    mean, spread_map, record = cli_ensemble(tmp_path, panel.volume, ["--model", folder, "--model-args",
                                                                     '{"fold": "%s"}' % folds])
    assert [m["model"].rsplit("/", 1)[1] for m in record["ensemble"]["members"]] == members
    np.testing.assert_allclose(slicer.util.arrayFromVolume(heatmap), mean, atol=1e-5)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(spread), spread_map, atol=1e-4, rtol=1e-4)
    return heatmap, record

def test_all_folds_of_an_nnunet_folder_give_the_command_lines_fold_ensemble(panel, tmp_path):
    widget, ui, p = panel.widget, panel.ui, panel.p
    folder = write_nnunet(str(tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres"), (0, 1))
    p.modelPath, p.layer = folder, "auto"
    ui.allFoldsCheckBox.checked = True  # bound to the parameter node
    assert p.allFolds is True and ui.applyButton.enabled, ui.applyButton.toolTip
    heatmap, record = apply_folds_like_the_cli(panel, tmp_path, folder, "auto", ["fold_0", "fold_1"])
    agreement = "%.3f" % record["agreement"]
    assert "ensemble of folds: mean of 2 maps, agreement %s" % agreement in ui.summaryLabel.text
    ui.allFoldsCheckBox.checked = False  # fold 0 alone: no ensemble
    ui.applyButton.click()
    run_until_done(widget)
    assert heatmap.GetNodeReference("SegHiResCAMSpread") is None and "agreement" not in ui.summaryLabel.text


# ---------------------------------------------------------------------------------------------- bad input
def _missing(p, tmp_path, weights):
    p.weightsPaths = ";".join([weights[0], str(tmp_path / "no_such_member.pt")])
    return "no_such_member.pt' does not exist"


def _twice(p, tmp_path, weights):
    p.weightsPaths = ";".join([weights[0], weights[0]])
    return "is listed twice"


def _onnx_takes_none(p, tmp_path, weights):
    onnx = tmp_path / "net.onnx"
    onnx.write_bytes(b"not read: the check comes first")
    p.modelPath, p.weightsPaths = str(onnx), weights[0]
    return "holds its own weights and takes no weights file"


def _folds_of_a_file(p, tmp_path, weights):
    p.allFolds = True
    return "is for an nnU-Net model folder"


def _one_fold_only(p, tmp_path, weights):
    folder = tmp_path / "one_fold"
    (folder / "fold_0").mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        (folder / name).write_text("{}")
    p.modelPath, p.allFolds = str(folder), True
    return "an ensemble of folds needs two or more"


def _folds_and_weights(p, tmp_path, weights):
    folder = tmp_path / "two_folds"
    for fold in ("fold_0", "fold_1"):
        (folder / fold).mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        (folder / name).write_text("{}")
    p.modelPath, p.allFolds, p.weightsPaths = str(folder), True, weights[0]
    return "a weights file replaces one checkpoint"


@pytest.mark.parametrize("bad", [_missing, _twice, _onnx_takes_none, _folds_of_a_file, _one_fold_only,
                                 _folds_and_weights], ids=lambda f: f.__name__.strip("_"))
def test_bad_ensemble_input_gives_one_error_and_adds_nothing(panel, weights, tmp_path, bad):
    widget, ui, p = panel.widget, panel.ui, panel.p
    message = bad(p, tmp_path, weights)
    widget._updateGUI()
    assert not ui.applyButton.enabled and message in ui.applyButton.toolTip  # Apply says why
    before = node_ids()
    with pytest.raises(InputError):  # as if it were pressed anyway: shown, then raised (as slicer.util does)
        widget.onApplyButton()
    assert len(panel.errors) == 1 and message in panel.errors[0], panel.errors
    assert widget._job is None and node_ids() == before and p.outputVolume is None
    logic = widget.logic  # the headless logic refuses the same input with the same words
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").split("'")[0]):
        logic.prepare(panel.volume, model=logic.modelSpec(p), weights=p.weightsPaths.split(";") if p.weightsPaths
                      else None, folds="auto" if p.allFolds else None, layer="dec")


def test_the_analyses_refuse_an_ensemble(panel, weights):
    widget, ui, p = panel.widget, panel.ui, panel.p
    add_weights(ui, weights)
    before = node_ids()
    with pytest.raises(InputError):
        ui.evaluateButton.click()
    assert len(panel.errors) == 1 and "analyses one model, not an ensemble (2 weights files)" in panel.errors[0]
    assert widget._job is None and node_ids() == before


# ---------------------------------------------------------------------------------------------- worker process
@pytest.fixture()
def worker_panel(monkeypatch):
    """The panel with its default runner, the persistent worker process."""
    made = panel_on(monkeypatch)
    assert isinstance(made.widget.runner, slicer_job.ProcessRunner)
    yield made
    made.app.quit()


def matches_in_process(made, heatmap, spread, members, summary):
    """The worker's result (another process) is the in-process one: heatmap, spread, ``members`` maps and the
    summary line ``summary: mean of N maps, agreement A``; returns the request."""
    widget = made.widget
    assert widget.runner.worker is not None and widget.runner.worker.pid != os.getpid()
    request = widget.logic.prepareFromParameters(made.p)
    expected = widget.logic.compute(request)  # in this process
    assert expected.info["ensemble"]["members"] == members
    np.testing.assert_allclose(slicer.util.arrayFromVolume(heatmap), expected.heatmap, atol=1e-6)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(spread), expected.spread, atol=1e-5, rtol=1e-5)
    assert ("%s: mean of %d maps, agreement %.3f" % (summary, members, expected.info["ensemble"]["agreement"])
            in made.ui.summaryLabel.text)
    return request


def test_weights_ensemble_with_tta_through_the_worker_process(worker_panel, weights):
    """Two weights files and mirroring TTA (16 members) through the worker process give the in-process result,
    the spread volume and the agreement; the worker's request carries them."""
    add_weights(worker_panel.ui, weights)
    worker_panel.ui.ttaCheckBox.checked = True
    heatmap, spread = apply_ensemble(worker_panel, timeout=300)
    request = matches_in_process(worker_panel, heatmap, spread, 16, "ensemble of weights files x mirrorings")
    assert request.memberWeights == weights and request.tta


# ------------------------------------------------------------------------------------ slice axes, fold subsets
SPEC2D = "toy_models:unet2d"


@pytest.fixture(scope="module")
def weights2d(tmp_path_factory):
    """Weights of the tiny 2D factory model (seed 7: maps that are not flat on the panel's scan)."""
    path = str(tmp_path_factory.mktemp("unet2d") / "unet2d.pt")
    torch.manual_seed(7)
    torch.save(toy_models.unet2d().state_dict(), path)
    return path


def test_all_slice_axes_in_the_panel_give_the_command_lines_slice_axes_ensemble(panel, weights2d, tmp_path):
    """The slice axis ``all`` explains a 2D model along every slice axis: the heatmap is the mean map of
    ``seghirescam explain --slice-axes all``, the spread map a second volume named for slice axes, the agreement
    in the summary; the analyses refuse it (one model, one axis)."""
    widget, ui, p = panel.widget, panel.ui, panel.p
    p.modelPath, p.weightsPaths, p.targetKind = SPEC2D, weights2d, "prediction"
    ui.sliceAxisComboBox.currentIndex = ui.sliceAxisComboBox.items.index("all")  # bound to the parameter node
    assert p.sliceAxis == "all" and ui.applyButton.enabled, ui.applyButton.toolTip
    heatmap, spread = apply_ensemble(panel, "slice axes")
    mean, spread_map, record = cli_ensemble(tmp_path, panel.volume, ["--model", SPEC2D, "--weights", weights2d,
                                                                     "--layer", "dec", "--slice-axes", "all"])
    assert [m["slice_axis"] for m in record["ensemble"]["members"]] == ["axial", "coronal", "sagittal"]
    np.testing.assert_allclose(slicer.util.arrayFromVolume(heatmap), mean, atol=1e-5)
    np.testing.assert_allclose(slicer.util.arrayFromVolume(spread), spread_map, atol=1e-4, rtol=1e-4)
    assert float(spread_map.max()) > 0  # the axes' maps differ
    agreement = "%.3f" % record["agreement"]
    assert "ensemble of slice axes: mean of 3 maps, agreement %s" % agreement in ui.summaryLabel.text
    before = node_ids()
    with pytest.raises(InputError):
        ui.evaluateButton.click()
    assert len(panel.errors) == 1 and "not an ensemble (slice axes axial, coronal, sagittal)" in panel.errors[0]
    assert widget._job is None and node_ids() == before


def test_slice_axes_ensemble_through_the_worker_process(worker_panel, weights2d):
    """The slice axis ``all`` of a 2D model through the worker process gives the in-process result, the spread
    volume and the agreement (the request's slice axes reach the worker)."""
    p = worker_panel.p
    p.modelPath, p.weightsPaths, p.targetKind = SPEC2D, weights2d, "prediction"
    worker_panel.ui.sliceAxisComboBox.currentIndex = worker_panel.ui.sliceAxisComboBox.items.index("all")
    heatmap, spread = apply_ensemble(worker_panel, "slice axes")
    matches_in_process(worker_panel, heatmap, spread, 3, "ensemble of slice axes")


def test_slice_axes_of_a_3d_model_give_one_error_and_add_nothing(panel):
    """All slice axes with a 3D model (it sees the whole scan): the run stops with one error and adds nothing;
    headless, ``process(..., sliceAxes="all")`` raises one InputError; bad axes are refused before any run."""
    widget, ui, p = panel.widget, panel.ui, panel.p
    p.sliceAxis = "all"
    before = node_ids()
    ui.applyButton.click()
    run_until_done(widget)
    assert len(panel.errors) == 1 and "slice axes are for a 2D model on a 3D scan" in panel.errors[0], panel.errors
    assert node_ids() == before and p.outputVolume is None
    logic = widget.logic
    for axes, sliceAxis, message in (("all", None, "slice axes are for a 2D model on a 3D scan"),
                                     ("axial", None, "sliceAxes must be 'all' or two or more of"),
                                     ("axial,oblique", None, "sliceAxes must be 'all' or two or more of"),
                                     ("all", "coronal", "give either sliceAxis")):
        with pytest.raises(InputError, match=message):
            logic.process(panel.volume, model=SPEC, layer="dec", sliceAxes=axes, sliceAxis=sliceAxis)
        assert node_ids() == before


def test_a_fold_subset_of_an_nnunet_folder_gives_the_command_lines_folds(panel, tmp_path):
    """The folds field: ``0,2`` of a three-fold folder is the CLI's ``--model-args '{"fold": "0,2"}'`` ensemble
    (mean map, spread map, agreement of 2 folds); ``1`` is fold 1 alone (no spread map), as ``{"fold": "1"}``."""
    widget, ui, p = panel.widget, panel.ui, panel.p
    folder = write_nnunet(str(tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres"), (0, 1, 2))
    p.modelPath, p.layer = folder, "auto"
    ui.foldsLineEdit.text = "0,2"  # bound to the parameter node by hand
    assert p.folds == "0,2" and ui.applyButton.enabled, ui.applyButton.toolTip
    heatmap, record = apply_folds_like_the_cli(panel, tmp_path, folder, "0,2", ["fold_0", "fold_2"])
    assert "ensemble of folds: mean of 2 maps, agreement %.3f" % record["agreement"] in ui.summaryLabel.text
    p.folds = "1"  # the parameter node drives the field
    assert ui.foldsLineEdit.text == "1"
    ui.applyButton.click()
    run_until_done(widget)
    assert not panel.errors, panel.errors
    assert heatmap.GetNodeReference("SegHiResCAMSpread") is None and "agreement" not in ui.summaryLabel.text
    single = str(tmp_path / "fold1.nii.gz")
    assert main(["explain", "--model", folder, "--model-args", '{"fold": "1"}', "--image",
                 str(tmp_path / "scan.nii.gz"), "--class", "1", "--device", "cpu", "--quiet", "--out", single]) == 0
    np.testing.assert_allclose(slicer.util.arrayFromVolume(heatmap), io.read_image(single)[0], atol=1e-5)


@pytest.mark.parametrize("folds, message", [
    ("0,x", "must be fold numbers separated by commas such as '0,2', got '0,x'"),
    ("0,3", "3 does not exist in the nnU-Net folder"),
    ("1,1", "'1,1' names a fold twice")])
def test_bad_folds_give_one_error_and_add_nothing(panel, tmp_path, folds, message):
    widget, ui, p = panel.widget, panel.ui, panel.p
    folder = tmp_path / "two_folds"
    for fold in ("fold_0", "fold_1"):
        (folder / fold).mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        (folder / name).write_text("{}")
    p.modelPath, p.allFolds = str(folder), True
    ui.foldsLineEdit.text = folds
    assert not ui.applyButton.enabled and message in ui.applyButton.toolTip  # Apply says why
    before = node_ids()
    with pytest.raises(InputError):  # pressed anyway
        widget.onApplyButton()
    assert len(panel.errors) == 1 and message in panel.errors[0], panel.errors
    assert widget._job is None and node_ids() == before and p.outputVolume is None
    with pytest.raises(InputError, match=message.split(",")[0]):  # the headless logic: the same words
        widget.logic.prepare(panel.volume, model=str(folder), folds=folds)
