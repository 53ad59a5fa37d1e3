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
from SegHiResCAMLib.engine.faithfulness import (MEASURED_ERROR, box_note, choose_box, perturbation_curves,
                                                placed_fractions, target_box)
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
    # margin 16 leaves a box of most of the 32^3 input: 13 passes on it, plus the unperturbed box, would cost more than
    # 13 on the whole input, which runs them
    assert default.metadata["shortcut"]["box"] is None and default.metadata["shortcut"]["box_rejected"] is None
    assert default.metadata["cost"]["perturbation_forwards"] == 1 + 3 * 2 * 2
    # the batch a run used is recorded (it can move scores in the last bits): the given one, or the automatic one
    assert fast.metadata["options"]["batch_size"] is None and fast.metadata["cost"]["batch_size"] == 2  # 2 on CPU
    batched = evaluate_image(model, image, geometry, spec, margin=8, batch_size=3, **kw)
    assert batched.metadata["cost"]["batch_size"] == 3 and "in batches of 3;" in evaluation_markdown(batched)


def test_the_box_is_used_only_where_it_pays_and_scores_like_the_whole_input():
    """choose_box: a network without global operations scores the target's box like the whole input, so the box is
    used and its score starts the curves; one with instance normalisation scores a small box of an uneven image
    quite differently, so the inputs run on the whole input and the rejection says why; a box whose passes, with the
    extra one, cost at least the whole input's is not even scored."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, 48, 48, 48)
    x[..., :12] += 4.0  # a bright slab outside the box: the box's statistics differ from the whole input's
    region = torch.zeros(1, 48, 48, 48, dtype=torch.bool)
    region[0, 20:26, 20:26, 20:26] = True
    target = SegmentTarget(1)
    box = target_box(region, (48, 48, 48), 8, 2)
    torch.manual_seed(0)
    for net, kept in ((toy_models.unet3d().eval(), True), (toy_models.instance_normed(), False)):
        with torch.no_grad():
            y0 = float(target(net(x), region)[0])
        got, y, rejected = choose_box(net, x, target, region, box, y0, passes=10)
        if kept:
            assert got == tuple(box) and rejected is None and y == pytest.approx(y0, rel=1e-5)
        else:
            assert got is None and y == y0 and box_note(rejected).startswith("the model scored the target's box alone")
            assert rejected["box"] == [[b.start, b.stop] for b in box] and rejected["y0"] == y0
            assert abs(rejected["y0_box"] - y0) > rejected["tolerance"] * abs(y0)
    big = (slice(0, 40), slice(0, 40), slice(0, 36))  # 0.52 of the input: 2 x 0.52 >= 1 pass on the whole input
    calls = []
    net = toy_models.unet3d().eval()
    net.register_forward_hook(lambda *args: calls.append(1))
    assert choose_box(net, x, target, region, big, 1.0, passes=1) == (None, 1.0, None) and not calls
    scored = choose_box(net, x, target, region, big, 1.0, passes=2)  # 3 x 0.52 < 2: scored (against a made-up y0)
    assert len(calls) == 1 and scored[2]["box"] == [[0, 40], [0, 40], [0, 36]]
    assert choose_box(net, x, target, region, None, 2.5, passes=9) == (None, 2.5, None)


def test_evaluate_runs_a_network_with_instance_normalisation_on_the_whole_input_and_says_so():
    model = SegModel(network=toy_models.instance_normed(), name="normed", output="logits")
    image, mask, geometry = toy_models.uneven_volume(40, 10, slice(18, 22))
    kw = dict(methods=["seg-hires-grad-cam"], layers=["2"], steps=2, sanity_stages=None, random_targets=(),
              device="cpu", sigma=1.0, margin=4)
    fast = evaluate_image(model, image, geometry, TargetSpec(1, mask=mask), **kw)
    exact = evaluate_image(model, image, geometry, TargetSpec(1, mask=mask), exact=True, **kw)
    shortcut = fast.metadata["shortcut"]
    assert shortcut["box"] is None and shortcut["box_rejected"]["box"] is not None
    assert shortcut["note"] == box_note(shortcut["box_rejected"]) and shortcut["note"] in evaluation_markdown(fast)
    assert fast.metadata["cost"]["perturbation_forwards"] == 1 + 1 + 2 * 2 * 1  # the scored box, then the whole
    for a, b in zip(exact.rows, fast.rows):  # the same steps on the whole input: the full computation's values
        assert b["deletion_auc"] == a["deletion_auc"] and b["insertion_auc"] == a["insertion_auc"]


def test_the_stated_error_of_the_shortcut_is_the_benchmarks():
    """MEASURED_ERROR (what evaluate tells its reader) is the committed benchmark's largest |dAUC|, rounded up."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "benchmarks", "results", "evaluate.json")) as handle:
        cases = json.load(handle)["cases"]
    for mode in ("deletion", "insertion"):
        largest = max(abs(a[mode + "_diff"]) for c in cases for a in c["auc"])
        assert MEASURED_ERROR[mode] == math.ceil(largest * 100) / 100.0
