"""The report of a cohort (:mod:`SegHiResCAMLib.analysis.cohort`): ``cohort.md`` and its figures.

- ``sa_vs_dice.png``: the mean SA score of every case against its Dice with the reference, with the Pearson and
  Spearman correlations (cases with both);
- ``ranking.png``: the cases ordered by predicted quality (mean SA score, lowest first), flagged cases marked;
- ``gallery.png``: the worst cases by mean SA score, one axial slice each through the middle of the prediction
  (the reference when there is no prediction), the scan in grey, the heatmap over it, the prediction and the
  reference outlined.

Every number in the report comes from the table; matplotlib is imported only here (file-only Agg backend).
"""

import os
from typing import List, Optional, Tuple

import numpy as np

from ..analysis.cohort import CASES_DIR, HEATMAP_FILE, PREDICTION_FILE, read_result
from ..errors import SegHiResCAMError
from ..imaging.files import atomic_write, read_image
from ..imaging.resample import read_mask_on_grid
from .tables import fmt
from .writers import write_text

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


REPORT_FILE = "cohort.md"
SCATTER_FILE = "sa_vs_dice.png"
RANKING_FILE = "ranking.png"
GALLERY_FILE = "gallery.png"
#: cases shown in the gallery
GALLERY_CASES = 4


