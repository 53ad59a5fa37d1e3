"""Cohort audit: explain and score every case of a test set, resumable, one tidy table per cohort.

A *manifest* (CSV) lists the cases, one row each: ``case_id``, the image (``image``, or ``image_1``, ``image_2``...
for a model with several input channels, stacked in that order), an optional ``reference`` segmentation and an
optional target (``class``: index or name; ``segment``: a mask file explained instead of the model's prediction,
with ``label``: its value to use). Relative paths are read from the manifest's folder.

For every case :func:`run_case` does what :class:`CohortOptions` asks (heatmap, mean SA score, prediction, the quick
check of the heatmap: its verdict and numbers become columns of the table) and
writes ``<out>/cases/<case_id>/``: ``prediction.nii.gz``, ``heatmap.nii.gz`` (float32, on the case's grid) and
``result.json`` (the table row, the case's hash and the provenance). The folder is written under a temporary name
and renamed into place, so a case folder is either complete or absent. The hash covers the input files' contents,
the model (spec, the contents of its files, model arguments, card) and the options (:func:`case_key`): a case whose
folder holds the same hash is not computed again (an interrupted run continues where it stopped), and a failing
case is recorded with its error while the others go on (its failure is kept too; ``retry_failed`` reruns it).

:func:`run_cohort` runs the cases in this process (``scheduler="none"``) or on Dask
(:mod:`.cohort_cluster`: a local cluster by default, a running scheduler, or dask-jobqueue) and returns the table
(:func:`cohort_table`) as a pandas DataFrame, also written as ``<out>/cohort.csv`` (and ``cohort.parquet`` where
pyarrow is installed). The model is loaded once per process and reused for every case (:func:`cached_model`).

This module imports pandas only to build the table and Dask only in :mod:`.cohort_cluster`.
"""

import csv
import hashlib
import json
import math
import os
import re
import shutil
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .. import __version__, catalog
from ..errors import InputError
from ..geometry import Geometry
from .measures import dice
from .provenance import dumps

#: version of the case folder layout and of the hash recipe (a change recomputes every case)
CASE_FORMAT = 1
CASES_DIR = "cases"
RESULT_FILE = "result.json"
PREDICTION_FILE = "prediction.nii.gz"
HEATMAP_FILE = "heatmap.nii.gz"
TABLE_FILE = "cohort.csv"
PARQUET_FILE = "cohort.parquet"
#: the columns of the table, in order (``*_s`` are timings in seconds)
COLUMNS = ("case_id", "class", "status", "error", "dice", "mean_sa", "sa_rank", "flagged", "heat_in_target",
           "heat_out_target", "check_verdict", "check_rho", "check_deletion_auc", "check_deletion_auc_random",
           "prediction_voxels", "reference_voxels", "read_s", "explain_s", "sa_s",
           "predict_s", "total_s", "reused", "key")
#: columns that change from run to run even when the results do not
RUN_COLUMNS = ("read_s", "explain_s", "sa_s", "predict_s", "total_s", "reused")
#: a case_id names a folder: letters, digits, ``.``, ``_``, ``-``
CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
IMAGE_COLUMN = re.compile(r"^image(_\d+)?$")
#: share of the scored cases flagged for review: the lowest mean SA scores (at least one case)
FLAG_FRACTION = 0.25


# ---------------------------------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class Case:
    """One row of the manifest, paths absolute."""

    case_id: str
    images: Tuple[str, ...]
    reference: Optional[str] = None
    class_: Optional[str] = None
    segment: Optional[str] = None
    label: Optional[float] = None

    def inputs(self) -> Dict[str, str]:
        """Every input file by its role (hashed, never written)."""
        out = {"image" if len(self.images) == 1 else "image_%d" % (i + 1): p for i, p in enumerate(self.images)}
        if self.reference:
            out["reference"] = self.reference
        if self.segment:
            out["segment"] = self.segment
        return out


def _image_columns(header: Sequence[str]) -> List[str]:
    columns = [c for c in header if IMAGE_COLUMN.match(c)]
    numbered = sorted((c for c in columns if c != "image"), key=lambda c: int(c.split("_")[1]))
    return (["image"] if "image" in columns else []) + numbered


