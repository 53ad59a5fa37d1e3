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
from SegHiResCAMLib.engine import cam
from SegHiResCAMLib.engine.faithfulness import (DEFAULT_FRACTIONS, MEASURED_ERROR, StandIn, choose_stand_in,
                                                perturbation_curves, placed_fractions, resolve_precision, target_box)
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
              random_targets=(), device="cpu", sigma=2.0, precision="float32")
    exact = evaluate_image(model, image, geometry, spec, exact=True, **kw)
    fast = evaluate_image(model, image, geometry, spec, margin=8, **kw)
    assert exact.metadata["shortcut"] is None and fast.metadata["shortcut"]["box_share"] < 0.5
    for a, b in zip(exact.rows, fast.rows):
        assert (a["method"], a["layer"]) == (b["method"], b["layer"])
        assert b["deletion_auc_raw"] == pytest.approx(a["deletion_auc_raw"], abs=1e-5)
        assert b["insertion_auc_raw"] == pytest.approx(a["insertion_auc_raw"], abs=1e-5)
    default = evaluate_image(model, image, geometry, spec, **dict(kw, steps=None))
    assert default.metadata["shortcut"]["fractions"] == list(DEFAULT_FRACTIONS) == [0, 0.125, 0.375, 0.625, 0.875, 1]
    # the benchmark's error is stated for the placed steps only, in the JSON and the report
    assert default.metadata["shortcut"]["measured_error"] == MEASURED_ERROR
    assert fast.metadata["shortcut"]["measured_error"] is None
    assert "within %.2f (deletion)" % MEASURED_ERROR["deletion"] in evaluation_markdown(default)
    assert "within" not in evaluation_markdown(exact) and "within" not in evaluation_markdown(fast)
    # margin 16 leaves a box of 15/16 of the 32^3 input: its 25 passes, plus the unperturbed box, cost less than 25
    # on the whole input (the box is scored and kept: this net has no global operations)
    assert default.metadata["shortcut"]["box"] == [[0, 32], [0, 32], [0, 30]]
    assert default.metadata["shortcut"]["box_rejected"] is None
    assert default.metadata["cost"]["perturbation_forwards"] == 1 + 1 + 3 * 2 * 4
    # the batch a run used is recorded (it can move scores in the last bits): the given one, or the automatic one
    assert fast.metadata["options"]["batch_size"] is None and fast.metadata["cost"]["batch_size"] == 2  # 2 on CPU
    batched = evaluate_image(model, image, geometry, spec, margin=8, batch_size=3, **kw)
    assert batched.metadata["cost"]["batch_size"] == 3 and "in batches of 3;" in evaluation_markdown(batched)