def correlations(x, y) -> Tuple[int, float, float]:
    """(pairs, Pearson r, Spearman rho) over the pairs where both are finite (NaN with fewer than 3 pairs or a
    constant side).

    Example:
        >>> n, r, rho = correlations([0.1, 0.5, 0.9, float("nan")], [0.2, 0.4, 0.95, 0.3])
        >>> n, round(r, 3), rho
        (3, 0.966, 1.0)
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return int(len(x)), float("nan"), float("nan")

    def ranks(v):
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for value in np.unique(v):  # ties share their mean rank
            r[v == value] = r[v == value].mean()
        return r

    return int(len(x)), float(np.corrcoef(x, y)[0, 1]), float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def _save(fig, path: str) -> None:
    plt = _pyplot()
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)


def scatter_figure(frame, path: str) -> Tuple[int, float, float]:
    """``sa_vs_dice.png``; returns the correlations it shows."""
    plt = _pyplot()
    n, r, rho = correlations(frame["mean_sa"], frame["dice"])
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    done = frame[np.isfinite(frame["mean_sa"].astype(float)) & np.isfinite(frame["dice"].astype(float))]
    flagged = done["flagged"].astype(bool)
    ax.scatter(done["mean_sa"][~flagged], done["dice"][~flagged], color="C0", label="case")
    ax.scatter(done["mean_sa"][flagged], done["dice"][flagged], color="C3", label="flagged (lowest mean SA)")
    for _, row in done.iterrows():
        ax.annotate(str(row["case_id"]), (row["mean_sa"], row["dice"]), fontsize=7, xytext=(3, 3),
                    textcoords="offset points")
    ax.set_xlabel("mean SA score (no ground truth)")
    ax.set_ylabel("Dice of the prediction vs the reference")
    ax.set_title("%d cases: Pearson r %s, Spearman rho %s" % (n, fmt(r), fmt(rho)), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    _save(fig, path)
    return n, r, rho


def ranking_figure(frame, path: str) -> None:
    """``ranking.png``: mean SA score per case, lowest (likeliest failure) first."""
    plt = _pyplot()
    scored = frame[np.isfinite(frame["mean_sa"].astype(float))].sort_values(["mean_sa", "case_id"])
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(scored) + 2), 4))
    colours = ["C3" if f else "C0" for f in scored["flagged"].astype(bool)]
    ax.bar(range(len(scored)), scored["mean_sa"], color=colours)
    ax.set_xticks(range(len(scored)))
    ax.set_xticklabels(scored["case_id"], rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("mean SA score")
    ax.set_title("cases by predicted quality (lowest first; red: flagged)", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    _save(fig, path)


def _mid_slice(out: str, case_id: str) -> Optional[dict]:
    """The axial slice (numpy axis 0) through the middle of the prediction of a finished case, with its maps
    (a 2D case whole)."""
    record = read_result(out, case_id)
    if not record or record["row"].get("status") != "done":
        return None
    folder = os.path.join(out, CASES_DIR, case_id)
    image, geometry = read_image(record["case"]["images"][0])
    prediction, _ = read_image(os.path.join(folder, PREDICTION_FILE))
    heat = read_image(os.path.join(folder, HEATMAP_FILE))[0] if os.path.exists(os.path.join(folder, HEATMAP_FILE)) \
        else None
    reference = None
    if record["case"].get("reference"):
        try:
            reference = read_mask_on_grid(record["case"]["reference"], geometry, what="reference", binary=True)[0]
        except SegHiResCAMError:  # the gallery shows what it can: a reference gone since the run is left out
            reference = None
    if image.ndim == prediction.ndim + 1:  # several channels: the first one
        image = image[..., 0]
    cls = record["provenance"].get("class_index", 1)
    target = prediction == cls
    if prediction.ndim == 2:  # a 2D case is its own slice
        return {"image": image, "prediction": target, "heat": heat, "reference": reference, "z": 0}
    where = np.nonzero(target.any(axis=(1, 2)))[0] if target.any() else np.nonzero(
        reference.any(axis=(1, 2)))[0] if reference is not None and reference.any() else [image.shape[0] // 2]
    z = int(where[len(where) // 2])
    return {"image": image[z], "prediction": target[z], "heat": None if heat is None else heat[z],
            "reference": None if reference is None else reference[z], "z": z}


def gallery_figure(frame, out: str, path: str, count: int = GALLERY_CASES) -> List[str]:
    """``gallery.png``: the ``count`` lowest mean-SA cases; returns their ids."""
    plt = _pyplot()
    worst = frame[np.isfinite(frame["mean_sa"].astype(float))].sort_values(["mean_sa", "case_id"]).head(count)
    shown = [(row, _mid_slice(out, row["case_id"])) for _, row in worst.iterrows()]
    shown = [(row, s) for row, s in shown if s is not None]
    if not shown:
        return []
    fig, axes = plt.subplots(1, len(shown), figsize=(3.3 * len(shown), 3.6), facecolor="black", squeeze=False)
    for ax, (row, view) in zip(axes[0], shown):
        lo, hi = np.percentile(view["image"], [1, 99.5])
        ax.imshow(view["image"], cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, interpolation="nearest")
        if view["heat"] is not None:
            ax.imshow(np.ma.masked_less(view["heat"], 0.1), cmap="inferno", vmin=0, vmax=1, alpha=0.7,
                      interpolation="nearest")
        for mask, colour in ((view["prediction"], "#00e5ff"), (view["reference"], "#7CFC00")):
            if mask is not None and mask.any() and not mask.all():
                ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=0.8)
        ax.set_title("%s (slice %d)\nmean SA %s, Dice %s" % (row["case_id"], view["z"], fmt(float(row["mean_sa"])),
                                                             fmt(float(row["dice"]))), color="white", fontsize=8)
        ax.axis("off")
    fig.suptitle("lowest mean SA scores: heatmap, prediction (cyan), reference (green)", color="white", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png", facecolor="black"))
    plt.close(fig)
    return [row["case_id"] for row, _ in shown]


def cohort_markdown(frame, stats: Tuple[int, float, float], gallery: List[str], figures: dict) -> str:
    """The text of ``cohort.md``."""
    n, r, rho = stats
    done = frame[frame["status"] == "done"]
    failed = frame[frame["status"] == "failed"]
    lines = ["# Cohort audit", "",
             "- cases: %d (%d done, %d failed, %d reused from an earlier run)" % (
                 len(frame), len(done), len(failed), int(frame["reused"].sum())),
             "- mean SA score against Dice (%d cases with both): Pearson r %s, Spearman rho %s" % (n, fmt(r), fmt(rho)),
             "- flagged for review: %s" % (", ".join(frame[frame["flagged"].astype(bool)]["case_id"]) or "none"),
             "- compute time: %s s in total over the computed cases" % fmt(float(np.nansum(
                 frame["total_s"].astype(float))), 1), ""]
    if figures.get("scatter"):
        lines += ["![mean SA score against Dice](%s)" % figures["scatter"], ""]
    lines += ["## Cases ranked by predicted quality (mean SA score, lowest first)", "",
              "| rank | case | class | mean SA | Dice | heat in target | flagged |", "|---|---|---|---|---|---|---|"]
    ranked = frame[frame["sa_rank"].notna()].sort_values("sa_rank")
    for _, row in ranked.iterrows():
        lines.append("| %d | %s | %s | %s | %s | %s | %s |" % (
            int(row["sa_rank"]), row["case_id"], row["class"], fmt(float(row["mean_sa"])), fmt(float(row["dice"])),
            fmt(float(row["heat_in_target"])), "yes" if row["flagged"] else ""))
    if figures.get("ranking"):
        lines += ["", "![cases ranked by mean SA score](%s)" % figures["ranking"]]
    if gallery:
        lines += ["", "## The worst cases (%s)" % ", ".join(gallery), "", "![gallery](%s)" % figures["gallery"]]
    checked = frame[frame["check_verdict"].fillna("").astype(str) != ""] if "check_verdict" in frame else frame[:0]
    if len(checked):
        lines += ["", "## Quick check of the heatmaps (--check quick)", "",
                  "Model randomisation of the explained layer's downstream (passes when the rank correlation rho in "
                  "the dilated target is at most 0.5) and the deletion AUC of the map against a random ranking (lower "
                  "is better); the numbers are the check_* columns of cohort.csv.", "",
                  "| case | class | verdict |", "|---|---|---|"]
        for _, row in checked.iterrows():
            verdict = str(row["check_verdict"]).replace("|", "\\|")
            lines.append("| %s | %s | %s |" % (row["case_id"], row["class"], verdict))
    if len(failed):
        lines += ["", "## Failed cases", "", "| case | error |", "|---|---|"]
        for _, row in failed.iterrows():
            lines.append("| %s | %s |" % (row["case_id"], str(row["error"]).replace("|", "\\|")))
    lines += ["", "Mean SA score: ProtoSeg's ground-truth-free estimate of segmentation quality (mean per-unit SA "
              "score of the last two feature layers, against the model's own prediction). Dice: the prediction of "
              "the class against the case's reference. Heat in target: share of the positive heatmap mass inside "
              "the explained target. Per-case outputs: cases/<case_id>/ (prediction, heatmap, result.json).", ""]
    return "\n".join(lines)


def write_report(frame, out: str) -> str:
    """Write ``cohort.md`` and its figures into ``out``; returns the report's path."""
    out = os.fspath(out)
    figures = {}
    stats = (0, float("nan"), float("nan"))
    scored = frame[np.isfinite(frame["mean_sa"].astype(float))]
    gallery: List[str] = []
    if len(scored):
        stats = scatter_figure(frame, os.path.join(out, SCATTER_FILE))
        figures["scatter"] = SCATTER_FILE
        ranking_figure(frame, os.path.join(out, RANKING_FILE))
        figures["ranking"] = RANKING_FILE
        gallery = gallery_figure(frame, out, os.path.join(out, GALLERY_FILE))
        if gallery:
            figures["gallery"] = GALLERY_FILE
    path = os.path.join(out, REPORT_FILE)
    write_text(path, cohort_markdown(frame, stats, gallery, figures))
    return path