def read_manifest(path: str) -> List[Case]:
    """The cases of a manifest CSV, checked: the required columns, non-empty unique ``case_id`` values that can
    name a folder, an image on every row, ``label`` a number. Missing or unreadable image files are not checked
    here: such a case fails alone when it runs.

    Example:
        >>> import os, tempfile
        >>> folder = tempfile.mkdtemp()
        >>> with open(os.path.join(folder, "m.csv"), "w") as f:
        ...     _ = f.write("case_id,image,reference\\nc1,scans/c1.nii.gz,masks/c1.nii.gz\\n")
        >>> case = read_manifest(os.path.join(folder, "m.csv"))[0]
        >>> case.case_id, os.path.relpath(case.images[0], folder)
        ('c1', 'scans/c1.nii.gz')
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError("manifest %r does not exist; give a CSV file with the columns case_id, image "
                         "[, reference, class, segment, label]" % path)
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError("cannot read the manifest %r: %s; give a UTF-8 CSV file" % (path, exc)) from exc
    images = _image_columns(header)
    if "case_id" not in header or not images:
        raise InputError("manifest %r has the columns %s; it needs case_id and image (or image_1, image_2, ... "
                         "for several input channels), optionally reference, class, segment, label"
                         % (path, ", ".join(header) or "(none)"))
    if not rows:
        raise InputError("manifest %r lists no cases; add one row per case" % path)

    def resolve(value: str) -> Optional[str]:
        return os.path.normpath(os.path.join(folder, os.path.expanduser(value))) if value else None

    cases, seen = [], set()
    for number, row in enumerate(rows, start=2):
        case_id = row.get("case_id", "")
        if not CASE_ID.match(case_id):
            raise InputError("manifest %r line %d: case_id %r is empty or not a folder name; use letters, digits, "
                             "'.', '_' and '-'" % (path, number, case_id))
        if case_id in seen:
            raise InputError("manifest %r line %d: case_id %r occurs twice; every case needs its own id"
                             % (path, number, case_id))
        seen.add(case_id)
        paths = [row.get(c, "") for c in images]
        if not all(paths):
            raise InputError("manifest %r line %d (case %s): an image column (%s) is empty; give every image"
                             % (path, number, case_id, ", ".join(images)))
        label = row.get("label") or None
        if label is not None:
            try:
                label = float(label)
            except ValueError as exc:
                raise InputError("manifest %r line %d (case %s): label must be a number, got %r"
                                 % (path, number, case_id, label)) from exc
        cases.append(Case(case_id, tuple(resolve(p) for p in paths), resolve(row.get("reference", "")),
                          row.get("class") or None, resolve(row.get("segment", "")), label))
    return cases


# ---------------------------------------------------------------------------------------------- hashing
def file_hash(path: str) -> str:
    """sha256 of a file's contents; of every file under a folder (with their relative names); ``missing``."""
    digest = hashlib.sha256()
    if os.path.isdir(path):
        for folder, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(folder, name)
                digest.update(os.path.relpath(full, path).encode() + b"\0")
                digest.update(file_hash(full).encode())
        return digest.hexdigest()
    if not os.path.isfile(path):
        return "missing"
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelSpec:
    """What :func:`~SegHiResCAMLib.models.load_model` needs, as plain data (sent to every worker).

    ``card``: a :class:`~SegHiResCAMLib.models.card.ModelCard`, ``None`` (``<model>.card.json`` next to the model
    when there is one) or ``False`` (no card); ``model_args``: JSON text of the factory's keyword arguments.
    """

    spec: str
    weights: Optional[str] = None
    model_args: Optional[str] = None
    trust_model: bool = False
    card: object = None

    def fingerprint(self) -> dict:
        """The model's identity for the case hash, without loading it: the spec, the contents of the spec's
        file or folder and of the weights, the factory's source file, the arguments and the card."""
        from ..models.card import as_card, find_card
        files = {}
        for what, path in (("spec", self.spec), ("weights", self.weights)):
            if path and os.path.exists(path):
                files[what] = file_hash(path)
        if ":" in self.spec and "spec" not in files:  # package.module:factory or file.py:factory
            left = self.spec.rsplit(":", 1)[0]
            source = left if left.endswith(".py") else _module_file(left)
            if source:
                files["factory_source"] = file_hash(source)
        card = self.card if self.card is not None else find_card(self.spec)
        card = as_card(card) if card else None
        return {"spec": self.spec, "files": files, "model_args": json.loads(self.model_args or "{}"),
                "card": card.describe() if card is not None else None}

    def absolute(self) -> "ModelSpec":
        """The same model with its files named by absolute paths (workers may run in another folder)."""
        import dataclasses
        spec = self.spec
        if os.path.exists(spec):
            spec = os.path.abspath(spec)
        elif ":" in spec and spec.rsplit(":", 1)[0].endswith(".py") and os.path.isfile(spec.rsplit(":", 1)[0]):
            spec = "%s:%s" % (os.path.abspath(spec.rsplit(":", 1)[0]), spec.rsplit(":", 1)[1])
        return dataclasses.replace(self, spec=spec, weights=os.path.abspath(self.weights) if self.weights else None)

    def load(self):
        from ..models import load_model
        return load_model(self.spec, weights=self.weights, trust_model=self.trust_model, model_card=self.card,
                          **({"model_args": json.loads(self.model_args)} if self.model_args else {}))


