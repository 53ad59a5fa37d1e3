"""TotalSegmentator by name: ``totalseg:TASK`` (and ``--structure NAME``) finds the installed nnU-Net weights.

TotalSegmentator keeps its weights under ``$TOTALSEG_HOME_DIR`` (default ``~/.totalsegmentator``) as nnU-Net
results folders::

    nnunet/results/Dataset291_TotalSegmentator_part1_organs_1559subj/nnUNetTrainerNoMirroring__nnUNetPlans__3d_fullres/
        dataset.json  plans.json  fold_0/checkpoint_final.pth

A task is one or several such datasets (``total`` is five parts: organs, vertebrae, cardiac, muscles, ribs).
``structure`` picks the part whose ``dataset.json`` labels hold that name (``liver`` -> part 1); the model is then
that part's nnU-Net model (:func:`.loader.load_nnunet`) and ``structure`` its class. Nothing is downloaded:
weights that are not installed are an error that says how to install them (``totalseg_download_weights``).
"""

import json
import os
import re
from typing import Dict, List, Optional, Tuple

from ...errors import ModelError
from ..base import SegModel
from .loader import is_nnunet_folder, load_nnunet

PREFIX = "totalseg:"
#: TotalSegmentator's tasks and their nnU-Net dataset ids (TotalSegmentator 2.x, ``python_api.py``)
TASKS: Dict[str, Tuple[int, ...]] = {
    "total": (291, 292, 293, 294, 295),
    "total_fast": (297,),
    "total_fastest": (298,),
    "total_mr": (850, 851),
    "total_fast_mr": (852,),
    "body": (299,),
    "body_fast": (300,),
    "lung_vessels": (258,),
    "cerebral_bleed": (150,),
    "hip_implant": (260,),
    "pleural_pericard_effusion": (315,),
    "head_glands_cavities": (775,),
    "headneck_bones_vessels": (776,),
    "head_muscles": (777,),
    "headneck_muscles": (778, 779),
    "liver_vessels": (8,),
    "heartchambers_highres": (301,),
    "appendicular_bones": (304,),
    "tissue_types": (481,),
    "vertebrae_body": (302,),
}


def accepts(spec: str) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def home() -> str:
    """``$TOTALSEG_HOME_DIR``, else ``~/.totalsegmentator``."""
    return os.environ.get("TOTALSEG_HOME_DIR") or os.path.join(os.path.expanduser("~"), ".totalsegmentator")


def _model_folders(dataset_id: int) -> List[str]:
    results = os.path.join(home(), "nnunet", "results")
    if not os.path.isdir(results):
        return []
    out = []
    for name in sorted(os.listdir(results)):
        if re.match(r"Dataset0*%d_" % dataset_id, name):
            base = os.path.join(results, name)
            out += [os.path.join(base, sub) for sub in sorted(os.listdir(base)) if is_nnunet_folder(os.path.join(base, sub))]
    return out


def _labels(folder: str) -> List[str]:
    try:
        with open(os.path.join(folder, "dataset.json"), encoding="utf-8") as handle:
            table = json.load(handle).get("labels") or {}
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelError("cannot read the labels of %s: %s" % (os.path.join(folder, "dataset.json"), exc)) from exc
    return [k for k in table if k not in ("background", "ignore")]


def find(task: str, structure: Optional[str] = None) -> str:
    """The installed model folder of ``task`` (the part that holds ``structure`` when given)."""
    if task not in TASKS:
        raise ModelError("unknown TotalSegmentator task %r; known: %s" % (task, ", ".join(sorted(TASKS))))
    folders = [f for d in TASKS[task] for f in _model_folders(d)]
    missing = [d for d in TASKS[task] if not _model_folders(d)]
    if not folders:
        raise ModelError("the weights of TotalSegmentator's task %r (nnU-Net datasets %s) are not installed under %s; "
                         "install them with `totalseg_download_weights -t %s` or set TOTALSEG_HOME_DIR"
                         % (task, ", ".join(str(d) for d in TASKS[task]), os.path.join(home(), "nnunet", "results"),
                            task))
    if structure is None:
        if len(folders) > 1:
            raise ModelError("TotalSegmentator's task %r has %d parts; choose one by a structure it segments "
                             "(--structure NAME), e.g. %s" % (task, len(folders), ", ".join(
                                 _labels(f)[0] for f in folders if _labels(f))))
        return folders[0]
    wanted = structure.lower()
    for folder in folders:
        if wanted in (name.lower() for name in _labels(folder)):
            return folder
    known = sorted(n for f in folders for n in _labels(f))
    raise ModelError("TotalSegmentator's task %r segments no structure %r%s; its structures: %s" % (
        task, structure, " (parts %s are not installed)" % ", ".join(str(d) for d in missing) if missing else "",
        ", ".join(known[:60]) + (" ..." if len(known) > 60 else "")))


def load(spec: str, weights: Optional[str] = None, trust_model: bool = False, structure: Optional[str] = None,
         **options) -> SegModel:
    """``totalseg:TASK`` as a :class:`SegModel` (see the module docstring); ``structure`` picks the part."""
    task = spec[len(PREFIX):]
    folder = find(task, structure)
    model = load_nnunet(folder, weights=weights, trust_model=trust_model, **options)
    model.name = "totalseg:%s/%s" % (task, os.path.basename(os.path.dirname(folder)))
    model.source = "TotalSegmentator task %s: %s" % (task, model.source)
    return model
