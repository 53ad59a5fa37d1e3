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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nnunet_oracle as base  # noqa: E402

CONFIGURATION = "3d_lowres"
GPU_MEMORY_TARGET_GB = 0.01


def main(out: str) -> None:
    started = time.time()
    folders = base.prepare(out, gpu_memory_target_in_gb=GPU_MEMORY_TARGET_GB)
    with open(folders["plans"]) as handle:
        if CONFIGURATION not in json.load(handle)["configurations"]:
            raise SystemExit("nnU-Net's planner made no %s configuration" % CONFIGURATION)
    base.train(folders, (CONFIGURATION,))
    oracle = base.predict(folders, {CONFIGURATION: base.TESTS})
    base.finish(out, oracle, started, (CONFIGURATION,), gpu_memory_target_in_gb=GPU_MEMORY_TARGET_GB)


if __name__ == "__main__":
    main(sys.argv[1])