def _module_file(name: str) -> Optional[str]:
    import importlib.util
    try:
        found = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    return found.origin if found is not None and found.origin and os.path.isfile(found.origin) else None


@dataclass(frozen=True)
class CohortOptions:
    """What is computed for every case, and how.

    Attributes:
        explain: a heatmap of the target (``method`` at ``layer``) and its mass in/out of the target.
        sa_score: the mean SA score (ProtoSeg; ground-truth free) with ``sa_layers`` (``features``: one pass).
        predict: the prediction (always written; alone, one forward pass without gradients).
        quick_check: ``"quick"``: the quick check of the heatmap (:mod:`.check`; needs ``explain``): its verdict and its
            numbers (model-randomisation rho in the dilated target, deletion AUC of the map and of a random
            ranking) in the table; ``None``: none (and, then, not part of the hash: earlier results stay valid).
        class_: the class of cases whose manifest gives none (index or name).
        device, threads: where to run; torch threads per process (``None``: leave torch's setting). Neither is
            part of the case hash.
    """

    explain: bool = True
    sa_score: bool = True
    predict: bool = True
    class_: str = "1"
    method: str = catalog.DEFAULT_METHOD
    layer: str = "auto"
    score: str = "logits"
    sa_layers: str = "features"
    device: str = "auto"
    threads: Optional[int] = None
    quick_check: Optional[str] = None

    def describe(self) -> dict:
        """The options that change results (hashed)."""
        out = asdict(self)
        for name in ("device", "threads"):
            out.pop(name)
        if out["quick_check"] in (None, "", "none"):  # without the check: the hash from before the option existed
            out.pop("quick_check")
        return out

    def check(self) -> None:
        if not (self.explain or self.sa_score or self.predict):
            raise InputError("nothing to compute; ask for at least one of explain, sa-score, predict")
        if self.method not in catalog.method_names():
            raise InputError("unknown method %r; choose one of %s" % (self.method, ", ".join(catalog.method_names())))
        if self.score not in catalog.SCORES:
            raise InputError("score must be one of %s, got %r" % (", ".join(catalog.SCORES), self.score))
        if self.threads is not None and self.threads < 1:
            raise InputError("threads must be >= 1, got %r" % self.threads)
        from .check import check_name
        if check_name(self.quick_check) is not None and not self.explain:
            raise InputError("the quick check (--check quick) checks the heatmap; ask for explain (--explain) too")


def case_key(case: Case, model_fingerprint: dict, options: CohortOptions) -> str:
    """The hash that decides whether a finished case folder can be reused: the input files' contents, the
    model's fingerprint, the options and the case's target (not its paths: moving the files keeps the results)."""
    data = {"format": CASE_FORMAT, "inputs": {role: file_hash(p) for role, p in case.inputs().items()},
            "class": case.class_, "label": case.label, "model": model_fingerprint, "options": options.describe()}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------- one case
_MODELS: Dict[str, object] = {}
_MODELS_LOCK = threading.Lock()
#: models loaded by this process (tests check: one per worker, reused across cases)
MODEL_LOADS = [0]


def cached_model(model: ModelSpec):
    """The model of ``model``, loaded once per process (a Dask worker keeps it for every case it runs)."""
    key = json.dumps(asdict(model), sort_keys=True, default=str)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS.clear()  # one model per process: a new spec replaces the previous one
            _MODELS[key] = model.load()
            MODEL_LOADS[0] += 1
        return _MODELS[key]


