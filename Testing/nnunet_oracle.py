"""A tiny real nnU-Net v2 model and nnU-Net's own predictions on it: the oracle of the nnU-Net parity tests.

Run as a script (``python nnunet_oracle.py OUT``) in a fresh process, because nnU-Net reads ``nnUNet_raw``,
``nnUNet_preprocessed`` and ``nnUNet_results`` from the environment when it is first imported. It

1. writes a synthetic raw dataset (3 classes: background, ``ball``, ``slab``; one CT channel; anisotropic
   spacing; training cases with identity directions);
2. runs nnU-Net's own fingerprint extraction, planning and preprocessing, then shrinks the networks in the plans
   (few features, batch size 2: this is about identical weights, not a good model);
3. trains each configuration with nnU-Net's own ``nnUNetTrainer`` for one epoch of a few iterations on the CPU,
   fold ``all`` (the trainer is instantiated here, so the trainer lookup of ``nnUNetv2_train`` never runs; the
   checkpoint names ``nnUNetTrainer``, which the predictor's lookup finds in the first module it imports, before
   any trainer variant that needs torchvision);
4. predicts test images (larger than a patch, so several windows; flipped and oblique direction matrices; spacings
   that need resampling) with ``nnUNetPredictor`` (Gaussian sliding window, step 0.5), with and without mirroring,
   and saves the segmentation and the probabilities on the image grid.

Everything lands in ``OUT`` (``results/``, ``images/``, ``oracle.npz``, ``done.json``); the test set-up caches it.
"""

import json
import os
import sys
import time

import numpy as np
import SimpleITK as sitk

DATASET = "Dataset901_SegHiResCAMTiny"
CONFIGURATIONS = ("3d_fullres", "2d")
TRAIN_ITERATIONS = 2
#: test images: name -> (array shape z, y, x; spacing x, y, z; direction); "oblique" needs 4 windows of 3d_fullres
#: (12 x 48 x 48 on 12 x 58 x 51 voxels after resampling)
_C, _S = np.cos(0.35), np.sin(0.35)
TESTS = {
    "oblique": ((13, 64, 60), (0.85, 0.9, 3.1),
                tuple((np.array([[_C, -_S, 0.0], [_S, _C, 0.0], [0.0, 0.0, 1.0]])).ravel())),
    "flipped": ((10, 46, 40), (1.1, 1.2, 4.2), (-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, -1.0)),
}


def synthetic_case(shape, spacing, rng):
    """A CT-like image with a ball (label 1) and a slab (label 2) at random places; physical sizes in mm."""
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")
    z, y, x = zz * spacing[2], yy * spacing[1], xx * spacing[0]
    extent = [n * s for n, s in zip(shape, spacing[::-1])]
    centre = [rng.uniform(0.3, 0.7) * e for e in extent]
    radius = rng.uniform(9.0, 14.0)
    ball = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 < radius ** 2
    offset = rng.uniform(0.2, 0.4) * extent[2]
    slab = (np.abs(x + 0.5 * y - offset - 0.5 * extent[1] * 0.5) < 5.0) & ~ball
    labels = np.zeros(shape, np.uint8)
    labels[ball] = 1
    labels[slab] = 2
    image = rng.normal(0.0, 25.0, shape) + 60.0 * np.sin(x / 7.0) + 30.0 * np.cos(y / 11.0)
    image[ball] += 180.0
    image[slab] += 90.0
    return image.astype(np.float32), labels


