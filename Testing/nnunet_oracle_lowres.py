"""The ``3d_lowres`` oracle: nnU-Net's planner drops ``3d_lowres`` for the tiny dataset of
``nnunet_oracle.py`` (the 3d_fullres patch already covers the median image), unless it plans for a very small
GPU: with ``gpu_memory_target_in_gb=0.01`` the 3d_fullres patch shrinks to 6 x 20 x 20 voxels and the planner adds
a 3d_lowres configuration (spacing 3.43 x 1.6 x 1.6 mm, patch 8 x 20 x 16). Same data, plans shrunk and training
as ``nnunet_oracle.py``; only ``3d_lowres`` is preprocessed, trained and predicted (the test images, without and
with mirroring).

Run as a script (``python nnunet_oracle_lowres.py OUT``) in a fresh process, like ``nnunet_oracle.py``.
"""

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nnunet_oracle as base  # noqa: E402

CONFIGURATION = "3d_lowres"
GPU_MEMORY_TARGET_GB = 0.01


def main(out: str) -> None:
    started = time.time()
    raw, pre, res = (os.path.join(out, n) for n in ("raw", "preprocessed", "results"))
    os.environ.update(nnUNet_raw=raw, nnUNet_preprocessed=pre, nnUNet_results=res, nnUNet_n_proc_DA="1",
                      nnUNet_compile="false")
    import torch  # noqa: PLC0415 - after the environment is set
    torch.set_num_threads(2)
    images = os.path.join(out, "images")
    base.make_raw(raw, images)
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (  # noqa: PLC0415
        extract_fingerprints, plan_experiments, preprocess)
    from nnunetv2.experiment_planning.dataset_fingerprint import fingerprint_extractor  # noqa: PLC0415
    from nnunetv2.preprocessing.preprocessors import default_preprocessor  # noqa: PLC0415
    fingerprint_extractor.multiprocessing = default_preprocessor.multiprocessing = base._InProcess
    extract_fingerprints([901], num_processes=1, check_dataset_integrity=False, verbose=False)
    plan_experiments([901], gpu_memory_target_in_gb=GPU_MEMORY_TARGET_GB)
    plans_file = os.path.join(pre, base.DATASET, "nnUNetPlans.json")
    with open(plans_file) as handle:
        if CONFIGURATION not in json.load(handle)["configurations"]:
            raise SystemExit("nnU-Net's planner made no %s configuration" % CONFIGURATION)
    base.shrink_plans(plans_file)
    preprocess([901], configurations=(CONFIGURATION,), num_processes=[1], verbose=False)
    from batchgenerators.utilities.file_and_folder_operations import load_json  # noqa: PLC0415
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: PLC0415
    os.environ["nnUNet_n_proc_DA"] = "0"
    plans = load_json(plans_file)
    dataset_json = load_json(os.path.join(pre, base.DATASET, "dataset.json"))
    torch.manual_seed(0)
    plans["continue_training"] = False
    trainer = nnUNetTrainer(plans, CONFIGURATION, "all", dataset_json, device=torch.device("cpu"))
    trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch = \
        1, base.TRAIN_ITERATIONS, 1
    trainer.run_training()
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor  # noqa: PLC0415
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO  # noqa: PLC0415
    oracle = {}
    folder = os.path.join(res, base.DATASET, "nnUNetTrainer__nnUNetPlans__%s" % CONFIGURATION)
    for tta in (False, True):
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=tta,
                                    perform_everything_on_device=False, device=torch.device("cpu"),
                                    verbose=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(folder, use_folds=("all",),
                                                       checkpoint_name="checkpoint_final.pth")
        for name in base.TESTS:
            data, props = SimpleITKIO().read_images([os.path.join(images, "%s.nii.gz" % name)])
            seg, probs = predictor.predict_single_npy_array(data, {"spacing": props["spacing"]}, None, None, True)
            key = "%s/%s/%s" % (CONFIGURATION, name, "tta" if tta else "plain")
            oracle[key + "/seg"] = seg.astype(np.uint8)
            oracle[key + "/probabilities"] = probs.astype(np.float32)
    np.savez_compressed(os.path.join(out, "oracle.npz"), **oracle)
    from importlib.metadata import version  # noqa: PLC0415
    with open(os.path.join(out, "done.json"), "w") as handle:
        json.dump({"nnunetv2": version("nnunetv2"), "torch": torch.__version__, "seconds": time.time() - started,
                   "configurations": [CONFIGURATION], "tests": list(base.TESTS), "dataset": base.DATASET,
                   "gpu_memory_target_in_gb": GPU_MEMORY_TARGET_GB}, handle)


if __name__ == "__main__":
    main(sys.argv[1])