def read_case(case: Case) -> Tuple[np.ndarray, Geometry, Optional[np.ndarray], Optional[np.ndarray], List[str]]:
    """The image (channels last when there are several), its grid, the reference and the target segment on that
    grid (0/1), and the notes (masks resampled onto the image grid)."""
    from ..imaging.files import read_image
    from ..imaging.resample import read_mask_on_grid
    arrays, geometry = [], None
    for path in case.images:
        array, grid = read_image(path)
        if geometry is not None and not grid.same_grid(geometry):
            raise InputError("case %s: image %r is not on the grid of %r; the channels of a case must share one "
                             "grid" % (case.case_id, path, case.images[0]))
        arrays.append(array)
        geometry = geometry or grid
    image = arrays[0] if len(arrays) == 1 else np.stack(arrays, axis=-1)
    notes: List[str] = []
    reference = segment = None
    if case.reference:
        reference, more = read_mask_on_grid(case.reference, geometry, what="reference", binary=True)
        notes += more
    if case.segment:
        segment, more = read_mask_on_grid(case.segment, geometry, label=case.label, what="segment", binary=True)
        notes += more
    return image, geometry, reference, segment, notes


def compute_case(case: Case, model, options: CohortOptions
                 ) -> Tuple[dict, Dict[str, np.ndarray], Geometry, dict]:
    """The work of one case: its row of measures, its arrays (``prediction``, ``heatmap``) on the case's grid,
    that grid and the provenance. Raises on any failure (:func:`run_case` records it)."""
    from .explain import TargetSpec, explain_image, predict_image
    from .segmentation_ability import sa_score_image
    timings: Dict[str, float] = {}
    t0 = time.perf_counter()
    image, geometry, reference, segment, notes = read_case(case)
    timings["read_s"] = time.perf_counter() - t0
    class_index = model.class_index(case.class_ or options.class_)
    row: dict = {"class": model.class_names[class_index] if 0 <= class_index < model.num_classes
                 else "class%d" % class_index}
    arrays: Dict[str, np.ndarray] = {}
    meta: dict = {"notes": notes, "class_index": class_index}
    if options.explain:
        t0 = time.perf_counter()
        spec = TargetSpec(class_index=class_index, mask=segment, score=options.score)
        result = explain_image(model, image, geometry, [spec], layers=options.layer, method=options.method,
                               device=options.device, check=options.quick_check)
        heat = result.heatmaps[0]
        arrays["heatmap"], arrays["prediction"] = heat.array, result.prediction
        target = segment if segment is not None else (result.prediction == class_index)
        positive = np.clip(heat.array, 0, None)
        mass = float(positive.sum())
        inside = float(positive[target != 0].sum()) / mass if mass > 0 else float("nan")
        row.update(heat_in_target=inside, heat_out_target=1.0 - inside if mass > 0 else float("nan"))
        if "verdict" in result.metadata:
            row.update(check_row(result.metadata))
        meta["explain"] = dict(result.metadata, method=heat.method, layer=heat.layer, cam=heat.info,
                               target_kind=spec.kind())
        timings["explain_s"] = time.perf_counter() - t0
    if options.sa_score:
        t0 = time.perf_counter()
        from .segmentation_ability import layer_rows
        sa = sa_score_image(model, image, geometry, class_index=class_index, layers=options.sa_layers,
                            device=options.device)
        row["mean_sa"] = sa.mean_sa
        arrays.setdefault("prediction", sa.prediction)
        meta["sa_score"] = dict(sa.metadata, feature_layers=sa.report.feature_layers, layers=layer_rows(sa),
                                dead_feature_units=sa.report.info.get("dead_feature_units"))
        timings["sa_s"] = time.perf_counter() - t0
    if "prediction" not in arrays:
        t0 = time.perf_counter()
        arrays["prediction"], meta["predict"] = predict_image(model, image, geometry, device=options.device)
        timings["predict_s"] = time.perf_counter() - t0
    predicted = arrays["prediction"] == class_index
    row["prediction_voxels"] = int(predicted.sum())
    if reference is not None:
        row["dice"] = dice(predicted, reference)
        row["reference_voxels"] = int(np.count_nonzero(reference))
    row.update(timings)
    return row, arrays, geometry, meta


