"""The panel's texts, from plain data (no ``slicer``, ``qt``, ``vtk``, torch): what a radiologist reads.

- :func:`resultSummary`: the "what am I looking at" line under a result: method, layer, target, model, and the
  verdict of an evaluation of that heatmap when one was run (:func:`evaluationVerdict`);
- :func:`progressText`: the progress line: the stage the computation is in, the percentage and an estimate of
  the time left (:func:`remainingSeconds`, :func:`formatDuration`).

Example:
    >>> resultSummary({"method": "seg-hires-grad-cam", "layer": "context5", "target": "model prediction",
    ...                "classIndex": "1", "className": "brain", "model": "hd-bet"})
    'seg-hires-grad-cam at layer context5 | target: model prediction, class 1 (brain) | model: hd-bet'
    >>> resultSummary({"method": "layer-cam", "layer": "dec", "target": "segment", "model": "toy",
    ...                "checkVerdict": "passes model randomisation (rho 0.10)"})
    'layer-cam at layer dec | target: segment | model: toy | check: passes model randomisation (rho 0.10)'
    >>> progressText("forward pass", 0.25, 10.0)
    'Forward pass: 25%, about 30 s left'
"""

import math
from typing import Mapping, Optional, Sequence

#: the method of the evaluation's reference row, a random ranking (``analysis.evaluate.RANDOM_ORDER``; not imported
#: from there: that module imports torch)
RANDOM_ORDER = "random-order"
#: between the parts of the summary line
SEPARATOR = " | "
#: the ETA is shown from this fraction and this many seconds on (before, the extrapolation is noise)
ETA_MIN_FRACTION, ETA_MIN_SECONDS = 0.02, 1.0


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def evaluationVerdict(rows: Sequence[Mapping[str, object]], method: str, layer: str) -> str:
    """The evaluation's verdict on the heatmap of ``method`` at ``layer`` ("" when the evaluation has no row for it).

    ``rows`` are :attr:`~SegHiResCAMLib.analysis.evaluate.Evaluation.rows`. The heatmap is compared with the
    random-order reference row: a faithful map has a lower deletion AUC (removing its hottest voxels first
    destroys the prediction sooner) and a higher insertion AUC.

    Example:
        >>> evaluationVerdict([{"method": "seg-grad-cam", "layer": "dec", "deletion_auc": 0.2, "insertion_auc": 0.9},
        ...                    {"method": "random-order", "layer": "-", "deletion_auc": 0.5, "insertion_auc": 0.6}],
        ...                   "seg-grad-cam", "dec")
        'evaluation: more faithful than a random ranking (deletion AUC 0.20 vs 0.50, insertion AUC 0.90 vs 0.60)'
    """
    row = next((r for r in rows if r.get("method") == method and r.get("layer") == layer), None)
    if row is None:
        return ""
    deletion, insertion = _number(row.get("deletion_auc")), _number(row.get("insertion_auc"))
    reference = next((r for r in rows if r.get("method") == RANDOM_ORDER), {})
    randomDeletion, randomInsertion = _number(reference.get("deletion_auc")), _number(reference.get("insertion_auc"))
    if any(math.isnan(v) for v in (deletion, insertion, randomDeletion, randomInsertion)):
        shown = ["n/a" if math.isnan(value) else "%.2f" % value for value in (deletion, insertion)]
        return "evaluation: deletion AUC %s, insertion AUC %s (no comparison with a random ranking)" % tuple(shown)
    better = (deletion < randomDeletion, insertion > randomInsertion)
    verdict = ("more faithful than a random ranking" if all(better)
               else "no more faithful than a random ranking" if not any(better)
               else "better than a random ranking in %s only" % ("deletion" if better[0] else "insertion"))
    return "evaluation: %s (deletion AUC %.2f vs %.2f, insertion AUC %.2f vs %.2f)" % (
        verdict, deletion, randomDeletion, insertion, randomInsertion)


def resultSummary(values: Mapping[str, object]) -> str:
    """One line on a heatmap from its provenance (its ``SegHiResCAM.*`` attributes, without the prefix): method,
    layer, target (with the class name unless it is only "class N"), model, the agreement of an ensemble or TTA
    run's maps (``agreement``, ``members``, ``ensembleKind``: ``mirrorings``, ``folds``, ``weights files``, joined
    by `` x ``) and, when present, ``verdict`` (:func:`evaluationVerdict`), and ``checkVerdict``,
    the line of a quick check (``explain --check quick``).

    Example:
        >>> resultSummary({"method": "seg-grad-cam", "layer": "dec", "target": "model prediction", "model": "m",
        ...                "agreement": "0.912", "members": "8"})
        'seg-grad-cam at layer dec | target: model prediction | model: m | TTA: mean of 8 maps, agreement 0.912'
    """
    target = str(values.get("target") or values.get("targetKind") or "?")
    if values.get("classIndex") not in (None, ""):
        target += ", class %s" % values["classIndex"]
        if str(values.get("className") or "").replace(" ", "") not in ("", "class%s" % values["classIndex"]):
            target += " (%s)" % values["className"]
    parts = ["%s at layer %s" % (values.get("method") or "?", values.get("layer") or "?"), "target: " + target,
             "model: %s" % (values.get("model") or "?")]
    if values.get("agreement") not in (None, ""):  # an ensemble or TTA run: the mean of the members' maps
        kind = str(values.get("ensembleKind") or "")
        parts.append("%s: mean of %s maps, agreement %s" % ("TTA" if kind in ("", "mirrorings") else
                                                            "ensemble of %s" % kind, values.get("members") or "?",
                                                            values["agreement"]))
    if values.get("verdict"):
        parts.append(str(values["verdict"]))
    if values.get("checkVerdict"):
        parts.append("check: %s" % values["checkVerdict"])
    return SEPARATOR.join(parts)


def formatDuration(seconds: float) -> str:
    """``"45 s"``, ``"2 min 05 s"``, ``"1 h 02 min"``."""
    seconds = int(round(max(0.0, seconds)))
    if seconds < 60:
        return "%d s" % seconds
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return "%d min %02d s" % (minutes, seconds)
    return "%d h %02d min" % divmod(minutes, 60)


def remainingSeconds(fraction: float, elapsed: float) -> Optional[float]:
    """The time left if the rest goes as fast as the part done: ``elapsed * (1 - fraction) / fraction``; ``None``
    before :data:`ETA_MIN_FRACTION` and :data:`ETA_MIN_SECONDS` (nothing to extrapolate from yet)."""
    if not ETA_MIN_FRACTION <= fraction < 1.0 or elapsed < ETA_MIN_SECONDS:
        return None
    return elapsed * (1.0 - fraction) / fraction


def progressText(stage: str, fraction: float, elapsed: float) -> str:
    """The progress line: stage, percentage, and the time left (else the time so far, once it is a second).

    Example:
        >>> progressText("loading the model", 0.0, 3.2)
        'Loading the model: 0%, 3 s so far'
    """
    stage = (stage or "working").strip()
    text = "%s: %d%%" % (stage[:1].upper() + stage[1:], int(round(100.0 * max(0.0, min(1.0, fraction)))))
    left = remainingSeconds(fraction, elapsed)
    if left is not None:
        return text + ", about %s left" % formatDuration(left)
    return text + (", %s so far" % formatDuration(elapsed) if elapsed >= ETA_MIN_SECONDS else "")