def _write(array, path, spacing, direction=None, origin=(0.0, 0.0, 0.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    sitk.WriteImage(image, path)


def make_raw(raw: str, images: str) -> None:
    rng = np.random.default_rng(2026)
    folder = os.path.join(raw, DATASET)
    os.makedirs(os.path.join(folder, "imagesTr"), exist_ok=True)
    os.makedirs(os.path.join(folder, "labelsTr"), exist_ok=True)
    cases = [((12, 48, 44), (1.0, 1.0, 3.5)), ((13, 44, 48), (0.9, 1.0, 3.5)), ((11, 52, 46), (1.0, 0.95, 3.6)),
             ((12, 46, 50), (1.05, 1.0, 3.4))]
    for i, (shape, spacing) in enumerate(cases):
        image, labels = synthetic_case(shape, spacing, rng)
        _write(image, os.path.join(folder, "imagesTr", "tiny_%03d_0000.nii.gz" % i), spacing)
        _write(labels, os.path.join(folder, "labelsTr", "tiny_%03d.nii.gz" % i), spacing)
    with open(os.path.join(folder, "dataset.json"), "w") as handle:
        json.dump({"channel_names": {"0": "CT"}, "labels": {"background": 0, "ball": 1, "slab": 2},
                   "numTraining": len(cases), "file_ending": ".nii.gz"}, handle)
    os.makedirs(images, exist_ok=True)
    for name, (shape, spacing, direction) in TESTS.items():
        image, labels = synthetic_case(shape, spacing, rng)
        _write(image, os.path.join(images, "%s.nii.gz" % name), spacing, direction, origin=(12.0, -30.0, 7.5))
        _write(labels, os.path.join(images, "%s_labels.nii.gz" % name), spacing, direction, origin=(12.0, -30.0, 7.5))


def shrink_plans(path: str) -> None:
    with open(path) as handle:
        plans = json.load(handle)
    for config in plans["configurations"].values():
        if "architecture" not in config:
            continue
        kwargs = config["architecture"]["arch_kwargs"]
        kwargs["features_per_stage"] = [min(4 * 2 ** i, 16) for i in range(kwargs["n_stages"])]
        config["batch_size"] = 2
    with open(path, "w") as handle:
        json.dump(plans, handle, indent=1)


class InProcess:
    """Stands for the ``multiprocessing`` module in nnU-Net's fingerprint and preprocessing modules: their pools
    become thread pools (a spawned pool re-imports nnU-Net in every worker: minutes on a loaded 2-core machine)."""

    @staticmethod
    def get_context(_method=None):
        import multiprocessing.pool  # noqa: PLC0415

        class Context:
            Pool = multiprocessing.pool.ThreadPool
        return Context


def prepare(out: str, **planning) -> dict:
    """Steps 1-2 up to the plans: the nnU-Net environment of ``out``, the raw dataset, nnU-Net's fingerprint and
    plans (``planning``: options of ``plan_experiments``). Returns the folders (``raw``, ``pre``, ``res``,
    ``images``) and the plans file."""
    folders = {n: os.path.join(out, f) for n, f in (("raw", "raw"), ("pre", "preprocessed"), ("res", "results"),
                                                    ("images", "images"))}
    os.environ.update(nnUNet_raw=folders["raw"], nnUNet_preprocessed=folders["pre"], nnUNet_results=folders["res"],
                      nnUNet_n_proc_DA="1", nnUNet_compile="false")
    import torch  # noqa: PLC0415 - after the environment is set
    torch.set_num_threads(2)
    make_raw(folders["raw"], folders["images"])
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (  # noqa: PLC0415
        extract_fingerprints, plan_experiments)
    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor  # noqa: PLC0415
    from nnunetv2.preprocessing.preprocessors import default_preprocessor  # noqa: PLC0415
    fingerprint_extractor.multiprocessing = default_preprocessor.multiprocessing = InProcess
    extract_fingerprints([901], num_processes=1, check_dataset_integrity=False, verbose=False)
    plan_experiments([901], **planning)
    folders["plans"] = os.path.join(folders["pre"], DATASET, "nnUNetPlans.json")
    return folders


def train(folders: dict, configurations) -> None:
    """Steps 2-3 after the plans: shrink them, preprocess ``configurations`` and train each (seed 0 for torch,
    numpy and ``random``: nnU-Net's data loading and augmentation draw from all three, so an unseeded run trains
    another model every time)."""
    import random  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess  # noqa: PLC0415
    shrink_plans(folders["plans"])
    preprocess([901], configurations=tuple(configurations), num_processes=[1] * len(configurations), verbose=False)
    from batchgenerators.utilities.file_and_folder_operations import load_json  # noqa: PLC0415
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: PLC0415
    os.environ["nnUNet_n_proc_DA"] = "0"  # training batches in this process
    plans = load_json(folders["plans"])
    dataset_json = load_json(os.path.join(folders["pre"], DATASET, "dataset.json"))
    for configuration in configurations:
        torch.manual_seed(0)
        np.random.seed(0)
        random.seed(0)
        plans["continue_training"] = False  # what nnUNetv2_train sets (the trainer pops it)
        trainer = nnUNetTrainer(plans, configuration, "all", dataset_json, device=torch.device("cpu"))
        trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = \
            1, TRAIN_ITERATIONS, 1
        trainer.run_training()


def predict(folders: dict, tests: dict) -> dict:
    """Step 4: ``{"configuration/test/plain|tta/seg|probabilities": array}`` for ``tests`` (configuration ->
    names of test images), with and without mirroring."""
    import torch  # noqa: PLC0415
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor  # noqa: PLC0415
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO  # noqa: PLC0415
    oracle = {}
    for configuration, names in tests.items():
        folder = os.path.join(folders["res"], DATASET, "nnUNetTrainer__nnUNetPlans__%s" % configuration)
        for tta in (False, True):
            predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=tta,
                                        perform_everything_on_device=False, device=torch.device("cpu"),
                                        verbose=False, allow_tqdm=False)
            predictor.initialize_from_trained_model_folder(folder, use_folds=("all",),
                                                           checkpoint_name="checkpoint_final.pth")
            for name in names:
                data, props = SimpleITKIO().read_images([os.path.join(folders["images"], "%s.nii.gz" % name)])
                seg, probs = predictor.predict_single_npy_array(data, {"spacing": props["spacing"]}, None, None, True)
                key = "%s/%s/%s" % (configuration, name, "tta" if tta else "plain")
                oracle[key + "/seg"] = seg.astype(np.uint8)
                oracle[key + "/probabilities"] = probs.astype(np.float32)
    return oracle


def finish(out: str, oracle: dict, started: float, configurations, **record) -> None:
    """``oracle.npz`` and ``done.json`` (versions, seconds, configurations, tests, dataset and ``record``)."""
    import torch  # noqa: PLC0415
    from importlib.metadata import version  # noqa: PLC0415
    np.savez_compressed(os.path.join(out, "oracle.npz"), **oracle)
    with open(os.path.join(out, "done.json"), "w") as handle:
        json.dump(dict({"nnunetv2": version("nnunetv2"), "torch": torch.__version__,
                        "seconds": time.time() - started, "configurations": list(configurations),
                        "tests": list(TESTS), "dataset": DATASET}, **record), handle)


def main(out: str) -> None:
    started = time.time()
    folders = prepare(out)
    train(folders, CONFIGURATIONS)
    oracle = predict(folders, {c: TESTS if c == "3d_fullres" else ("flipped",)  # 2d: slice by slice, slow
                               for c in CONFIGURATIONS})
    finish(out, oracle, started, CONFIGURATIONS)


if __name__ == "__main__":
    main(sys.argv[1])