def check_row(metadata: dict) -> dict:
    """The table's check columns from an explanation's metadata (``check="quick"``); NaN where the check did not
    run (e.g. windows)."""
    check = metadata.get("check") or {}
    randomization, deletion = check.get("model_randomization") or {}, check.get("deletion") or {}

    def number(value) -> float:
        return float("nan") if value is None else float(value)

    return {"check_verdict": metadata.get("verdict", ""),
            "check_rho": number(randomization.get("spearman_in_segment")),
            "check_deletion_auc": number(deletion.get("auc")),
            "check_deletion_auc_random": number(deletion.get("auc_random"))}


def case_folder(out: str, case_id: str) -> str:
    return os.path.join(os.fspath(out), CASES_DIR, case_id)


def read_result(out: str, case_id: str) -> Optional[dict]:
    """The ``result.json`` of a finished case, or ``None`` (no folder, or an unreadable file)."""
    try:
        with open(os.path.join(case_folder(out, case_id), RESULT_FILE)) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def _publish(tmp: str, folder: str) -> None:
    """Move the finished temporary folder onto ``folder`` (an older result is moved aside, then removed)."""
    old = None
    if os.path.exists(folder):
        old = os.path.join(os.path.dirname(folder), ".old-%s-%s" % (uuid.uuid4().hex[:8], os.path.basename(folder)))
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def error_text(exc: BaseException) -> str:
    """The one-line error of a failed case: the exception's type and message."""
    return "%s: %s" % (type(exc).__name__, " ".join(str(exc).split()))


def _write_case(case: Case, model: ModelSpec, options: CohortOptions, out: str, key: str, row: dict, meta: dict,
                arrays: Dict[str, np.ndarray], geometry: Optional[Geometry], error: str, started: float) -> dict:
    """Write the case folder (images and ``result.json``) under a temporary name, then rename it into place."""
    import torch
    from ..imaging.files import write_image
    folder = case_folder(out, case.case_id)
    tmp = os.path.join(os.path.dirname(folder), ".tmp-%s-%s" % (uuid.uuid4().hex[:8], case.case_id))
    os.makedirs(tmp)
    try:
        if not error:
            try:
                for name, array in arrays.items():
                    write_image(os.path.join(tmp, HEATMAP_FILE if name == "heatmap" else PREDICTION_FILE), array,
                                geometry, protect=list(case.inputs().values()))
            except Exception as exc:  # noqa: BLE001 - a failed write fails this case only
                row, meta, error = {"class": row.get("class")}, {"traceback": traceback.format_exc()}, error_text(exc)
                for name in os.listdir(tmp):
                    os.remove(os.path.join(tmp, name))
        status = "failed" if error else "done"
        row = dict(row, case_id=case.case_id, status=status, error=error, key=key,
                   total_s=time.perf_counter() - started)
        record = {"format": CASE_FORMAT, "key": key, "row": row, "case": asdict(case),
                  "files": {"prediction": PREDICTION_FILE if status == "done" else None,
                            "heatmap": HEATMAP_FILE if status == "done" and "heatmap" in arrays else None},
                  "options": options.describe(), "model": model.spec, "seghirescam_version": __version__,
                  "worker": {"host": socket.gethostname(), "pid": os.getpid(), "threads": torch.get_num_threads()},
                  "provenance": meta}
        with open(os.path.join(tmp, RESULT_FILE), "w") as handle:
            handle.write(dumps(record))
        _publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return row


def run_case(case: Case, model: ModelSpec, options: CohortOptions, out: str, key: str) -> dict:
    """Compute one case and write its folder atomically; returns its row. A failure is recorded (status
    ``failed`` and its one-line error) instead of raised; ``KeyboardInterrupt`` stops the run and writes
    nothing for this case. Runs in the calling process or in a Dask worker."""
    from ..engine.outputs import flush_denormals
    import torch
    flush_denormals()
    if options.threads:
        torch.set_num_threads(options.threads)
    started = time.perf_counter()
    try:
        row, arrays, geometry, meta = compute_case(case, cached_model(model), options)
        error = ""
    except Exception as exc:  # noqa: BLE001 - any failure of one case is recorded; the others go on
        row, arrays, geometry = {"class": case.class_ or options.class_}, {}, None
        meta, error = {"traceback": traceback.format_exc()}, error_text(exc)
    return _write_case(case, model, options, out, key, row, meta, arrays, geometry, error, started)