def test_the_box_is_used_only_where_it_pays_and_scores_like_the_whole_input():
    """choose_stand_in: a network without global operations scores the target's box like the whole input, so the box is
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
        chosen = choose_stand_in(net, x, target, region, box, y0, passes=10)
        rejected = chosen.box_rejected
        assert chosen.precision == "float32" and chosen.precision_rejected is None and chosen.scored == 1
        if kept:
            assert chosen.box == tuple(box) and rejected is None and chosen.y0 == pytest.approx(y0, rel=1e-5)
            assert chosen.note() is None
        else:
            assert chosen.box is None and chosen.y0 == y0
            assert chosen.note().startswith("the model scored the target's box alone")
            assert rejected["box"] == [[b.start, b.stop] for b in box] and rejected["y0"] == y0
            assert abs(rejected["y0_stand_in"] - y0) > rejected["tolerance"] * abs(y0)
    big = (slice(0, 40), slice(0, 40), slice(0, 36))  # 0.52 of the input: 2 x 0.52 >= 1 pass on the whole input
    calls = []
    net = toy_models.unet3d().eval()
    net.register_forward_hook(lambda *args: calls.append(1))
    assert choose_stand_in(net, x, target, region, big, 1.0, passes=1) == StandIn(None, "float32", 1.0) and not calls
    scored = choose_stand_in(net, x, target, region, big, 1.0, passes=2)  # 3 x 0.52 < 2: scored (made-up y0)
    assert len(calls) == 1 and scored.box_rejected["box"] == [[0, 40], [0, 40], [0, 36]]
    assert choose_stand_in(net, x, target, region, None, 2.5, passes=9) == StandIn(None, "float32", 2.5)


def test_evaluate_runs_a_network_with_instance_normalisation_on_the_whole_input_and_says_so():
    model = SegModel(network=toy_models.instance_normed(), name="normed", output="logits")
    image, mask, geometry = toy_models.uneven_volume(40, 10, slice(18, 22))
    kw = dict(methods=["seg-hires-grad-cam"], layers=["2"], steps=2, sanity_stages=None, random_targets=(),
              device="cpu", sigma=1.0, margin=4, precision="float32")
    fast = evaluate_image(model, image, geometry, TargetSpec(1, mask=mask), **kw)
    exact = evaluate_image(model, image, geometry, TargetSpec(1, mask=mask), exact=True, **kw)
    shortcut = fast.metadata["shortcut"]
    assert shortcut["box"] is None and shortcut["box_rejected"]["box"] is not None
    assert shortcut["note"] == fast.metadata["stand_in_note"] and shortcut["note"] in evaluation_markdown(fast)
    assert shortcut["note"].startswith("the model scored the target's box alone")
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


def test_bfloat16_stands_in_only_where_the_model_scores_like_float32():
    """choose_stand_in with bfloat16: a plain net scores the unperturbed input in bfloat16 within 1% of float32, so
    its curves run in bfloat16 from that score; a net whose logits are a small difference of large sums does not, so
    they run in float32 from the float32 score, and the rejection says why; a rejected box is followed by the whole
    input in bfloat16."""
    torch.manual_seed(0)
    x = torch.rand(1, 1, 32, 32, 32) + 1.0
    region = _blob()
    target = SegmentTarget(1)
    net = toy_models.unet3d().eval()
    with torch.no_grad():
        y0 = float(target(net(x), region)[0])
    chosen = choose_stand_in(net, x, target, region, None, y0, passes=10, precision="bfloat16")
    assert chosen.precision == "bfloat16" and chosen.box is None and chosen.scored == 1 and chosen.note() is None
    assert chosen.y0 != y0 and chosen.y0 == pytest.approx(y0, rel=1e-2)  # scored again, in bfloat16
    cancelling = toy_models.cancelling()
    with torch.no_grad():
        y0 = float(target(cancelling(x), region)[0])
    chosen = choose_stand_in(cancelling, x, target, region, None, y0, passes=10, precision="bfloat16")
    assert chosen.precision == "float32" and chosen.y0 == y0 and chosen.scored == 1
    assert abs(chosen.precision_rejected["y0_stand_in"] - y0) > 0.01 * abs(y0)
    assert "in bfloat16" in chosen.note() and "ran in float32" in chosen.note()
    normed = toy_models.instance_normed()
    image, mask, _ = toy_models.uneven_volume(48, 12, slice(20, 26))
    x = torch.from_numpy(image)[None, None]
    region = torch.from_numpy(mask.astype(bool))[None]
    with torch.no_grad():
        y0 = float(target(normed(x), region)[0])
    chosen = choose_stand_in(normed, x, target, region, target_box(region, (48,) * 3, 8, 2), y0, passes=10,
                             precision="bfloat16")
    assert chosen.box is None and chosen.box_rejected["precision"] == "bfloat16" and chosen.scored == 2
    assert chosen.precision == "bfloat16" and chosen.y0 == pytest.approx(y0, rel=1e-2)


def test_auto_precision_is_bfloat16_only_on_a_cpu_that_computes_it_natively(monkeypatch):
    assert resolve_precision("auto", "cpu") == "float32"  # Testing/conftest.py: float32 on every machine
    monkeypatch.setattr(cam, "cpu_bfloat16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bfloat16" and resolve_precision("float32", "cpu") == "float32"
    assert resolve_precision("auto", "cuda") == "float32" and resolve_precision("bfloat16", "cuda") == "bfloat16"
    for bad, device in (("half", "cpu"), ("bfloat16", "mps")):
        with pytest.raises(InputError, match="precision float32|precision must be"):
            resolve_precision(bad, device)


def test_evaluate_in_bfloat16_records_it_and_stays_close_to_float32(monkeypatch):
    model = SegModel(network=_net(), name="toy", preprocessing=Preprocessing(divisible_by=2), output="logits")
    geometry = Geometry(size=SHAPE[::-1], spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                        direction=tuple(np.eye(3).flatten()))
    image = np.random.RandomState(0).rand(*SHAPE).astype(np.float32) + 1.0
    spec = TargetSpec(1, mask=_blob()[0].numpy().astype(np.uint8))
    kw = dict(methods=["seg-hires-grad-cam", "seg-grad-cam"], layers=["dec"], steps=4, sanity_stages=None,
              random_targets=(), device="cpu", sigma=2.0, margin=8)
    single = evaluate_image(model, image, geometry, spec, precision="float32", **kw)
    half = evaluate_image(model, image, geometry, spec, precision="bfloat16", **kw)
    assert single.metadata["precision"] == {"used": "float32", "rejected": None, "note": None}
    assert half.metadata["precision"]["used"] == "bfloat16" and "bfloat16" in half.metadata["precision"]["note"]
    assert "Note: %s." % half.metadata["precision"]["note"] in evaluation_markdown(half)
    assert half.metadata["shortcut"]["box"] == single.metadata["shortcut"]["box"] is not None
    for a, b in zip(single.rows, half.rows):  # raw AUCs: this toy's y0 may be <= 0
        for key in ("deletion_auc_raw", "insertion_auc_raw"):
            assert b[key] != a[key] and b[key] == pytest.approx(a[key], rel=0.02)
    # auto follows the machine; --exact is the full computation, in float32 wherever it runs
    monkeypatch.setattr(cam, "cpu_bfloat16", lambda: True)
    assert evaluate_image(model, image, geometry, spec, **kw).metadata["precision"]["used"] == "bfloat16"
    assert evaluate_image(model, image, geometry, spec, exact=True, **kw).metadata["precision"]["used"] == "float32"


def test_bfloat16_reaches_traced_and_scripted_models():
    """A TorchScript model (``--model file.pt``) runs its convolutions in bfloat16 under the same autocast as an eager
    one: ``auto`` on a CPU with native bfloat16 must neither fail on it nor leave it in float32 unsaid."""
    torch.manual_seed(0)
    x = torch.rand(1, 1, 32, 32, 32) + 1.0
    region = _blob()
    target = SegmentTarget(1)
    plain = torch.nn.Sequential(torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 1)).eval()
    for net in (toy_models.unet3d().eval(), torch.jit.trace(toy_models.unet3d().eval(), x), torch.jit.script(plain)):
        with torch.no_grad():
            y0 = float(target(net(x), region)[0])
        chosen = choose_stand_in(net, x, target, region, None, y0, passes=4, precision="bfloat16")
        assert chosen.precision == "bfloat16" and chosen.y0 != y0 and chosen.y0 == pytest.approx(y0, rel=1e-2)
