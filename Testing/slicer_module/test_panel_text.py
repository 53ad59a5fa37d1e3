"""Issue 15, "what a radiologist sees": the panel's texts, built by pure functions of slicer_logic.panel_text (the
summary line under a result with the evaluation verdict; the progress line with its stage and ETA)."""

import math

import pytest

from SegHiResCAMLib.analysis.evaluate import RANDOM_ORDER
from SegHiResCAMLib.slicer_logic import panel_text

HEATMAP = {"method": "seg-hires-grad-cam", "layer": "dec", "target": "segment 'tumour' of 'Seg'", "classIndex": "1",
           "className": "brain", "model": "hd-bet", "targetKind": "segment"}


def rows(deletion, insertion, randomDeletion=0.5, randomInsertion=0.5, layer="dec"):
    return [{"method": "seg-hires-grad-cam", "layer": layer, "deletion_auc": deletion, "insertion_auc": insertion},
            {"method": RANDOM_ORDER, "layer": "-", "deletion_auc": randomDeletion, "insertion_auc": randomInsertion}]


def test_summary_names_method_layer_target_model():
    assert panel_text.resultSummary(HEATMAP) == (
        "seg-hires-grad-cam at layer dec | target: segment 'tumour' of 'Seg', class 1 (brain) | model: hd-bet")
    unnamed = dict(HEATMAP, className="class3", classIndex="3")  # no class name: not said twice
    assert "class 3 |" in panel_text.resultSummary(unnamed)
    verdict = panel_text.evaluationVerdict(rows(0.2, 0.8), "seg-hires-grad-cam", "dec")
    assert panel_text.resultSummary(dict(HEATMAP, verdict=verdict)).endswith(" | " + verdict)
    assert panel_text.resultSummary({}) == "? at layer ? | target: ? | model: ?"


@pytest.mark.parametrize("deletion, insertion, words", [
    (0.2, 0.8, "more faithful than a random ranking"), (0.6, 0.4, "no more faithful than a random ranking"),
    (0.2, 0.4, "better than a random ranking in deletion only"),
    (0.6, 0.8, "better than a random ranking in insertion only")])
def test_evaluation_verdict_compares_with_the_random_ranking(deletion, insertion, words):
    verdict = panel_text.evaluationVerdict(rows(deletion, insertion), "seg-hires-grad-cam", "dec")
    assert verdict == "evaluation: %s (deletion AUC %.2f vs 0.50, insertion AUC %.2f vs 0.50)" % (
        words, deletion, insertion)


def test_evaluation_verdict_without_a_row_or_a_reference():
    assert panel_text.evaluationVerdict(rows(0.2, 0.8), "seg-hires-grad-cam", "other-layer") == ""
    assert panel_text.evaluationVerdict(rows(0.2, 0.8), "layer-cam", "dec") == ""
    alone = rows(0.2, float("nan"))[:1]
    assert panel_text.evaluationVerdict(alone, "seg-hires-grad-cam", "dec") == (
        "evaluation: deletion AUC 0.20, insertion AUC n/a (no comparison with a random ranking)")
    assert panel_text.RANDOM_ORDER == RANDOM_ORDER


def test_durations():
    assert [panel_text.formatDuration(s) for s in (0, 4.6, 59.4, 60, 125, 3599, 3720, -3)] == [
        "0 s", "5 s", "59 s", "1 min 00 s", "2 min 05 s", "59 min 59 s", "1 h 02 min", "0 s"]


def test_remaining_time_extrapolates_the_part_done():
    assert panel_text.remainingSeconds(0.25, 10.0) == pytest.approx(30.0)
    assert panel_text.remainingSeconds(0.5, 61.0) == pytest.approx(61.0)
    assert panel_text.remainingSeconds(0.01, 10.0) is None  # too little done to extrapolate
    assert panel_text.remainingSeconds(0.5, 0.5) is None  # too early
    assert panel_text.remainingSeconds(1.0, 10.0) is None


def test_progress_line_has_stage_percentage_and_eta():
    assert panel_text.progressText("gradients, window 3/8", 0.4, 20.0) == (
        "Gradients, window 3/8: 40%, about 30 s left")
    assert panel_text.progressText("forward pass", 0.1, 90.0) == "Forward pass: 10%, about 13 min 30 s left"
    assert panel_text.progressText("loading the model", 0.0, 3.2) == "Loading the model: 0%, 3 s so far"
    assert panel_text.progressText("loading the model", 0.0, 0.2) == "Loading the model: 0%"
    assert panel_text.progressText("", 1.5, 0.0) == "Working: 100%"
    assert not math.isnan(panel_text.remainingSeconds(0.02, 1.0))
