"""studies/known_truth.py: its scores on hand-computable maps, the task's construction, and a smoke run of the
whole pipeline at a toy size (tiny networks, 32^3, two training steps)."""

import csv
import math
import os

import numpy as np
import pytest
import torch

from SegHiResCAMLib import catalog


@pytest.fixture(scope="module")
def study(load_study):
    return load_study("known_truth")


def _tiny_case(study):
    """8^3: target = a 2x2x2 block, cue = a 1x2x2 block elsewhere, one distractor voxel of each kind."""
    shape = (8, 8, 8)
    target, cue, sphere, cube = (np.zeros(shape, bool) for _ in range(4))
    target[1:3, 1:3, 1:3] = True
    cue[6, 5:7, 5:7] = True
    sphere[6, 1, 1] = True
    cube[1, 6, 6] = True
    image = np.zeros(shape, np.float32)
    return study.Case(image, target.astype(np.uint8), target, cue, sphere, cube, {"target": [(1.5, 1.5, 1.5)]},
                      image, image)


def test_map_equal_to_the_evidence_scores_perfectly(study):
    case = _tiny_case(study)
    heat = case.evidence.astype(np.float32)
    scores = study.truth_scores(heat, case)
    assert scores["mass_evidence"] == pytest.approx(1.0)
    assert scores["mass_target"] == pytest.approx(8 / 12)  # 8 target voxels of 12 evidence voxels, equal heat
    assert scores["mass_cue"] == pytest.approx(4 / 12)
    assert scores["mass_distractors"] == 0.0
    assert scores["pointing_game"] == 1.0
    assert scores["spearman_evidence"] == pytest.approx(1.0)
    # the map ties over all 12 evidence voxels; outside the target only the 4 cue voxels remain at the maximum
    assert scores["pointing_game_cue"] == 1.0


def test_map_outside_the_evidence_scores_nothing(study):
    case = _tiny_case(study)
    heat = case.distractors.astype(np.float32)
    scores = study.truth_scores(heat, case)
    assert scores["mass_evidence"] == 0.0
    assert scores["mass_distractors"] == pytest.approx(1.0)
    # the distractor voxels lie more than one voxel from the evidence: no hit even with the tolerance
    assert scores["pointing_game"] == 0.0
    assert scores["spearman_evidence"] < 0
    inverted = study.rank_correlation(1.0 - case.evidence, case.evidence)
    assert inverted == pytest.approx(-1.0)


def test_relevance_mass_counts_positive_heat_only(study):
    mask = np.array([True, False, False, False])
    assert study.relevance_mass(np.array([3.0, 1.0, -5.0, 0.0]), mask) == pytest.approx(0.75)
    assert math.isnan(study.relevance_mass(np.zeros(4), mask))  # flat map: nothing to share


def test_pointing_game_tolerance_and_ties(study):
    mask = np.zeros((5, 5, 5), bool)
    mask[2, 2, 2] = True
    heat = np.zeros((5, 5, 5))
    heat[2, 2, 3] = 1.0  # one voxel next to the mask
    assert study.pointing_game(heat, mask, tolerance=1) == 1.0
    assert study.pointing_game(heat, mask, tolerance=0) == 0.0
    heat[0, 0, 0] = 1.0  # a second maximum far away: half the maxima hit
    assert study.pointing_game(heat, mask, tolerance=1) == 0.5
    assert study.pointing_game(np.zeros((5, 5, 5)), mask) == 0.0  # flat map: a miss
    # excluding the voxels of the first hit leaves only the far maximum
    assert study.pointing_game(heat, mask, tolerance=1, exclude=heat * (np.arange(5) == 3)[None, None, :] > 0) == 0.0


def test_the_task_obeys_its_rule(study):
    rng = np.random.default_rng(0)
    size = 48
    p = study.geometry_params(size)
    for _ in range(3):
        case = study.make_case(rng, size)
        target_centre = np.array(case.centres["target"][0])
        cue_centre = np.array(case.centres["cue"][0])
        assert p["pair"][0] <= np.linalg.norm(target_centre - cue_centre) <= p["pair"][1]
        for sphere in case.centres["sphere"]:  # the distractor sphere has no cube near it
            for cube in case.centres["cue"] + case.centres["cube"]:
                assert np.linalg.norm(np.subtract(sphere, cube)) >= p["alone"]
        for cube in case.centres["cube"]:  # nor the distractor cube a sphere
            for sphere in case.centres["target"] + case.centres["sphere"]:
                assert np.linalg.norm(np.subtract(sphere, cube)) >= p["alone"]
        assert np.array_equal(case.label.astype(bool), case.targets)
        assert not (case.evidence & case.distractors).any()
        # the cue is dark, the target bright; removing the cue changes only the cue's voxels
        assert case.image[case.cues].mean() < -0.5 < 0.5 < case.image[case.targets].mean()
        changed = case.image != case.no_cue
        assert np.array_equal(changed, case.cues)
        assert np.array_equal(case.image != case.no_distractors, case.distractors)