def record_failure(job: tuple, exc: BaseException) -> dict:
    """Record a case whose task failed outside :func:`run_case` (e.g. its Dask worker died); ``job`` holds
    :func:`run_case`'s arguments. Returns its row."""
    case, model, options, out, key = job
    meta = {"traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))}
    return _write_case(case, model, options, out, key, {"class": case.class_ or options.class_}, meta, {}, None,
                       error_text(exc), time.perf_counter())


# ---------------------------------------------------------------------------------------------- the table
def _rank(rows: List[dict]) -> None:
    """``sa_rank`` (1 = lowest mean SA score = likeliest failure) and ``flagged`` (failed cases, and the lowest
    :data:`FLAG_FRACTION` of the scored ones)."""
    scored = sorted((r for r in rows if isinstance(r.get("mean_sa"), float) and math.isfinite(r["mean_sa"])),
                    key=lambda r: (r["mean_sa"], r["case_id"]))
    flag = max(1, int(math.ceil(FLAG_FRACTION * len(scored)))) if scored else 0
    for rank, row in enumerate(scored, start=1):
        row["sa_rank"] = rank
        row["flagged"] = rank <= flag
    for row in rows:
        row.setdefault("sa_rank", None)
        row["flagged"] = bool(row.get("flagged")) or row.get("status") == "failed"


def cohort_table(cases: Sequence[Case], out: str, reused: Sequence[str] = ()):
    """The table of a cohort from its case folders, one row per case in manifest order (:data:`COLUMNS`);
    a case without a folder is ``pending``. ``reused``: the case ids taken from an earlier run."""
    import pandas as pd
    rows = []
    for case in cases:
        record = read_result(out, case.case_id)
        row = dict(record["row"]) if record else {"case_id": case.case_id, "status": "pending", "error": ""}
        row = {k: (float("nan") if v is None and k not in ("error", "class", "sa_rank", "check_verdict") else v)
               for k, v in row.items()}
        row["reused"] = case.case_id in reused
        rows.append(row)
    _rank(rows)
    frame = pd.DataFrame([{c: row.get(c) for c in COLUMNS} for row in rows], columns=list(COLUMNS))
    for column in ("dice", "mean_sa", "heat_in_target", "heat_out_target", "check_rho", "check_deletion_auc",
                   "check_deletion_auc_random", "read_s", "explain_s",
                   "sa_s", "predict_s", "total_s", "prediction_voxels", "reference_voxels"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    frame["sa_rank"] = frame["sa_rank"].astype("Int64")
    frame["error"] = frame["error"].fillna("")
    frame["check_verdict"] = frame["check_verdict"].fillna("")
    return frame


def write_table(frame, out: str) -> List[str]:
    """``cohort.csv`` (and ``cohort.parquet`` where pyarrow is installed), atomically; returns the paths."""
    from ..imaging.files import atomic_write
    written = [os.path.join(out, TABLE_FILE)]
    atomic_write(written[0], lambda tmp: frame.to_csv(tmp, index=False))
    import importlib.util
    if importlib.util.find_spec("pyarrow") is None:  # optional: no Parquet copy without it
        return written
    written.append(os.path.join(out, PARQUET_FILE))
    atomic_write(written[1], lambda tmp: frame.to_parquet(tmp, index=False))
    return written


def read_table(out: str) -> List[Dict[str, str]]:
    """The rows of a finished cohort's ``cohort.csv`` as text (no pandas: the Slicer side reads it)."""
    path = os.path.join(os.fspath(out), TABLE_FILE)
    if not os.path.isfile(path):
        raise InputError("%r holds no %s; give the --out folder of a finished `seghirescam cohort` run"
                         % (out, TABLE_FILE))
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------------------------- the run
@dataclass
class Plan:
    """The cases of a run: ``todo`` (case, key) pairs to compute, ``reused`` case ids already finished."""

    cases: List[Case]
    todo: List[Tuple[Case, str]] = field(default_factory=list)
    reused: List[str] = field(default_factory=list)


def plan_cohort(cases: Sequence[Case], out: str, model: ModelSpec, options: CohortOptions,
                retry_failed: bool = False) -> Plan:
    """Which cases need work: those without a finished folder of the same hash (and, with ``retry_failed``,
    those whose recorded result is a failure)."""
    fingerprint = model.fingerprint()
    plan = Plan(list(cases))
    for case in cases:
        key = case_key(case, fingerprint, options)
        record = read_result(out, case.case_id)
        if record and record.get("key") == key and not (retry_failed and record["row"].get("status") == "failed"):
            plan.reused.append(case.case_id)
        else:
            plan.todo.append((case, key))
    return plan


def clean_temporary(out: str) -> None:
    """Remove what a killed run left half-made (``.tmp-*`` and ``.old-*`` folders under ``cases/``)."""
    folder = os.path.join(out, CASES_DIR)
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.startswith((".tmp-", ".old-")):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def run_loop(function: Callable[..., dict], jobs: List[tuple], done: Callable[[dict], None]) -> None:
    """Run the jobs one after the other in this process (``scheduler="none"``)."""
    for args in jobs:
        done(function(*args))


def run_cohort(manifest, out: str, model, options: Optional[CohortOptions] = None, scheduler: str = "local",
               workers: Optional[int] = None, cluster: Optional[str] = None, worker_memory: Optional[str] = None,
               retry_failed: bool = False, progress: bool = True, log: Callable[[str], None] = None):
    """Run a cohort and return its table (a pandas DataFrame, also written to ``out``).

    Args:
        manifest: the manifest CSV path, or a list of :class:`Case`.
        out: the output folder (``cases/<case_id>/`` and ``cohort.csv``); rerunning into it resumes.
        model: a :class:`ModelSpec` or a spec string.
        options: :class:`CohortOptions` (default: explain, SA score and prediction of class 1).
        scheduler: ``local`` (a Dask LocalCluster of worker processes sized to this machine), ``none`` (a plain
            loop in this process, no Dask needed) or a scheduler address (``tcp://host:8786``).
        workers: number of worker processes (``0``: the plain loop).
        cluster: ``slurm`` or ``pbs``: workers as batch jobs through dask-jobqueue.
        worker_memory: memory per worker, e.g. ``"6GiB"`` (sizes the local cluster).
        retry_failed: compute the cases recorded as failed again.
        progress: a progress bar (tqdm, with ETA) over the cases on stderr.
        log: where to print one-line notes (the dashboard link); default stderr.
    """
    options = options or CohortOptions()
    options.check()
    if not (scheduler in (None, "none", "local") or (isinstance(scheduler, str) and "://" in scheduler)):
        raise InputError("--scheduler must be local, none or a scheduler address such as tcp://host:8786, got %r"
                         % (scheduler,))
    model = (model if isinstance(model, ModelSpec) else ModelSpec(str(model))).absolute()
    say = log or (lambda text: print(text, file=sys.stderr))
    cases = read_manifest(manifest) if isinstance(manifest, (str, os.PathLike)) else list(manifest)
    out = os.path.abspath(os.fspath(out))
    os.makedirs(os.path.join(out, CASES_DIR), exist_ok=True)
    clean_temporary(out)
    plan = plan_cohort(cases, out, model, options, retry_failed)
    if plan.reused:
        say("seghirescam: %d of %d cases already done with the same inputs, model and options: reused"
            % (len(plan.reused), len(cases)))
    jobs = [(case, model, options, out, key) for case, key in plan.todo]
    bar = CaseProgress(len(jobs), progress)
    try:
        if jobs:
            if scheduler in (None, "none") or workers == 0:
                run_loop(run_case, jobs, bar)
            else:
                from .cohort_cluster import run_on_dask
                run_on_dask(run_case, jobs, bar, scheduler=scheduler, workers=workers, cluster=cluster,
                            worker_memory=worker_memory, threads=options.threads, log=say, on_error=record_failure)
    finally:
        bar.close()
    frame = cohort_table(cases, out, plan.reused)
    write_table(frame, out)
    return frame


class CaseProgress:
    """tqdm over cases (ETA from the finished ones); called with each finished row."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled and total:
            from tqdm import tqdm
            self.bar = tqdm(total=total, unit="case", file=sys.stderr, desc="cohort", dynamic_ncols=True)

    def __call__(self, row: dict) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str("%s %s" % (row.get("case_id"), row.get("status")), refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
