"""Faithfulness and sanity metrics (engine/metrics.py, evaluate.py) on tiny 2D/3D networks with known answers."""

import argparse
import copy
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from SegHiResCAMLib.imaging import files as io
from SegHiResCAMLib.engine import MaskRegion, SegmentTarget, WholeRegion, compute_cams, count_hooks
from SegHiResCAMLib.engine import faithfulness as M
from SegHiResCAMLib.engine.faithfulness import perturbation
from SegHiResCAMLib.errors import InputError, InternalError, SegHiResCAMError
from SegHiResCAMLib.analysis.evaluate import METHOD_NAMES, RANDOM_ORDER, crop_image, evaluate_image
from SegHiResCAMLib.cli.evaluate import add_parser, run
from SegHiResCAMLib.geometry import Geometry
from SegHiResCAMLib.models import load_model

import toy_models

SHAPES = {2: (20, 20), 3: (10, 10, 10)}


def conv(nd, *args, **kwargs):
    return (nn.Conv2d if nd == 2 else nn.Conv3d)(*args, **kwargs)


def box_mask(shape, fraction_axis0=0.2):
    """A box covering the first ``fraction_axis0`` of axis 0: 20 % of the voxels."""
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[: int(round(shape[0] * fraction_axis0))] = True
    return mask


class RegionNet(nn.Module):
    """The class-1 logit of every voxel is the mean of positive features over a known input region R only.

    ``features`` (hooked) is a bias-free 1x1 convolution with positive weights, so for positive inputs
    Seg-HiRes-Grad CAM = G * A is positive exactly on R and zero elsewhere; class 0 is the negated logit.
    """

    def __init__(self, nd, region):
        super().__init__()
        self.features = conv(nd, 1, 3, 1, bias=False)
        with torch.no_grad():
            self.features.weight.uniform_(0.5, 1.0)
        self.register_buffer("region", region.float())

    def forward(self, x):
        a = self.features(x).sum(1)
        dims = tuple(range(1, a.ndim))
        s = (a * self.region).sum(dim=dims) / self.region.sum()
        y1 = s.view((-1, 1) + (1,) * len(dims)).expand((x.shape[0], 1) + tuple(x.shape[2:]))
        return torch.cat([-y1, y1], 1)


class ChannelNet(nn.Module):
    """Many independent input channels, a per-channel scaling layer (hooked) and a 1x1 head: its map is a random
    projection of the input, so two independent weight draws give maps with rank correlation about 0."""

    def __init__(self, nd, channels=256):
        super().__init__()
        self.features = conv(nd, channels, channels, 1, groups=channels)
        self.head = conv(nd, channels, 2, 1)

    def forward(self, x):
        return self.head(self.features(x))


def region_case(nd):
    shape = SHAPES[nd]
    region = box_mask(shape)
    net = RegionNet(nd, region)
    x = torch.rand((1, 1) + shape) + 0.5
    target = SegmentTarget(1, MaskRegion(region))
    return net, x, target, region


# ------------------------------------------------------------------------------------------------ baselines
@pytest.mark.parametrize("nd", [2, 3])
def test_separable_blur_equals_direct_nd_convolution(nd):
    x = torch.randn((2, 3) + SHAPES[nd], dtype=torch.float64)
    sigma, radius = 1.3, 4  # int(3 * 1.3 + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k1 = torch.exp(-0.5 * (t / sigma) ** 2)
    k1 = k1 / k1.sum()
    kernel = k1
    for _ in range(nd - 1):
        kernel = kernel[..., None] * k1
    padded = F.pad(x, (radius,) * (2 * nd), mode="replicate")
    weight = kernel.expand((3, 1) + kernel.shape).contiguous()
    direct = (F.conv2d if nd == 2 else F.conv3d)(padded, weight, groups=3)
    torch.testing.assert_close(M.gaussian_blur(x, sigma), direct)
    constant = torch.full((1, 1) + SHAPES[nd], 2.5)
    torch.testing.assert_close(M.gaussian_blur(constant, 2.0), constant)


