"""Text tables and Markdown reports, with the package's one number formatter :func:`fmt`.

- :func:`evaluation_markdown` / :func:`evaluation_tsv`: an :class:`~SegHiResCAMLib.analysis.evaluate.Evaluation`
  as a Markdown report and as tab-separated lines;
- :func:`sa_layer_table` / :func:`sa_unit_table`: the rows of
  :mod:`SegHiResCAMLib.analysis.segmentation_ability` with their scores as text (the CSV and JSON files);
- :func:`heatmap_report`: the Markdown report of the demo (one row per heatmap, with its figure).

Nothing here writes files: :mod:`.writers` does.
"""

import math
from typing import Dict, List, Optional

from ..analysis.evaluate import Evaluation
from ..analysis.segmentation_ability import ImageSA, layer_rows, unit_rows

#: decimals of the SA scores in the tables
SA_DIGITS = 6


def fmt(value, digits: int = 3, nan: str = "n/a") -> str:
    """A float with ``digits`` decimals (``nan`` for NaN); anything else (text, integers, None) as its text."""
    if isinstance(value, float):
        return nan if math.isnan(value) else "%.*f" % (digits, value)
    return str(value)


def text_rows(rows: List[Dict[str, object]], digits: int = 3, nan: str = "n/a") -> List[Dict[str, object]]:
    """``rows`` with every float as :func:`fmt` text; other values are kept."""
    return [{k: fmt(v, digits, nan) if isinstance(v, float) else v for k, v in row.items()} for row in rows]


def sa_layer_table(result: ImageSA) -> List[Dict[str, object]]:
    """:func:`~SegHiResCAMLib.analysis.segmentation_ability.layer_rows` with the scores as text."""
    return text_rows(layer_rows(result), SA_DIGITS, "nan")


def sa_unit_table(result: ImageSA) -> List[Dict[str, object]]:
    """:func:`~SegHiResCAMLib.analysis.segmentation_ability.unit_rows` with the scores as text."""
    return text_rows(unit_rows(result), SA_DIGITS, "nan")


def evaluation_tsv(evaluation: Evaluation) -> str:
    """The rows of ``evaluation``, tab-separated, under a line of column keys."""
    cols = evaluation.columns()
    lines = ["\t".join(k for k, _ in cols)]
    for row in evaluation.rows:
        lines.append("\t".join(fmt(row.get(k, float("nan"))) for k, _ in cols))
    return "\n".join(lines)


def evaluation_markdown(evaluation: Evaluation, title: str = "Heatmap faithfulness",
                        plot: Optional[str] = None) -> str:
    """A Markdown report: what was evaluated, the table, how to read it, warnings."""
    meta = evaluation.metadata
    lines = ["# %s" % title, ""]
    lines.append("- target: %s (%d voxels of %d), score y0 = %.4g, fully replaced input %.4g"
                 % (meta.get("target_kind"), meta.get("region_voxels", 0), meta.get("domain_voxels", 0),
                    meta.get("y0", float("nan")),
                    float("nan") if meta.get("y_baseline") is None else meta["y_baseline"]))
    options = meta.get("options", {})
    cost = meta.get("cost", {})
    lines.append("- deletion/insertion: %s steps, baseline %s (sigma %s voxels), %d forward passes%s; dilation %s "
                 "voxels" % (options.get("steps"), options.get("baseline"), options.get("sigma_voxels"),
                             cost.get("perturbation_forwards", 0),
                             " in batches of %d" % cost["batch_size"] if cost.get("batch_size") else "",
                             options.get("dilation_voxels")))
    lines.append("- timings: %s" % ", ".join("%s %.0f s" % (k, v) for k, v in meta.get("timings", {}).items()))
    rows = evaluation.rows
    if rows:
        lines.append("- a uniform map would put %.3f of its heat in the segment and %.3f in the dilated segment"
                     % (rows[0]["segment_fraction"], rows[0]["dilated_segment_fraction"]))
    lines += [""]
    cols = evaluation.columns()
    lines.append("| " + " | ".join(h for _, h in cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(k, float("nan"))) for k, _ in cols) + " |")
    lines += ["", "AUCs are areas under the score curve divided by y0 (the unperturbed score), over the fraction "
              "of voxels removed (deletion) or inserted (insertion), most salient first. Heat in segment: share of "
              "the positive heat inside the target segment. rho: Spearman rank correlation with the map of a "
              "randomised model (cascading from the output layer down) or target; a faithful map changes, so "
              "lower is better; n/a marks a flat map."]
    measured = (meta.get("shortcut") or {}).get("measured_error")
    if measured:
        lines += ["", "These AUCs come from the shortcut (the target's box and the interior fractions %s, not "
                  "`--exact`). On the committed faithfulness study its AUCs were within %.2f (deletion) and %.2f "
                  "(insertion) of the full computation, and it kept every order the full computation resolved there "
                  "(benchmarks/results/evaluate.md); maps whose AUCs are closer than that may change places with "
                  "`--exact`." % (", ".join("%.3g" % f for f in meta["shortcut"]["fractions"][1:-1]),
                                  measured["deletion"], measured["insertion"])]
    for note in evaluation.notes():
        lines += ["", "Note: %s." % note]
    warnings = sorted({"%s @ %s: %s" % (r["method"], r["layer"], w) for r in rows for w in r.get("warnings", [])})
    if warnings:
        lines += ["", "Warnings:", ""] + ["- %s" % w for w in warnings]
    if plot:
        lines += ["", "![deletion and insertion curves](%s)" % plot]
    return "\n".join(lines) + "\n"


def heatmap_report(title: str, summary: Dict[str, object], rows: List[Dict[str, object]],
                   provenance: Dict[str, object], ratio_label: str = "mean heat inside / outside the mask") -> str:
    """A short Markdown report: summary, one table row per heatmap (with its figure), provenance."""
    lines = ["# %s" % title, ""]
    for key, value in summary.items():
        lines.append("- **%s**: %s" % (key, value))
    lines += ["", "| method | layer | %s | figure |" % ratio_label, "|---|---|---|---|"]
    for row in rows:
        lines.append("| %s | %s | %.2f | ![](%s) |" % (row["method"], row["layer"], row["ratio"], row["figure"]))
    warnings = ["- %s / %s: %s" % (row["method"], row["layer"], w) for row in rows for w in row.get("warnings", [])]
    if warnings:
        lines += ["", "Warnings:", ""] + warnings
    lines += ["", "## Provenance", "", "```"]
    for key, value in provenance.items():
        lines.append("%s: %s" % (key, value))
    lines += ["```", ""]
    return "\n".join(lines)