def test_aggregate_counts_flat_maps_as_zero_for_truth_metrics(study):
    rows = [dict(case=c, model="m", method="x", layer="l", layer_role="auto", target="prediction", metric=metric,
                 value=value) for c, (metric, value) in enumerate([("mass_evidence", 0.8), ("mass_evidence", float("nan")),
                                                                   ("deletion_auc", 0.2), ("deletion_auc", float("nan"))])]
    assert study.aggregate(rows, "mass_evidence")[("m", "x", "auto", "prediction")] == pytest.approx(0.4)
    assert study.aggregate(rows, "deletion_auc")[("m", "x", "auto", "prediction")] == pytest.approx(0.2)


def _row(model, method, role, metric, value, target="prediction"):
    return dict(case=0, model=model, method=method, layer=role, layer_role=role, target=target, metric=metric,
                value=value)


def test_curve_agreement_and_truth_ranking(study):
    """Three maps whose truth scores fall as their deletion AUCs rise: deletion agrees with the truth (rho 1);
    their insertion AUCs rise with the truth score reversed (rho -1); the oracle is beaten by one map."""
    rows = []
    for k, (truth, deletion, insertion) in enumerate([(0.9, 0.1, 0.2), (0.5, 0.3, 0.5), (0.1, 0.6, 0.9)]):
        for metric in ("mass_evidence", "spearman_evidence", "pointing_game"):
            rows.append(_row("m", "method%d" % k, "auto", metric, truth))
        rows += [_row("m", "method%d" % k, "auto", "deletion_auc", deletion),
                 _row("m", "method%d" % k, "auto", "insertion_auc", insertion)]
    rows += [_row("m", study.ORACLE, "-", "deletion_auc", 0.2), _row("m", study.ORACLE, "-", "insertion_auc", 0.95)]
    agreement = study.curve_agreement(rows)["m"]
    assert agreement["rho_truth_vs_minus_deletion"] == pytest.approx(1.0)
    assert agreement["rho_truth_vs_insertion"] == pytest.approx(-1.0)
    assert agreement["maps_with_lower_deletion_than_oracle"] == 1
    assert agreement["maps_with_higher_insertion_than_oracle"] == 0
    ranking = study.truth_rank(rows)
    assert [r["method"] for r in ranking] == ["method0", "method1", "method2"]
    assert ranking[0]["truth_score"] == pytest.approx(0.9)


def test_smoke_run_of_the_pipeline(study, tmp_path):
    """The whole study at a toy size: two tiny models trained for two steps, one case, every method and target
    kind, the tidy CSV, the summary and the tables."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        summary, rows = study.run(str(tmp_path / "out"), str(tmp_path / "weights"), n_cases=1, steps=2,
                                  sanity_stages=1, toy=True, figures=False)
    finally:
        torch.set_num_threads(threads)
    assert set(summary["models"]) == {"basic-unet", "residual-unet"}
    for name in summary["models"]:
        assert os.path.exists(tmp_path / "weights" / (name + ".pt"))
        assert set(summary["models"][name]["layers"]) == {"encoder", "bottleneck", "decoder", "auto"}
    with open(tmp_path / "out" / "scores.csv") as handle:
        table = list(csv.DictReader(handle))
    assert list(table[0]) == ["case", "model", "method", "layer", "layer_role", "target", "metric", "value"]
    truth = [r for r in table if r["metric"] == "mass_evidence" and r["method"] in catalog.method_names()]
    # every method x layer role x target kind x model, once per case
    assert len(truth) == len(catalog.method_names()) * 4 * len(study.TARGET_KINDS) * 2
    assert {r["target"] for r in truth} == set(study.TARGET_KINDS)
    assert {r["method"] for r in table if r["metric"] == "deletion_auc"} >= {study.ORACLE, "random-order"}
    for r in truth:
        value = float(r["value"])
        assert math.isnan(value) or 0.0 <= value <= 1.0
    assert "## Ranking by the known truth" in (tmp_path / "out" / "summary.md").read_text()
    assert len(summary["truth_ranking"]) == len(catalog.method_names()) * 4
    assert set(summary["curve_agreement"]) <= {"basic-unet", "residual-unet"}  # none where y0 <= 0 (NaN AUCs)
    # the tables rebuilt from the CSV alone give the same ranking
    again_summary, again_rows = study.rerank(str(tmp_path / "out"))
    assert len(again_rows) == len(table)
    assert [(r["method"], r["layer_role"]) for r in again_summary["truth_ranking"]] == \
        [(r["method"], r["layer_role"]) for r in summary["truth_ranking"]]
    assert os.path.exists(tmp_path / "out" / "known_truth.png")
    # cached weights are read back, not trained again
    again = study.load_or_train("residual-unet", study.TOY_MODELS["residual-unet"], str(tmp_path / "weights"), 32)
    assert again[1]["cached"] is True
