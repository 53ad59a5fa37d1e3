"""The evaluate shortcut (issue 18, part 4): crop to the target's box + receptive field, well-placed steps.

Exact where it can be: a network without global operations, a margin that covers its receptive field. Elsewhere its
error is measured (benchmarks/results/evaluate.md); here a too-small margin must show a difference, so that the
equality tests can fail."""

import json
import math
import os

import numpy as np
import pytest
import torch

from SegHiResCAMLib.analysis.evaluate import evaluate_image
from SegHiResCAMLib.analysis.explain import TargetSpec
from SegHiResCAMLib.engine import SegmentTarget
from SegHiResCAMLib.engine.faithfulness import MEASURED_ERROR, perturbation_curves, placed_fractions, target_box
from SegHiResCAMLib.engine.regions import MaskRegion
from SegHiResCAMLib.errors import InputError
from SegHiResCAMLib.geometry import Geometry
from SegHiResCAMLib.models.base import Preprocessing, SegModel
from SegHiResCAMLib.reporting.tables import evaluation_markdown

import toy_models

SHAPE = (32, 32, 32)


def _blob():
    region = torch.zeros((1,) + SHAPE, dtype=torch.bool)
    region[0, 12:17, 14:20, 9:13] = True
    return region


def test_target_box_grows_by_the_margin_and_keeps_the_alignment():
    region = _blob()
    assert target_box(region, SHAPE, 0) == (slice(12, 17), slice(14, 20), slice(9, 13))
    assert target_box(region, SHAPE, 3, align=4) == (slice(8, 20), slice(8, 24), slice(4, 16))
    box = target_box(region, SHAPE, 5, align=2)
    assert all(s.start % 2 == 0 and (s.stop - s.start) % 2 == 0 for s in box)
    assert target_box(region, SHAPE, 40) is None  # the whole input: nothing to save
    assert target_box(torch.zeros((1,) + SHAPE, dtype=torch.bool), SHAPE, 2) is None
    with pytest.raises(InputError, match="crop margin"):
        target_box(region, SHAPE, -1)
    assert placed_fractions(0.1) == [0.0, 0.05, 0.1, 1.0] and placed_fractions(0.0)[1:3] == [0.02, 0.04]
    assert placed_fractions(0.9) == [0.0, 0.25, 0.5, 1.0]


def _net():
    torch.manual_seed(3)
    return toy_models.unet3d().eval()


@pytest.mark.parametrize("baseline", ["blur", "zero"])
def test_crop_covering_the_receptive_field_equals_the_full_computation(baseline):
    net, region = _net(), _blob()
    x = torch.randn((1, 1) + SHAPE, generator=torch.Generator().manual_seed(0))
    maps = [torch.rand(SHAPE, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    target = SegmentTarget(1, MaskRegion(region))
    kw = dict(steps=[0.0, 0.01, 0.2, 0.6, 1.0], baseline=baseline, sigma=2.0, region=region, batch_size=2)
    full = perturbation_curves(net, x, target, maps, **kw)
    box = target_box(region, SHAPE, 8, align=2)  # TinyUNet's receptive field: 5 voxels from the output voxel
    assert box is not None and np.prod([s.stop - s.start for s in box]) < 0.5 * np.prod(SHAPE)
    cropped = perturbation_curves(net, x, target, maps, box=box, **kw)
    for a, b in zip(full, cropped):
        for mode in ("deletion", "insertion"):
            np.testing.assert_allclose(b[mode].scores, a[mode].scores, rtol=1e-5, atol=1e-5)
            assert b[mode].auc_raw == pytest.approx(a[mode].auc_raw, abs=1e-5)
    short = perturbation_curves(net, x, target, maps, box=target_box(region, SHAPE, 0, align=2), **kw)
    assert max(abs(s - t) for a, b in zip(full, short) for s, t in zip(a["deletion"].scores, b["deletion"].scores)) \
        > 1e-3  # a box without the receptive field does change the scores: the equality above can fail


def test_evaluate_shortcut_equals_exact_where_the_margin_covers_the_receptive_field():
    model = SegModel(network=_net(), name="toy", preprocessing=Preprocessing(divisible_by=2), output="logits")
    geometry = Geometry(size=SHAPE[::-1], spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                        direction=tuple(np.eye(3).flatten()))
    image = np.random.RandomState(0).randn(*SHAPE).astype(np.float32)
    spec = TargetSpec(1, mask=_blob()[0].numpy().astype(np.uint8))
    kw = dict(methods=["seg-hires-grad-cam", "seg-grad-cam"], layers=["dec"], steps=4, sanity_stages=None,
              random_targets=(), device="cpu", sigma=2.0)
    exact = evaluate_image(model, image, geometry, spec, exact=True, **kw)
    fast = evaluate_image(model, image, geometry, spec, margin=8, **kw)
    assert exact.metadata["shortcut"] is None and fast.metadata["shortcut"]["box_share"] < 0.5
    for a, b in zip(exact.rows, fast.rows):
        assert (a["method"], a["layer"]) == (b["method"], b["layer"])
        assert b["deletion_auc_raw"] == pytest.approx(a["deletion_auc_raw"], abs=1e-5)
        assert b["insertion_auc_raw"] == pytest.approx(a["insertion_auc_raw"], abs=1e-5)
    default = evaluate_image(model, image, geometry, spec, **dict(kw, steps=None))
    share = default.metadata["region_voxels"] / SHAPE[0] ** 3
    assert default.metadata["shortcut"]["fractions"] == placed_fractions(share)
    # the benchmark's error is stated for the placed steps only, in the JSON and the report
    assert default.metadata["shortcut"]["measured_error"] == MEASURED_ERROR
    assert fast.metadata["shortcut"]["measured_error"] is None
    assert "within %.2f (deletion)" % MEASURED_ERROR["deletion"] in evaluation_markdown(default)
    assert "within" not in evaluation_markdown(exact) and "within" not in evaluation_markdown(fast)
    assert default.metadata["cost"]["perturbation_forwards"] == 2 + 3 * 2 * 2
    # the batch a run used is recorded (it can move scores in the last bits): the given one, or the automatic one
    assert fast.metadata["options"]["batch_size"] is None and fast.metadata["cost"]["batch_size"] == 2  # 2 on CPU
    batched = evaluate_image(model, image, geometry, spec, margin=8, batch_size=3, **kw)
    assert batched.metadata["cost"]["batch_size"] == 3 and "in batches of 3;" in evaluation_markdown(batched)


def test_the_stated_error_of_the_shortcut_is_the_benchmarks():
    """MEASURED_ERROR (what evaluate tells its reader) is the committed benchmark's largest |dAUC|, rounded up."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "benchmarks", "results", "evaluate.json")) as handle:
        cases = json.load(handle)["cases"]
    for mode in ("deletion", "insertion"):
        largest = max(abs(a[mode + "_diff"]) for c in cases for a in c["auc"])
        assert MEASURED_ERROR[mode] == math.ceil(largest * 100) / 100.0