def test_blur_gives_the_values_of_the_one_dimensional_convolution_it_replaced():
    """The shifted sums give, on the CPU, what F.conv1d gave (the blur baseline's values, so every committed
    deletion/insertion figure, stay as they were)."""

    def by_conv1d(x, sigmas):
        out = x
        for axis, s in zip(range(2, x.ndim), sigmas):
            radius = int(3.0 * s + 0.5)
            if radius == 0:
                continue
            t = torch.arange(-radius, radius + 1, dtype=x.dtype)
            kernel = torch.exp(-0.5 * (t / s) ** 2)
            moved = out.movedim(axis, -1)
            flat = F.pad(moved.reshape(-1, 1, moved.shape[-1]), (radius, radius), mode="replicate")
            out = F.conv1d(flat, (kernel / kernel.sum()).view(1, 1, -1)).view(moved.shape).movedim(-1, axis)
        return out

    generator = torch.Generator().manual_seed(0)
    for shape, sigmas in [((1, 1, 37, 50, 23), (5.0,) * 3), ((2, 3, 20, 31, 17), (1.0, 3.0, 0.0)),
                          ((1, 2, 40, 33), (2.0, 0.7))]:
        x = torch.randn(shape, generator=generator) * 100 + 50
        assert torch.equal(M.gaussian_blur(x, sigmas), by_conv1d(x, sigmas)), shape


def test_the_baseline_of_a_box_is_the_whole_baseline_cut_to_it():
    """The scored box's baseline, computed from the box grown by the kernel radius only, has the values of the whole
    input's baseline there, bit for bit: boxes inside, at the ends, thinner than the radius, one axis unblurred."""
    generator = torch.Generator().manual_seed(2)
    x = torch.randn((1, 2, 40, 33, 29), generator=generator) * 100 + 50
    domain = torch.rand((40, 33, 29), generator=generator) > 0.2
    boxes = [(slice(10, 30), slice(5, 20), slice(8, 21)), (slice(0, 7), slice(25, 33), slice(0, 29)),
             (slice(19, 20), slice(0, 2), slice(27, 29)), (slice(None), slice(3, None), slice(0, 5))]
    for box in boxes:
        cut = (slice(None), slice(None)) + box
        for sigma in (5.0, (2.0, 0.0, 7.5)):
            assert torch.equal(M.gaussian_blur(x, sigma, box=box), M.gaussian_blur(x, sigma)[cut]), (box, sigma)
        for kind in ("blur", "mean", "zero"):
            assert torch.equal(M.baseline_input(x, kind, 3.0, domain, box), M.baseline_input(x, kind, 3.0, domain)[cut])


def test_baselines_mean_zero_and_errors():
    x = torch.randn(1, 2, 6, 7)
    domain = torch.zeros(6, 7, dtype=torch.bool)
    domain[:3] = True
    mean = M.baseline_input(x, "mean", domain=domain)
    torch.testing.assert_close(mean[0, :, 0, 0], x[0, :, :3].mean(dim=(1, 2)))
    assert torch.equal(M.baseline_input(x, "zero"), torch.zeros_like(x))
    with pytest.raises(InputError, match="baseline must be one of"):
        M.baseline_input(x, "noise")
    with pytest.raises(InputError, match="sigma"):
        M.gaussian_blur(x, -1.0)


# ------------------------------------------------------------------------------------------------ ranking
def brute_ranks(values):
    v = list(values)
    return [sum(1 for w in v if w < a) + (sum(1 for w in v if w == a) + 1) / 2.0 for a in v]


def brute_pearson(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    den = math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))
    return num / den


