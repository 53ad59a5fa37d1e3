"""nnU-Net models predict what nnU-Net predicts: ``nnunetv2`` itself is the oracle.

The session fixture ``nnunet_oracle`` trains a tiny real nnU-Net v2 model on a synthetic dataset with nnU-Net's
own planning, preprocessing and trainer, and predicts test images with ``nnUNetPredictor``
(``Testing/nnunet_oracle.py``); the result is cached on disk (``$SEGHIRESCAM_TEST_CACHE`` or
``~/.cache/seghirescam-test``), keyed by that script and the nnunetv2/torch versions, so reruns cost nothing.
``nnunet_lowres_oracle`` does the same for a 3d_lowres configuration (``Testing/nnunet_oracle_lowres.py``).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version

import numpy as np
import pytest
import torch

from SegHiResCAMLib.analysis.nnunet_predict import predict_nnunet
from SegHiResCAMLib.engine.sliding import nnunet_gaussian, nnunet_steps
from SegHiResCAMLib.imaging import files as io
from SegHiResCAMLib.imaging.nnunet_space import own_resample, resample_data_or_seg
from SegHiResCAMLib.models.nnunet.loader import load_nnunet

HERE = os.path.dirname(os.path.abspath(__file__))
ORACLE = os.path.join(os.path.dirname(HERE), "nnunet_oracle.py")
ORACLE_LOWRES = os.path.join(os.path.dirname(HERE), "nnunet_oracle_lowres.py")
#: the agreement asked of the parity tests (issue #17)
MAX_PROBABILITY_DIFF = 1e-3
MIN_DICE = 0.99


def _cache_root() -> str:
    return os.environ.get("SEGHIRESCAM_TEST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                    "seghirescam-test")


def _oracle(script: str):
    """``(folder of the outputs of the oracle ``script``, its done.json)``; made once, cached on disk."""
    with open(script, "rb") as handle:
        text = handle.read()
    if script != ORACLE:  # a script that imports the main one depends on it too
        with open(ORACLE, "rb") as handle:
            text += handle.read()
    key = hashlib.sha256(text + version("nnunetv2").encode() + torch.__version__.encode()).hexdigest()
    prefix = os.path.splitext(os.path.basename(script))[0].replace("_", "-")
    folder = os.path.join(_cache_root(), "%s-%s" % (prefix, key[:16]))
    if not os.path.isfile(os.path.join(folder, "done.json")):
        os.makedirs(_cache_root(), exist_ok=True)
        work = tempfile.mkdtemp(prefix=prefix + "-", dir=_cache_root())
        env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONWARNINGS="ignore")
        run = subprocess.run([sys.executable, script, work], env=env, capture_output=True, text=True, timeout=1800)
        if run.returncode != 0:
            shutil.rmtree(work, ignore_errors=True)
            raise AssertionError("the nnU-Net oracle failed:\n%s" % (run.stdout[-3000:] + run.stderr[-3000:]))
        shutil.rmtree(os.path.join(work, "preprocessed"), ignore_errors=True)  # only the trained model is needed
        try:
            os.rename(work, folder)
        except OSError:  # another session made it meanwhile
            shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(folder, "done.json")) as handle:
        return folder, json.load(handle)


@pytest.fixture(scope="session")
def nnunet_oracle():
    """``(folder of the oracle's outputs, its done.json)``; made once (see the module docstring)."""
    return _oracle(ORACLE)


@pytest.fixture(scope="session")
def nnunet_lowres_oracle():
    """The same data planned for a tiny GPU, so that nnU-Net's planner makes a 3d_lowres configuration
    (``Testing/nnunet_oracle_lowres.py``)."""
    return _oracle(ORACLE_LOWRES)


def _model_folder(root: str, done: dict, configuration: str) -> str:
    return os.path.join(root, "results", done["dataset"], "nnUNetTrainer__nnUNetPlans__%s" % configuration)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


def test_window_steps_and_gaussian_are_nnunets():
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian, compute_steps_for_sliding_window
    for size, patch in [((14, 84, 76), (12, 48, 48)), ((110, 64), (64, 64)), ((20, 129, 200), (16, 64, 96))]:
        assert nnunet_steps(size, patch, 0.5) == compute_steps_for_sliding_window(size, patch, 0.5)
    for patch in [(12, 48, 48), (48, 48), (5, 7, 9)]:
        want = compute_gaussian(patch, 1.0 / 8, 10, device=torch.device("cpu"))
        assert want.dtype == torch.float16
        assert torch.equal(nnunet_gaussian(patch), want)


@pytest.mark.parametrize("shape,spacing,target,order,order_z", [
    ((1, 9, 30, 28), (3.5, 1.0, 1.0), (3.43, 0.8, 0.9), 3, 0),   # anisotropic: separate z (nearest along z)
    ((2, 9, 30, 28), (1.0, 1.2, 1.1), (1.5, 1.0, 0.7), 3, 0),    # isotropic enough: one 3D spline
    ((1, 8, 20, 22), (1.0, 1.0, 4.2), (1.0, 0.8, 3.0), 1, 0),    # low-resolution axis last, linear (logits)
])
def test_own_resampling_is_nnunets(shape, spacing, target, order, order_z):
    from nnunetv2.preprocessing.resampling.default_resampling import compute_new_shape, resample_data_or_seg_to_shape
    data = np.random.default_rng(0).normal(0, 1, shape).astype(np.float32)
    new = compute_new_shape(shape[1:], spacing, target)
    want = resample_data_or_seg_to_shape(data, new, spacing, target, is_seg=False, order=order, order_z=order_z,
                                         force_separate_z=None)
    got = own_resample(data, new, spacing, target, order, order_z, None)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < 1e-5
    np.testing.assert_allclose(resample_data_or_seg(data, new, spacing, target, order, order_z), want, atol=1e-6)


def _compare(root, done, configuration, name, tta, dtype=torch.float16):
    model = load_nnunet(_model_folder(root, done, configuration), fold="all")
    image, geometry = io.read_image(os.path.join(root, "images", "%s.nii.gz" % name))
    result = predict_nnunet(model, image, geometry, torch.device("cpu"), tta=tta, probabilities=True, dtype=dtype)
    oracle = np.load(os.path.join(root, "oracle.npz"))
    key = "%s/%s/%s" % (configuration, name, "tta" if tta else "plain")
    want_probs, want_seg = oracle[key + "/probabilities"], oracle[key + "/seg"]
    assert result["probabilities"].shape == want_probs.shape and result["labels"].shape == want_seg.shape
    diff = float(np.abs(result["probabilities"] - want_probs).max())
    dices = [dice(result["labels"] == c, want_seg == c) for c in range(1, want_probs.shape[0])]
    print("nnU-Net parity %s %s tta=%s: windows %d, max|dp| %.2e, Dice %s, labels differ at %d of %d voxels"
          % (configuration, name, tta, result["windows"], diff, ["%.4f" % d for d in dices],
             int((result["labels"] != want_seg).sum()), want_seg.size))
    return diff, dices, result


@pytest.mark.parametrize("configuration,name,tta", [
    ("3d_fullres", "oblique", False), ("3d_fullres", "oblique", True), ("3d_fullres", "flipped", False),
    ("2d", "flipped", False), ("2d", "flipped", True)])  # 3d_fullres, flipped, TTA: the command-line test below
def test_prediction_matches_nnunet(nnunet_oracle, configuration, name, tta):
    root, done = nnunet_oracle
    diff, dices, result = _compare(root, done, configuration, name, tta)
    assert diff <= MAX_PROBABILITY_DIFF
    assert min(dices) >= MIN_DICE
    if configuration == "3d_fullres" and name == "oblique":
        assert result["windows"] > 1  # the case needs several windows


def test_cli_predict_writes_nnunets_segmentation_on_the_image_grid(nnunet_oracle, tmp_path):
    """``seghirescam predict --tta`` on the flipped image: nnU-Net's mirrored segmentation, on the input's grid."""
    from SegHiResCAMLib.cli import main
    root, done = nnunet_oracle
    folder = _model_folder(root, done, "3d_fullres")
    source = os.path.join(root, "images", "flipped.nii.gz")
    out, meta = str(tmp_path / "seg.nii.gz"), str(tmp_path / "seg.json")
    assert main(["predict", "--model", folder, "--model-args", '{"fold": "all"}', "--tta", "--image", source,
                 "--out", out, "--json", meta, "--device", "cpu", "--quiet"]) == 0
    labels, geometry = io.read_image(out)
    _, want_geometry = io.read_image(source)
    assert geometry.same_grid(want_geometry, atol=1e-6)
    with open(meta) as handle:
        assert json.load(handle)["inference"]["tta"] is True
    want = np.load(os.path.join(root, "oracle.npz"))["3d_fullres/flipped/tta/seg"]
    dices = [dice(labels == c, want == c) for c in (1, 2)]
    print("nnU-Net parity, seghirescam predict --tta, 3d_fullres flipped: Dice %s" % ["%.4f" % d for d in dices])
    assert min(dices) >= MIN_DICE
    plain = np.load(os.path.join(root, "oracle.npz"))["3d_fullres/flipped/plain/seg"]
    assert (plain != want).any() and (labels != plain).sum() > (labels != want).sum()  # the mirroring was run


# ------------------------------------------------------------------------------------------------ TotalSegmentator

def _totalseg_home(root, done, tmp_path):
    """A folder laid out like TotalSegmentator's, with the tiny nnU-Net model as parts 1 and 2 of ``total``."""
    from SegHiResCAMLib.models.nnunet.totalseg import TASKS
    source = _model_folder(root, done, "3d_fullres")
    results = tmp_path / "totalseg" / "nnunet" / "results"
    parts = {291: ("Dataset291_TotalSegmentator_part1_organs_1559subj", {"liver": 1, "spleen": 2}),
             292: ("Dataset292_TotalSegmentator_part2_vertebrae_1532subj", {"vertebrae_L1": 1, "vertebrae_L2": 2})}
    assert set(parts) <= set(TASKS["total"])
    for name, labels in parts.values():
        folder = results / name / "nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres"
        shutil.copytree(source, folder, ignore=shutil.ignore_patterns("checkpoint_best.pth", "*.png", "*.txt"))
        with open(folder / "dataset.json") as handle:
            dataset = json.load(handle)
        dataset["labels"] = dict({"background": 0}, **labels)
        with open(folder / "dataset.json", "w") as handle:
            json.dump(dataset, handle)
    return str(tmp_path / "totalseg")


def test_totalsegmentator_by_task_and_structure(nnunet_oracle, tmp_path, monkeypatch):
    from SegHiResCAMLib.errors import ModelError
    from SegHiResCAMLib.models import load_model
    root, done = nnunet_oracle
    monkeypatch.setenv("TOTALSEG_HOME_DIR", _totalseg_home(root, done, tmp_path))
    liver = load_model("totalseg:total", structure="liver", fold="all")
    assert liver.class_names == ["background", "liver", "spleen"] and liver.class_index("liver") == 1
    assert "Dataset291" in liver.name and liver.inference["framework"] == "nnunet"
    spine = load_model("totalseg:total", structure="Vertebrae_L2", fold="all")
    assert "Dataset292" in spine.name and spine.class_index("vertebrae_L2") == 2
    with pytest.raises(ModelError, match="no structure 'heart'.*not installed"):
        load_model("totalseg:total", structure="heart", fold="all")
    with pytest.raises(ModelError, match="has 2 parts"):
        load_model("totalseg:total", fold="all")
    with pytest.raises(ModelError, match="not installed.*totalseg_download_weights -t lung_vessels"):
        load_model("totalseg:lung_vessels")
    with pytest.raises(ModelError, match="unknown TotalSegmentator task 'organs'"):
        load_model("totalseg:organs")
    # the same weights as the nnU-Net folder: the same prediction as nnU-Net's
    image, geometry = io.read_image(os.path.join(root, "images", "flipped.nii.gz"))
    labels = predict_nnunet(liver, image, geometry, torch.device("cpu"))["labels"]
    want = np.load(os.path.join(root, "oracle.npz"))["3d_fullres/flipped/plain/seg"]
    assert dice(labels == 1, want == 1) >= MIN_DICE


def test_structure_needs_a_totalsegmentator_model(tmp_path):
    from SegHiResCAMLib.cli import main
    image = tmp_path / "im.nii.gz"
    io.write_image(str(image), np.zeros((4, 4, 4), np.float32), __import__("SegHiResCAMLib.geometry").geometry
                   .Geometry.identity((4, 4, 4)))
    assert main(["predict", "--model", "hd-bet", "--structure", "liver", "--image", str(image),
                 "--out", str(tmp_path / "o.nii.gz")]) == 2
    assert not (tmp_path / "o.nii.gz").exists()


def test_explain_blends_nnunets_windows(nnunet_oracle):
    """``explain`` runs nnU-Net's preprocessing and windows (patch, overlap 0.5, nnU-Net's Gaussian): its blended
    prediction is nnU-Net's up to the window starts (aligned to the explained layer's down-sampling)."""
    from SegHiResCAMLib.analysis.explain import TargetSpec, explain_image
    root, done = nnunet_oracle
    model = load_nnunet(_model_folder(root, done, "3d_fullres"), fold="all")
    image, geometry = io.read_image(os.path.join(root, "images", "oblique.nii.gz"))
    result = explain_image(model, image, geometry, [TargetSpec(class_index=1)], device="cpu")
    heat = result.heatmaps[0]
    assert heat.array.shape == image.shape and heat.info["options"]["roi_size"] == model.inference["patch_size"]
    assert heat.info["options"]["windows"] > 1 and heat.info["options"]["blend"] == "gaussian"
    want = np.load(os.path.join(root, "oracle.npz"))["3d_fullres/oblique/plain/seg"]
    dices = [dice(result.prediction == c, want == c) for c in (1, 2)]
    print("nnU-Net explain prediction vs nnUNetPredictor: Dice %s" % ["%.4f" % d for d in dices])
    assert min(dices) >= 0.98


def test_fold_ensemble_matches_nnunets(nnunet_oracle, tmp_path):
    """Two folds (the trained weights, and the same perturbed): ``fold="auto"`` averages them as
    ``nnUNetPredictor`` with ``use_folds=(0, 1)`` does (run here, in this process)."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    root, done = nnunet_oracle
    source = _model_folder(root, done, "3d_fullres")
    folder = tmp_path / os.path.basename(source)
    folder.mkdir()
    for name in ("dataset.json", "plans.json"):
        shutil.copy(os.path.join(source, name), folder / name)
    ckpt = torch.load(os.path.join(source, "fold_all", "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    generator = torch.Generator().manual_seed(1)
    for fold, scale in ((0, 0.0), (1, 0.3)):
        (folder / ("fold_%d" % fold)).mkdir()
        ckpt = dict(ckpt, network_weights={k: v + scale * v.std() * torch.randn(v.shape, generator=generator)
                                           if v.is_floating_point() and v.numel() > 1 else v
                                           for k, v in ckpt["network_weights"].items()})
        torch.save(ckpt, folder / ("fold_%d" % fold) / "checkpoint_final.pth")
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=(0, 1), checkpoint_name="checkpoint_final.pth")
    path = os.path.join(root, "images", "flipped.nii.gz")
    data, props = SimpleITKIO().read_images([path])
    want_seg, want_probs = predictor.predict_single_npy_array(data, {"spacing": props["spacing"]}, None, None, True)
    model = load_nnunet(str(folder), fold="auto")
    assert len(model.network.folds) == 2 and len(model.file_hashes) == 2
    single = load_nnunet(str(folder), fold=1)
    image, geometry = io.read_image(path)
    got = predict_nnunet(model, image, geometry, torch.device("cpu"), probabilities=True)
    diff = float(np.abs(got["probabilities"] - want_probs).max())
    dices = [dice(got["labels"] == c, want_seg == c) for c in (1, 2)]
    print("nnU-Net parity, 2-fold ensemble: max|dp| %.2e, Dice %s" % (diff, ["%.4f" % d for d in dices]))
    assert diff <= MAX_PROBABILITY_DIFF and min(dices) >= MIN_DICE
    other = predict_nnunet(single, image, geometry, torch.device("cpu"), probabilities=True)["probabilities"]
    assert np.abs(other - want_probs).max() > 10 * MAX_PROBABILITY_DIFF  # the folds differ: the mean matters


def test_float16_accumulators_are_what_reproduces_nnunet(nnunet_oracle):
    """Why ``predict_nnunet`` blends in float16 by default: float32 is further from nnU-Net's output."""
    root, done = nnunet_oracle
    diff, _, _ = _compare(root, done, "3d_fullres", "oblique", False, dtype=torch.float32)
    assert diff > 10 * MAX_PROBABILITY_DIFF


def test_region_labels_follow_regions_class_order():
    """Region-based models: regions painted in ``regions_class_order`` (later ones win), as nnU-Net's
    ``LabelManager.convert_probabilities_to_segmentation``; not the highest region."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    from SegHiResCAMLib.analysis.nnunet_predict import labels_from_logits
    from SegHiResCAMLib.geometry import Geometry
    from SegHiResCAMLib.imaging.model_space import ModelSpace
    from SegHiResCAMLib.models.base import Preprocessing, SegModel
    label_dict = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}
    manager = LabelManager(label_dict, regions_class_order=[1, 2, 3])
    geometry = Geometry.identity((6, 7, 8))
    space = ModelSpace(geometry, geometry, ((0, 0),) * 3)
    logits = torch.from_numpy(np.random.default_rng(9).normal(0, 2, (1, 3) + geometry.array_shape).astype(np.float32))
    logits[0, 0] = logits[0, 0].abs() - 5.0  # "whole" mostly off, but far below the other two: order matters
    model = SegModel(network=torch.nn.Identity(), name="regions", activation="sigmoid",
                     class_names=["whole", "core", "enhancing"], preprocessing=Preprocessing(), output="logits",
                     inference={"framework": "nnunet", "regions_class_order": [1, 2, 3]})
    want = manager.convert_probabilities_to_segmentation(torch.sigmoid(logits[0]).numpy())
    got = labels_from_logits(logits, model, space)
    np.testing.assert_array_equal(got, want)
    highest = np.where(logits[0].max(0).values.numpy() > 0, logits[0].argmax(0).numpy() + 1, 0)
    assert (highest != want).any()  # the generic multi-label rule would differ


def test_tta_is_refused_for_other_models():
    from SegHiResCAMLib.analysis.explain import predict_image
    from SegHiResCAMLib.errors import InputError
    from SegHiResCAMLib.geometry import Geometry
    from SegHiResCAMLib.models.base import Preprocessing, SegModel
    model = SegModel(network=torch.nn.Conv3d(1, 2, 1), name="toy", preprocessing=Preprocessing(divisible_by=1),
                     output="logits")
    with pytest.raises(InputError, match="--tta .* nnU-Net models only"):
        predict_image(model, np.zeros((4, 4, 4), np.float32), Geometry.identity((4, 4, 4)), device="cpu", tta=True)


def test_whole_image_input_is_padded_for_the_network(nnunet_oracle):
    """Explanations without windows (e.g. the SA score) run the network once on the whole input: nnU-Net's input
    is then padded at the end to the network's down-sampling, and results still map back exactly."""
    from SegHiResCAMLib.analysis.explain import model_input
    from SegHiResCAMLib.analysis.nnunet_predict import nnunet_input
    root, done = nnunet_oracle
    model = load_nnunet(_model_folder(root, done, "3d_fullres"), fold="all")
    image, geometry = io.read_image(os.path.join(root, "images", "oblique.nii.gz"))
    plain, plain_space = nnunet_input(model, image, geometry)
    x, space, _ = model_input(model, image, geometry, "cpu")
    k = model.preprocessing.divisible_by
    assert k > 1 and any(n % k for n in plain.shape[1:]) and all(n % k == 0 for n in x.shape[2:])
    np.testing.assert_array_equal(x[(0, slice(None)) + tuple(slice(0, n) for n in plain.shape[1:])].numpy(), plain)
    with torch.no_grad():
        logits = model.network(x)[0].numpy()
    labels = space.labels_to_image(lambda c: logits[c], 3)
    assert labels.shape == image.shape
    inner = tuple(slice(0, n) for n in plain.shape[1:])
    same = plain_space.labels_to_image(lambda c: logits[c][inner], 3)
    np.testing.assert_array_equal(labels, same)


def test_cli_explain_totalsegmentator_structure(nnunet_oracle, tmp_path, monkeypatch):
    """``--model totalseg:total --structure spleen``: the part holding the spleen is loaded and the spleen is the
    explained class; the heatmap is on the input's grid."""
    from SegHiResCAMLib.cli import main
    root, done = nnunet_oracle
    monkeypatch.setenv("TOTALSEG_HOME_DIR", _totalseg_home(root, done, tmp_path))
    source = os.path.join(root, "images", "flipped.nii.gz")
    out, meta = str(tmp_path / "heat.nii.gz"), str(tmp_path / "heat.json")
    assert main(["explain", "--model", "totalseg:total", "--structure", "spleen", "--model-args", '{"fold": "all"}',
                 "--image", source, "--out", out, "--json", meta, "--device", "cpu", "--quiet"]) == 0
    with open(meta) as handle:
        info = json.load(handle)
    assert info["target"]["class"] == 2 and "Dataset291" in info["model"]["name"]
    heat, geometry = io.read_image(out)
    assert geometry.same_grid(io.read_image(source)[1], atol=1e-6) and heat.max() > 0


def test_explain_2d_configuration_on_a_volume_is_nnunets(nnunet_oracle):
    """An nnU-Net 2d configuration on a 3D image is explained as nnU-Net predicts (``analysis/nnunet_slices.py``):
    the reported prediction is ``nnUNetPredictor``'s, the map is on the image grid, zero on the slices without
    target voxels, and equal to a per-slice sliding-window CAM on the volume preprocessed once by nnU-Net's
    preprocessing, normalised over the volume and mapped back as nnU-Net's probabilities."""
    from SegHiResCAMLib.analysis.explain import TargetSpec, explain_image
    from SegHiResCAMLib.analysis.nnunet_predict import nnunet_input
    from SegHiResCAMLib.engine import MaskRegion, SegmentTarget
    from SegHiResCAMLib.engine.windows import WindowedCAM
    root, done = nnunet_oracle
    model = load_nnunet(_model_folder(root, done, "2d"), fold="all")
    image, geometry = io.read_image(os.path.join(root, "images", "flipped.nii.gz"))
    want = np.load(os.path.join(root, "oracle.npz"))["2d/flipped/plain/seg"]
    keep = (3, 4, 5)
    mask = np.zeros(image.shape, np.uint8)
    mask[list(keep)] = want[list(keep)] == 1
    before = image.copy()
    result = explain_image(model, image, geometry, [TargetSpec(class_index=2), TargetSpec(class_index=1, mask=mask)],
                           device="cpu")
    assert np.array_equal(image, before)
    dices = [dice(result.prediction == c, want == c) for c in (1, 2)]
    print("nnU-Net 2d explain prediction vs nnUNetPredictor: Dice %s" % ["%.4f" % d for d in dices])
    assert result.prediction.shape == want.shape and min(dices) >= MIN_DICE
    heat = result.heatmaps[1]
    assert all(h.array.shape == image.shape and np.isfinite(h.array).all() for h in result.heatmaps)
    assert result.heatmaps[0].array.max() > 0 and heat.info["options"]["windows"] > 1
    others = [z for z in range(image.shape[0]) if z not in keep]
    assert not heat.array[others].any() and all(heat.array[z].max() > 0 for z in keep)
    assert result.metadata["slices"]["slices_run"][1] == len(keep)
    # the same map, computed independently slice by slice on nnU-Net's preprocessed volume
    x_np, space = nnunet_input(model, image, geometry)
    x = torch.from_numpy(x_np)[None]
    on_model = space.to_model(mask, "nearest") != 0
    patch = tuple(model.inference["patch_size"])
    volume = np.zeros(x_np.shape[1:], np.float32)
    for z in range(x.shape[2]):
        if not on_model[z].any():
            continue
        cam = WindowedCAM(model.network, x[:, :, z], patch, [heat.layer], overlap=0.5,
                          importance=nnunet_gaussian(patch).float())
        target = SegmentTarget(1, MaskRegion(torch.from_numpy(on_model[z])[None]), activation=model.activation)
        volume[z] = cam.explain([target], heat.method, normalization="none")[0].map[0].numpy()
    assert sorted(z for z in range(volume.shape[0]) if volume[z].any()) == list(keep)
    volume /= volume.max()
    expected = np.zeros(image.shape, np.float32)
    for part, values in space.channel_to_image(volume, 0.0):
        expected[part] = values
    print("nnU-Net 2d explain vs per-slice recomputation: max |diff| %.2e" % np.abs(heat.array - expected).max())
    np.testing.assert_allclose(heat.array, expected, atol=1e-5)


def test_explain_2d_configuration_refuses_generic_slice_options(nnunet_oracle):
    """``--roi-size``, ``--slice-axis`` and ``--slice-context`` do not apply to nnU-Net's own slicing: one clear
    error each (the generic slice path would accept them and explain another prediction)."""
    from SegHiResCAMLib.analysis.explain import TargetSpec, explain_image
    from SegHiResCAMLib.errors import InputError
    root, done = nnunet_oracle
    model = load_nnunet(_model_folder(root, done, "2d"), fold="all")
    image, geometry = io.read_image(os.path.join(root, "images", "flipped.nii.gz"))
    for options in ({"roi_size": (32, 32)}, {"slice_axis": "coronal"}, {"slice_context": 1}):
        with pytest.raises(InputError, match="nnU-Net 2d configuration"):
            explain_image(model, image, geometry, [TargetSpec(class_index=1)], device="cpu", **options)


def test_cli_explain_2d_configuration_uses_nnunets_slicing(nnunet_oracle, tmp_path):
    """``seghirescam explain`` on an nnU-Net 2d folder and a 3D image: nnU-Net's slicing (recorded in the JSON),
    the heatmap on the input's grid."""
    from SegHiResCAMLib.cli import main
    root, done = nnunet_oracle
    source = os.path.join(root, "images", "flipped.nii.gz")
    out, meta = str(tmp_path / "heat.nii.gz"), str(tmp_path / "heat.json")
    assert main(["explain", "--model", _model_folder(root, done, "2d"), "--model-args", '{"fold": "all"}',
                 "--image", source, "--class", "2", "--out", out, "--json", meta, "--device", "cpu", "--quiet"]) == 0
    with open(meta) as handle:
        info = json.load(handle)
    assert info["slices"]["axis"] == "nnunet" and info["slices"]["preprocessing"] == "nnU-Net (whole volume)"
    heat, geometry = io.read_image(out)
    assert geometry.same_grid(io.read_image(source)[1], atol=1e-6) and heat.max() > 0


@pytest.mark.parametrize("name,tta", [("oblique", False), ("flipped", True)])
def test_3d_lowres_prediction_matches_nnunet(nnunet_lowres_oracle, name, tta):
    """3d_lowres (planned by nnU-Net for a 0.01 GB GPU: spacing 3.43 x 1.6 x 1.6 mm, patch 8 x 20 x 16, many
    windows): probabilities and labels on the image grid are nnUNetPredictor's."""
    root, done = nnunet_lowres_oracle
    diff, dices, result = _compare(root, done, "3d_lowres", name, tta)
    assert result["space"].model_spacing[1] > 1.5 and result["windows"] > 1  # the low-resolution grid, windowed
    assert diff <= MAX_PROBABILITY_DIFF
    assert min(dices) >= MIN_DICE