@pytest.mark.parametrize("seed", range(5))
def test_rankdata_and_spearman_match_brute_force(seed):
    rng = np.random.RandomState(seed)
    a = rng.randint(0, 6, size=57).astype(np.float32)  # many ties
    b = (a + rng.randint(0, 4, size=57)).astype(np.float32)
    np.testing.assert_allclose(M.rankdata(torch.from_numpy(a)).numpy(), brute_ranks(a))
    assert M.spearman(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(
        brute_pearson(brute_ranks(a), brute_ranks(b)), abs=1e-12)
    grid = torch.from_numpy(a[:56].reshape(7, 8))
    domain = torch.from_numpy(rng.rand(7, 8) > 0.3)
    assert M.spearman(grid, -grid * 3, domain) == pytest.approx(-1.0)
    assert M.spearman(grid, grid.exp()) == pytest.approx(1.0)
    assert math.isnan(M.spearman(grid, torch.zeros_like(grid)))
    with pytest.raises(InputError, match="shapes"):
        M.spearman(grid, grid[:3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int64, torch.bool])
def test_rankdata_numpy_sort_gives_the_torch_sorts_ranks(dtype, monkeypatch):
    """The CPU path (numpy's sort) and the generic path (torch's) give the same ranks, ties, NaN and -0.0 included."""
    from SegHiResCAMLib.engine.faithfulness import sanity
    rng = np.random.RandomState(3)
    values = [torch.from_numpy(rng.randint(0, 5, size=999)).to(dtype),
              torch.from_numpy(rng.rand(20000) * 3).to(dtype)]
    if dtype.is_floating_point:
        values.append(torch.tensor([float("nan"), 1.0, float("nan"), -0.0, 0.0, 2.0], dtype=dtype))
    fast = [sanity.rankdata(v) for v in values]
    monkeypatch.setattr(sanity, "_NUMPY_SORTABLE", ())
    for v, ranks in zip(values, fast):
        assert torch.equal(ranks, sanity.rankdata(v))


def test_saliency_sets_with_a_shared_tie_order_are_the_same():
    from SegHiResCAMLib.engine.faithfulness.perturbation import _tie_order
    rng = np.random.RandomState(1)
    domain = torch.from_numpy(rng.rand(6, 7, 8) > 0.3)
    ties = _tie_order(domain.numel(), domain, 4, torch.device("cpu"))
    for _ in range(2):
        heat = torch.from_numpy(np.maximum(rng.randint(-3, 5, size=(6, 7, 8)), 0).astype(np.float32))
        for alone, shared in zip(M.saliency_sets(heat, domain, 4, (5, 40, 200)),
                                 M.saliency_sets(heat, domain, 4, (5, 40, 200), tie_order=ties)):
            assert torch.equal(alone, shared)


def test_saliency_order_descending_deterministic_ties_and_domain():
    heat = torch.tensor([[0.0, 3.0, 1.0], [1.0, 0.0, 2.0], [0.0, 0.0, 1.0]])
    order = M.saliency_order(heat, seed=0)
    values = heat.flatten()[order]
    assert torch.all(values[:-1] >= values[1:]) and sorted(order.tolist()) == list(range(9))
    assert order[:2].tolist() == [1, 5]
    assert torch.equal(order, M.saliency_order(heat, seed=0))
    ties = torch.zeros(40, 40)
    assert not torch.equal(M.saliency_order(ties, seed=0), M.saliency_order(ties, seed=1))
    domain = heat > 0.5
    assert set(M.saliency_order(heat, domain).tolist()) == set(domain.flatten().nonzero().flatten().tolist())
    with pytest.raises(InputError, match="NaN"):
        M.saliency_order(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("seed", range(3))
def test_saliency_sets_are_the_full_orders_prefixes(seed):
    rng = np.random.RandomState(seed)
    heat = torch.from_numpy(np.maximum(rng.randint(-3, 5, size=(9, 10, 11)), 0).astype(np.float32))  # ReLU zeros
    domain = torch.from_numpy(rng.rand(9, 10, 11) > 0.2)
    for dom in (None, domain):
        full = M.saliency_order(heat, dom, seed=seed)
        counts = (0, 1, 7, 300, full.numel() - 1, full.numel(), full.numel() + 5)
        for count, chosen in zip(counts, M.saliency_sets(heat, dom, seed=seed, counts=counts)):
            assert sorted(chosen.tolist()) == sorted(full[:count].tolist()), count


# --------------------------------------------------------------------------------------- known-answer curves
@pytest.mark.parametrize("nd", [2, 3])
def test_region_model_map_and_deletion_insertion_have_known_answers(nd):
    net, x, target, region = region_case(nd)
    res = compute_cams(net, x, [target], "features", ["seg-hires-grad-cam", "layer-cam"])
    hires = res[0]
    # all the positive heat is on R, and R is exactly where it is positive
    assert torch.equal(hires.map[0] > 0, region)
    assert M.energy_in_region(hires.map, hires.region, 0).item() == pytest.approx(1.0)
    assert M.region_fraction(hires.region, region.shape).item() == pytest.approx(0.2)
    reverse = 1.0 - hires.map[0]  # ranks R last
    curves = M.perturbation_curves(net, x, target, [hires.map, reverse], steps=10, baseline="zero",
                                   batch_size=3)
    y0 = float(hires.score[0])
    good, bad = curves[0], curves[1]
    d = good["deletion"].scores
    assert d[0] == pytest.approx(y0) and good["deletion"].reference == pytest.approx(y0)
    assert all(b < a for a, b in zip(d[:2], d[1:3]))   # drops while R is being removed (0, 10, 20 %)
    assert all(abs(v) < 1e-6 for v in d[2:])            # zero once R (20 %) is gone, whatever else goes
    ins = good["insertion"].scores
    assert abs(ins[0]) < 1e-6 and all(v == pytest.approx(y0, rel=1e-5) for v in ins[2:])
    assert good["deletion"].auc == pytest.approx(0.5 * 0.1 * (1 + d[1] / y0) + 0.5 * 0.1 * d[1] / y0, abs=1e-6)
    assert good["deletion"].auc < 0.11 and bad["deletion"].auc > 0.85
    assert good["insertion"].auc > 0.89 and bad["insertion"].auc < 0.15
    # blurred baseline: constant once R is removed, above it before
    blur = M.perturbation_curves(net, x, target, [hires.map], steps=10, sigma=1.0)[0]["deletion"].scores
    assert all(v == pytest.approx(blur[-1], abs=1e-5) for v in blur[2:]) and abs(blur[1] - blur[0]) > 1e-4


def test_curves_with_fraction_list_shared_end_points_and_normalisation():
    net, x, target, region = region_case(2)
    heat = torch.rand(SHAPES[2])
    (curves,) = M.perturbation_curves(net, x, target, [heat], steps=[0.0, 0.05, 0.5, 1.0], baseline="mean")
    deletion, insertion = curves["deletion"], curves["insertion"]
    assert deletion.fractions == [0.0, 0.05, 0.5, 1.0]
    assert deletion.scores[0] == insertion.scores[-1] and deletion.scores[-1] == insertion.scores[0]
    assert deletion.normalized[0] == pytest.approx(1.0)
    negative = M.Curve("deletion", [0.0, 1.0], [-2.0, -1.0], -2.0)
    assert math.isnan(negative.auc) and negative.auc_raw == pytest.approx(-1.5)
    assert set(deletion.to_dict()) >= {"fractions", "scores", "normalized", "auc", "auc_raw"}


class FlakyMemory(nn.Module):
    """Fails like an exhausted GPU when given more than ``limit`` inputs at once."""

    def __init__(self, net, limit):
        super().__init__()
        self.net, self.limit = net, limit

    def forward(self, x):
        if x.shape[0] > self.limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.net(x)


def test_batching_does_not_change_scores_and_out_of_memory_halves_the_batch():
    net, x, target, region = region_case(3)
    heats = [torch.rand(SHAPES[3]) for _ in range(2)]
    one = M.perturbation_curves(net, x, target, heats, steps=5, batch_size=1)
    many = M.perturbation_curves(FlakyMemory(net, 2), x, target, heats, steps=5, batch_size=8)
    for a, b in zip(one, many):
        for mode in M.MODES:
            np.testing.assert_allclose(a[mode].scores, b[mode].scores, rtol=1e-6)
    with pytest.raises(InternalError, match="out of memory"):
        M.perturbation_curves(FlakyMemory(net, 0), x, target, heats, steps=2)
    assert [c.batch_size for c in one[0].values()] == [1, 1]
    assert [c.batch_size for c in many[0].values()] == [2, 2]  # the batch used, after halving
    assert one[0]["deletion"].to_dict()["batch_size"] == 1


def test_cpu_batches_pairs_where_memory_allows(monkeypatch):
    """benchmarks/results/batch.md: on a CPU, pairs pay a little; three or four no more, with more memory."""
    free = {"bytes": 64 << 30}
    monkeypatch.setattr(perturbation, "available_bytes", lambda device: free["bytes"])

    def auto(*shape):
        return M.auto_batch_size(torch.empty((1, 1) + shape))

    assert auto(128, 160, 144) == 2 and auto(32, 32, 32) == 2  # (4 before)
    free["bytes"] = 6 << 30  # half of it holds 1.07 whole-MNI152 inputs, 1.5 of 128^3, 3.6 of 96^3
    assert auto(128, 160, 144) == 1 and auto(128, 128, 128) == 1 and auto(96, 96, 96) == 2


def test_the_automatic_batch_is_that_of_the_boxs_inputs(monkeypatch):
    """With a box, the scored inputs are the box's: their size sets the automatic batch, not the whole input's."""
    # half the free memory holds one 10^3 input or two 6^3 boxes
    monkeypatch.setattr(perturbation, "available_bytes", lambda device: 2 * 10 ** 3 * M.AUTO_BYTES_PER_VOXEL)
    torch.manual_seed(0)
    net, x, heat = conv(3, 1, 2, 3, padding=1), torch.rand((1, 1) + SHAPES[3]), torch.rand(SHAPES[3])
    region = torch.zeros((1,) + SHAPES[3], dtype=torch.bool)
    region[0, 2:5, 2:5, 2:5] = True
    kw = dict(steps=3, region=region, reference_score=1.0)
    whole = M.perturbation_curves(net, x, SegmentTarget(1), [heat], **kw)
    boxed = M.perturbation_curves(net, x, SegmentTarget(1), [heat], box=(slice(0, 6),) * 3, **kw)
    assert whole[0]["deletion"].batch_size == 1 and boxed[0]["deletion"].batch_size == 2


def test_perturbation_input_errors():
    net, x, target, region = region_case(2)
    heat = torch.rand(SHAPES[2])
    for kwargs, match in [({"steps": 0}, "steps must be >= 1"), ({"steps": [0.0, 0.7, 0.5, 1.0]}, "increase"),
                          ({"modes": ["erase"]}, "modes"), ({"batch_size": 0}, "batch size"),
                          ({"domain": torch.zeros(SHAPES[2], dtype=torch.bool)}, "domain mask is empty")]:
        with pytest.raises(InputError, match=match):
            M.perturbation_curves(net, x, target, [heat], **kwargs)
    with pytest.raises(InputError, match="one image at a time"):
        M.perturbation_curves(net, x.repeat(2, 1, 1, 1), target, [heat])
    with pytest.raises(InputError, match="input grid"):
        M.perturbation_curves(net, x, target, [heat[:5]])


# ---------------------------------------------------------------------------------------------------- energy
@pytest.mark.parametrize("nd,radius", [(2, 1), (2, 2), (3, 1), (3, 3), (3, 12)])
def test_dilation_and_energy_against_brute_force(nd, radius):
    shape = SHAPES[nd]
    mask = torch.rand(shape) > 0.93
    grown = M.dilate(mask[None], radius)[0]
    expected = torch.zeros_like(mask)
    for index in mask.nonzero().tolist():
        box = tuple(slice(max(0, i - radius), i + radius + 1) for i in index)
        expected[box] = True
    assert torch.equal(grown, expected)
    heat = torch.randn((1,) + shape)
    positive = heat.clamp_min(0)
    assert M.energy_in_region(heat, mask[None], radius).item() == pytest.approx(
        float(positive[0][expected].sum() / positive.sum()))
    assert M.region_fraction(mask[None], shape, radius).item() == pytest.approx(expected.float().mean().item())
    assert math.isnan(M.energy_in_region(-heat.abs(), mask[None]).item())  # no positive heat
    coarse = M.energy_in_region(heat, mask[None, ::2, ::2] if nd == 2 else mask[None, ::2, ::2, ::2])
    assert 0.0 <= coarse.item() <= 1.0  # a region on a coarser output grid is resized
    with pytest.raises(InputError, match="radius"):
        M.dilate(mask[None], -1)


# ---------------------------------------------------------------------------------------------------- sanity
@pytest.mark.parametrize("nd", [2, 3])
def test_fully_randomised_model_gives_rank_correlation_near_zero(nd):
    net = ChannelNet(nd)
    x = torch.randn((1, 256) + ((24, 24) if nd == 2 else (8, 8, 8)))
    target = SegmentTarget(1, WholeRegion())
    methods = ["seg-hires-grad-cam", "seg-grad-cam", "layer-cam"]
    reference = compute_cams(net, x, [target], "features", methods)
    order = M.parameter_layers(net, x)
    assert order == ["features", "head"]
    stages = M.model_randomization(net, x, target, ["features"], methods, stages=["head", "features"],
                                   reference=reference, order=order)
    assert [s.label for s in stages] == ["head", "features"]
    assert stages[0].randomized == ["head"] and stages[1].randomized == ["features", "head"]
    head, everything = stages[0].correlations, stages[1].correlations
    # new head weights w': the map sum_k w'_k A_k is a new random projection of the same features
    for method in ("seg-hires-grad-cam", "seg-grad-cam"):
        assert abs(head[("features", method)]) < 0.2, head
    # (LayerCAM keeps relu(w_k) relu(w'_k) A_k for the channels both draws weigh positively: expected
    # correlation (E relu w)^2 / E (relu w)^2 = 3/8 for symmetric uniform weights, so it is not checked here)
    for rho in everything.values():
        assert abs(rho) < 0.2, everything
    # the measurement itself: an identical copy correlates perfectly
    again = compute_cams(copy.deepcopy(net), x, [target], "features", methods)
    assert all(v == pytest.approx(1.0) for v in M.map_correlations(reference, again).values())


def test_cascade_stages_are_cumulative_from_the_output_down():
    order = ["enc", "down.1", "mid.0", "mid.2", "dec", "head"]
    stages = M.cascade_stages(order, 3)
    assert [names for _, names in stages] == [order[4:], order[2:], order]
    assert stages[-1][0] == "all 6 modules"
    named = M.cascade_stages(order, ["mid", "head", ""])
    assert [label for label, _ in named] == ["head", "mid", "all"]
    assert named[1][1] == order[2:]
    with pytest.raises(SegHiResCAMError, match="did you mean"):
        M.cascade_stages(order, ["midd"])
    with pytest.raises(InputError):
        M.cascade_stages(order, 0)


def test_sanity_check_leaves_the_users_model_unchanged():
    net = toy_models.unet3d()
    net.train()
    net.enc[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    x = torch.randn(1, 1, 8, 8, 8)
    rng = torch.get_rng_state()
    target = SegmentTarget(1)
    stages = M.model_randomization(net, x, target, ["dec", "down"], ["seg-hires-grad-cam", "seg-grad-cam"],
                                   stages=2, segment=torch.ones(8, 8, 8, dtype=torch.bool))
    assert len(stages) == 2 and stages[-1].randomized == M.parameter_layers(net, x)
    assert all(-1.0 <= v <= 1.0 or math.isnan(v) for s in stages for v in s.correlations_in_segment.values())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert {n: p.requires_grad for n, p in net.named_parameters()} == flags
    assert net.training and all(m.training for m in net.modules())
    assert all(p.grad is None for p in net.parameters())
    assert count_hooks(net) == 0
    assert torch.equal(torch.get_rng_state(), rng)
    # and re-initialisation is reproducible and independent of how modules are grouped into stages
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    M.randomize_modules(a, ["dec.0", "head"], seed=3)
    M.randomize_modules(b, ["head"], seed=3)
    M.randomize_modules(b, ["dec.0"], seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.head.weight, net.head.weight)


def test_random_targets_keep_size_or_region_and_follow_the_evidence():
    net, x, target, region = region_case(2)
    out = net(x)
    shifted = M.random_target(target, "shift", seed=0).region(out)
    scattered = M.random_target(target, "scatter", seed=0).region(out)
    assert int(shifted.sum()) == int(scattered.sum()) == int(region.sum())
    assert not torch.equal(shifted[0], region) and not torch.equal(scattered[0], region)
    other = M.random_target(target, "class", seed=0, num_classes=2)
    assert other.class_index == 0 and torch.equal(other.region(out)[0], region)
    with pytest.raises(InputError, match="at least 2 classes"):
        M.random_target(target, "class")
    with pytest.raises(InputError, match="random target"):
        M.random_target(target, "noise")
    rho = M.target_randomization(net, x, target, ["features"], ["seg-hires-grad-cam"],
                                 kinds=("shift", "scatter", "class"), num_classes=2)
    # this model's evidence is R whatever the explained voxels: the map stays the same (rho = 1) ...
    assert rho["shift"][("features", "seg-hires-grad-cam")] == pytest.approx(1.0)
    assert rho["scatter"][("features", "seg-hires-grad-cam")] == pytest.approx(1.0)
    # ... and class 0 (the negated logit) has no positive evidence at all: a flat map, no ranking
    assert math.isnan(rho["class"][("features", "seg-hires-grad-cam")])


# ------------------------------------------------------------------------------------ image runner and CLI
def test_crop_image_keeps_physical_positions():
    direction = (0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0)
    geometry = Geometry(size=(12, 10, 8), spacing=(1.0, 2.0, 3.0), origin=(5.0, -4.0, 2.0), direction=direction)
    image = np.arange(8 * 10 * 12, dtype=np.float32).reshape(8, 10, 12)
    cropped, geom, box = crop_image(image, geometry, (4, 20, 6), center=(7, 5, 0))
    assert cropped.shape == (4, 10, 6) and box == (slice(4, 8), slice(0, 10), slice(0, 6))
    np.testing.assert_array_equal(cropped, image[box])
    start = np.array([0, 0, 4, 1.0])  # (x, y, z) index of the box corner in the original grid
    np.testing.assert_allclose(geom.ijk_to_lps() @ np.array([0, 0, 0, 1.0]), geometry.ijk_to_lps() @ start)
    with pytest.raises(InputError, match="crop size"):
        crop_image(image, geometry, (4, 4))


@pytest.fixture(scope="module")
def toy_case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    net = toy_models.unet3d()
    weights = str(folder / "w.pt")
    torch.save(net.state_dict(), weights)
    geometry = Geometry(size=(12, 10, 8), spacing=(1.0, 1.2, 1.5), origin=(1.0, 2.0, 3.0),
                        direction=(1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    image = np.random.RandomState(0).randn(*geometry.array_shape).astype(np.float32)
    path = str(folder / "img.nii.gz")
    io.write_image(path, image, geometry)
    mask = np.zeros(geometry.array_shape, dtype=np.uint8)
    mask[2:6, 3:8, 4:10] = 1
    mask_path = str(folder / "mask.nii.gz")
    io.write_image(mask_path, mask, geometry)
    return {"folder": folder, "weights": weights, "image": path, "mask": mask_path, "geometry": geometry,
            "array": image}


def test_evaluate_image_rows_for_every_method_and_layer(toy_case):
    model = load_model("toy_models:unet3d", weights=toy_case["weights"])
    before = {k: v.clone() for k, v in model.network.state_dict().items()}
    calls = []
    ev = evaluate_image(model, toy_case["array"], toy_case["geometry"], layers=["dec", "down"], steps=4,
                        sanity_stages=2, device="cpu", progress=lambda f, m: calls.append(f), pool_size=2)
    assert all(torch.equal(before[k], v) for k, v in model.network.state_dict().items())
    pairs = [(r["method"], r["layer"]) for r in ev.rows]
    assert pairs == [(m, l) for l in ("dec", "down") for m in METHOD_NAMES] + [(RANDOM_ORDER, "-")]
    keys = [k for k, _ in ev.columns()]
    assert keys[:6] == ["method", "layer", "deletion_auc", "insertion_auc", "energy_in_segment",
                        "energy_in_dilated_segment"]
    assert sum(k.startswith("spearman_model:") for k in keys) == 2
    assert {"spearman_target:shift", "spearman_target:class"} <= set(keys)
    for row in ev.rows:
        assert 0.0 <= row["energy_in_segment"] <= row["energy_in_dilated_segment"] + 1e-12 <= 1.0 + 1e-12 or \
            math.isnan(row["energy_in_segment"])
        assert math.isfinite(row["deletion_auc_raw"]) and math.isfinite(row["insertion_auc_raw"])
    assert ev.metadata["cost"]["perturbation_forwards"] == 1 + 13 * 2 * 3
    assert calls[-1] == 1.0 and calls == sorted(calls)
    headers, table = ev.table()
    assert len(headers) == len(table[0]) and len(table) == 13
    json.dumps(ev.to_dict(), default=str)


def parse(argv):
    parser = argparse.ArgumentParser(prog="seghirescam")
    add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def test_evaluate_command_writes_json_markdown_and_plot(toy_case, capsys):
    folder = toy_case["folder"]
    out_json, out_md, plot = str(folder / "ev.json"), str(folder / "ev.md"), str(folder / "curves.png")
    args = parse(["evaluate", "--model", "toy_models:unet3d", "--weights", toy_case["weights"], "--image",
                  toy_case["image"], "--segment", toy_case["mask"], "--methods", "seg-hires-grad-cam",
                  "seg-grad-cam", "--layers", "dec", "--steps", "3", "--sanity-stages", "dec,head",
                  "--crop", "6,8,10", "--out-json", out_json, "--out-md", out_md, "--plot", plot, "--quiet",
                  "--device", "cpu"])
    assert run(args) == 0
    data = json.load(open(out_json))
    assert [(r["method"], r["layer"]) for r in data["rows"]] == [("seg-hires-grad-cam", "dec"),
                                                                 ("seg-grad-cam", "dec"), (RANDOM_ORDER, "-")]
    assert data["metadata"]["target_kind"] == "segment" and data["metadata"]["model_input_shape"] == [1, 1, 6, 8, 10]
    assert [s["label"] for s in data["sanity"]["model"]] == ["head", "dec"]
    assert set(data["curves"]["seg-hires-grad-cam @ dec"]) == {"deletion", "insertion"}
    json.loads(open(out_json).read(), parse_constant=lambda name: pytest.fail("not strict JSON: %s" % name))
    report = open(out_md).read()
    assert "deletion AUC" in report and "curves.png" in report
    assert open(plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("method\tlayer\tdeletion_auc")


@pytest.mark.parametrize("extra,match", [
    (["--steps", "0"], "--steps must be a number of steps >= 1"),
    (["--crop", "a,b"], "--crop must be"),
    (["--layers", "nope"], "unknown layer"),
    (["--out-md", "SAME"], "different files"),
])
def test_evaluate_command_user_errors(toy_case, extra, match):
    out_json = str(toy_case["folder"] / "err.json")
    extra = [out_json if e == "SAME" else e for e in extra]
    args = parse(["evaluate", "--model", "toy_models:unet3d", "--weights", toy_case["weights"], "--image",
                  toy_case["image"], "--out-json", out_json, "--quiet", "--steps", "2"] + extra)
    with pytest.raises(SegHiResCAMError, match=match):
        run(args)
    args = parse(["evaluate", "--model", "toy_models:unet3d", "--image", toy_case["image"], "--out-json",
                  toy_case["image"]])
    with pytest.raises(InputError, match="Refusing to overwrite"):
        run(args)
