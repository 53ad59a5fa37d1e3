"""Exact identities of docs/algorithms.md for every method, 2D and 3D, sigmoid and softmax heads."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from SegHiResCAMLib.engine import (ComponentRegion, MaskRegion, PredictedRegion, SegmentTarget, VoxelRegion,
                                   compute_cams, empty_target, explain, threshold_target,
                                   whole_image_target)
from SegHiResCAMLib.errors import TargetError

from nets import HomogeneousNet, LinearHeadNet

DIMS = [2, 3]
HEADS = [("softmax", 3, 2), ("sigmoid", 1, 1), ("sigmoid", 1, 0)]  # (activation, channels, explained class)


def setup(nd, channels, seed=0):
    torch.manual_seed(seed)
    net = LinearHeadNet(nd=nd, classes=channels).double()
    shape = (2, 1) + ((9, 10) if nd == 2 else (5, 6, 7))
    x = torch.randn(shape, dtype=torch.float64)
    return net, x


def explained_head(net, cls, activation):
    """(w', b') of the explained logit: class c's row, or minus the only row for sigmoid background."""
    w = net.head.weight.detach().flatten(1)
    b = net.head.bias.detach()
    if activation == "sigmoid" and w.shape[0] == 1:
        return (w[0], b[0]) if cls == 1 else (-w[0], -b[0])
    return w[cls], b[cls]


def random_mask(x, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((x.shape[0],) + tuple(x.shape[2:]), generator=g) > 0.6


def features(net, x):
    with torch.no_grad():
        return net.features(x)


def bcast(v, a):
    return v.view((1, -1) + (1,) * (a.ndim - 2))


def closed_form(method, A, w, b, M, pool=None):
    """The method's raw map for a linear 1x1 head, written out by hand."""
    dims = tuple(range(2, A.ndim))
    Mf = M.to(A.dtype)
    Yp = (bcast(w, A) * A).sum(1) + b  # explained logit
    N = Mf[0].numel()
    count = Mf.sum(dim=tuple(range(1, Mf.ndim)))
    per = lambda v: v.view((-1,) + (1,) * (Mf.ndim - 1))
    if method == "seg-hires-grad-cam":
        return Mf * (Yp - b)
    if method == "seg-grad-cam":
        return per(count / N) * (Yp - b)
    if method == "layer-cam":
        return Mf * (bcast(torch.relu(w), A) * A).sum(1)
    if method == "xgrad-cam":
        S = A.sum(dim=dims, keepdim=True)
        wk = bcast(w, A) * (A * Mf[:, None]).sum(dim=dims, keepdim=True) / S
        return (wk * A).sum(1)
    if method == "grad-cam++":
        S = A.sum(dim=dims, keepdim=True)
        wv = bcast(w, A)
        alpha = wv ** 2 / (2 * wv ** 2 + S * wv ** 3)
        wk = per(count)[:, None] * torch.relu(wv) * alpha
        return (wk * A).sum(1)
    if method == "seg-xres-cam":
        # fraction of M in the pool window of each voxel, times (Y' - b)
        window = (pool,) * (A.ndim - 2)
        frac = torch.empty_like(Mf)
        grids = torch.meshgrid(*[torch.arange(s) // pool for s in Mf.shape[1:]], indexing="ij")
        for bi in range(Mf.shape[0]):
            key = sum(g * (10 ** (2 * i)) for i, g in enumerate(grids))
            for k in torch.unique(key):
                sel = key == k
                frac[bi][sel] = Mf[bi][sel].mean()
        return frac * (Yp - b)
    raise AssertionError(method)


METHODS = ["seg-hires-grad-cam", "seg-grad-cam", "layer-cam", "xgrad-cam", "grad-cam++", "seg-xres-cam"]


@pytest.mark.parametrize("nd", DIMS)
@pytest.mark.parametrize("activation,channels,cls", HEADS)
@pytest.mark.parametrize("method", METHODS)
def test_linear_head_identity(nd, activation, channels, cls, method):
    net, x = setup(nd, channels)
    M = random_mask(x)
    target = SegmentTarget(cls, MaskRegion(M), activation=activation)
    options = {"pool_size": 2} if method == "seg-xres-cam" else {}
    res = explain(net, x, target, layer="features", method=method, relu=False, normalization="none", **options)
    A = features(net, x)
    w, b = explained_head(net, cls, activation)
    expected = closed_form(method, A, w, b, M, pool=2)
    assert res.raw.shape == expected.shape
    torch.testing.assert_close(res.raw.double(), expected, rtol=1e-5, atol=1e-5)
    # same grid: the post-processed map without ReLU/normalisation equals the raw map
    torch.testing.assert_close(res.map.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nd", DIMS)
@pytest.mark.parametrize("activation,channels,cls", HEADS)
def test_hires_sum_is_score_minus_bias(nd, activation, channels, cls):
    net, x = setup(nd, channels, seed=3)
    M = random_mask(x, seed=4)
    res = explain(net, x, SegmentTarget(cls, MaskRegion(M), activation=activation), layer="features",
                  relu=False, normalization="none")
    _, b = explained_head(net, cls, activation)
    dims = tuple(range(1, res.raw.ndim))
    expected = res.score.double() - M.sum(dim=dims).double() * b
    torch.testing.assert_close(res.raw.double().sum(dim=dims), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("nd", DIMS)
def test_xres_limits_are_hires_and_grad(nd):
    net, x = setup(nd, 3)
    target = SegmentTarget(2, MaskRegion(random_mask(x)))
    kw = dict(layer="features", relu=False, normalization="none")
    hires = explain(net, x, target, method="seg-hires-grad-cam", **kw).raw
    grad = explain(net, x, target, method="seg-grad-cam", **kw).raw
    torch.testing.assert_close(explain(net, x, target, method="seg-xres-cam", pool_size=1, **kw).raw, hires)
    torch.testing.assert_close(explain(net, x, target, method="seg-xres-cam", pool_size=None, **kw).raw, grad)


@pytest.mark.parametrize("nd", DIMS)
@pytest.mark.parametrize("activation,channels,cls", [("softmax", 2, 1), ("sigmoid", 1, 1)])
def test_euler_identity_for_homogeneous_tail(nd, activation, channels, cls):
    torch.manual_seed(5)
    net = HomogeneousNet(nd=nd, classes=channels).double()
    x = torch.randn((1, 1) + ((8, 9) if nd == 2 else (4, 5, 6)), dtype=torch.float64)
    target = SegmentTarget(cls, PredictedRegion(), activation=activation) if channels > 1 else \
        SegmentTarget(cls, MaskRegion(random_mask(x, 7)), activation=activation)
    res = explain(net, x, target, layer="features", relu=False, normalization="none")
    torch.testing.assert_close(res.raw.sum().double(), res.score.sum().double(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("nd", DIMS)
def test_mean_reduction_and_probability_score(nd):
    net, x = setup(nd, 1)
    M = random_mask(x)
    kw = dict(layer="features", relu=False, normalization="none")
    summed = explain(net, x, SegmentTarget(1, MaskRegion(M)), **kw)
    mean = explain(net, x, SegmentTarget(1, MaskRegion(M), reduction="mean"), **kw)
    count = M.flatten(1).sum(1).double().view((-1,) + (1,) * (M.ndim - 1))
    torch.testing.assert_close(mean.raw.double(), summed.raw.double() / count)
    # sigmoid probabilities: d sigmoid(z) = p (1 - p) dz, so HiRes = 1[M] p (1 - p) (z - b)
    prob = explain(net, x, SegmentTarget(1, MaskRegion(M), score="probabilities"), **kw)
    with torch.no_grad():
        p = torch.sigmoid(net(x)[:, 0])
    torch.testing.assert_close(prob.raw.double(), summed.raw.double() * p * (1 - p), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("nd", DIMS)
@pytest.mark.parametrize("method", METHODS)
def test_empty_target_gives_zero_flat_map(nd, method):
    net, x = setup(nd, 2)
    res = explain(net, x, empty_target(1), layer="features", method=method)
    assert torch.count_nonzero(res.raw) == 0 and torch.count_nonzero(res.map) == 0
    assert bool(res.flat.all())
    assert res.score.abs().max() == 0


def test_empty_region_is_a_clear_error():
    net, x = setup(3, 2)
    with pytest.raises(TargetError, match="empty"):
        explain(net, x, SegmentTarget(1, MaskRegion(torch.zeros(x.shape[2:], dtype=torch.bool))), layer="features")


def test_threshold_target_matches_eiecs_definition():
    net, x = setup(3, 2)
    tau = 0.3
    res = explain(net, x, threshold_target(1, tau), layer="features", relu=False, normalization="none")
    with torch.no_grad():
        probs = torch.softmax(net(x), 1)[:, 1]
    keep = probs > tau
    torch.testing.assert_close(res.region, keep)
    torch.testing.assert_close(res.score.double(), (probs * keep).flatten(1).sum(1))


def test_batch_elements_are_independent():
    net, x = setup(3, 3)
    both = explain(net, x, SegmentTarget(2), layer="features", method="seg-grad-cam")
    for b in range(x.shape[0]):
        one = explain(net, x[b:b + 1], SegmentTarget(2), layer="features", method="seg-grad-cam")
        torch.testing.assert_close(both.map[b:b + 1], one.map)
        torch.testing.assert_close(both.raw[b:b + 1], one.raw)


def test_several_targets_from_one_forward_equal_separate_runs():
    net, x = setup(2, 3)
    counter = {"n": 0}
    net.register_forward_pre_hook(lambda m, i: counter.__setitem__("n", counter["n"] + 1))
    targets = [whole_image_target(c) for c in range(3)] + [SegmentTarget(1, VoxelRegion((4, 5), radius=2))]
    many = compute_cams(net, x[:1], targets, layers="features")
    assert counter["n"] == 1
    for target, res in zip(targets, many):
        one = explain(net, x[:1], target, layer="features")
        torch.testing.assert_close(res.map, one.map)


def test_regions_voxel_ball_and_components():
    out = torch.zeros(1, 2, 7, 7)
    out[0, 1, 1:3, 1:3] = 5.0  # component of 4 voxels
    out[0, 1, 5, 5] = 5.0  # component of 1 voxel
    out[0, 1, 4:7, 0] = 5.0  # component of 3 voxels
    largest = SegmentTarget(1, ComponentRegion(PredictedRegion())).region(out)
    assert int(largest.sum()) == 4 and bool(largest[0, 1, 1])
    second = SegmentTarget(1, ComponentRegion(PredictedRegion(), 1)).region(out)
    assert int(second.sum()) == 3 and bool(second[0, 5, 0])
    seeded = SegmentTarget(1, ComponentRegion(PredictedRegion(), (5, 5))).region(out)
    assert int(seeded.sum()) == 1
    ball = SegmentTarget(1, VoxelRegion((3, 3), radius=1)).region(out)
    assert int(ball.sum()) == 5  # the voxel and its 4 face neighbours
    mm = SegmentTarget(1, VoxelRegion((3, 3), radius=1.0, spacing=(1.0, 0.5))).region(out)
    assert int(mm.sum()) == 7  # 0.5 mm along x: two neighbours each side, one along y
    with pytest.raises(TargetError, match="outside"):
        SegmentTarget(1, VoxelRegion((9, 9))).region(out)
    with pytest.raises(TargetError, match="not inside"):
        SegmentTarget(1, ComponentRegion(PredictedRegion(), (0, 6))).region(out)


def test_label_value_and_missing_label():
    out = torch.zeros(1, 2, 4, 4, 4)
    labels = torch.zeros(4, 4, 4)
    labels[:2] = 3
    labels[3] = 7
    region = SegmentTarget(1, MaskRegion(labels, label=7)).region(out)
    assert int(region.sum()) == 16 and bool(region[0, 3].all())
    with pytest.raises(TargetError, match="label 5 does not occur.*0, 3, 7"):
        SegmentTarget(1, MaskRegion(labels, label=5)).region(out)


def test_connected_components_match_bruteforce_flood_fill():
    g = torch.Generator().manual_seed(11)
    from SegHiResCAMLib.engine import connected_components
    for shape in [(13, 17), (6, 7, 8)]:
        mask = torch.rand(shape, generator=g) > 0.55
        labels = connected_components(mask)
        # flood fill reference with full connectivity
        import itertools
        ref = torch.zeros(shape, dtype=torch.long)
        n = 0
        offsets = [o for o in itertools.product((-1, 0, 1), repeat=len(shape)) if any(o)]
        for start in itertools.product(*[range(s) for s in shape]):
            if mask[start] and ref[start] == 0:
                n += 1
                stack = [start]
                ref[start] = n
                while stack:
                    p = stack.pop()
                    for o in offsets:
                        q = tuple(a + b for a, b in zip(p, o))
                        if all(0 <= qi < s for qi, s in zip(q, shape)) and mask[q] and ref[q] == 0:
                            ref[q] = n
                            stack.append(q)
        assert torch.equal(labels, ref)


def test_upsampled_map_is_trilinear_of_layer_map():
    from nets import TinyUNet
    net = TinyUNet(nd=3).double()
    x = torch.randn(1, 1, 8, 10, 12, dtype=torch.float64)
    res = explain(net, x, SegmentTarget(1), layer="down", relu=True, normalization="max")
    up = F.interpolate(torch.relu(res.raw)[:, None], size=x.shape[2:], mode="trilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(res.map.double(), up / up.max(), rtol=1e-5, atol=1e-6)
    assert res.raw.shape[1:] == (4, 5, 6)


def test_several_methods_share_one_backward_pass():
    net, x = setup(3, 3)
    target = SegmentTarget(2, MaskRegion(random_mask(x)))
    many = compute_cams(net, x, [target], ["features"], ["seg-hires-grad-cam", "seg-grad-cam", "seg-xres-cam"],
                        pool_size=2)
    assert [r.method for r in many] == ["seg-hires-grad-cam", "seg-grad-cam", "seg-xres-cam"]
    for res in many:
        one = explain(net, x, target, layer="features", method=res.method,
                      **({"pool_size": 2} if res.method == "seg-xres-cam" else {}))
        torch.testing.assert_close(res.map, one.map)


def test_slab_wise_class_maps_equal_the_whole_tensor_ones(monkeypatch):
    """class_probability / predicted_mask / the runner's label map work slab by slab (memory); same values."""
    import numpy as np
    from types import SimpleNamespace
    from SegHiResCAMLib.engine import targets as targets_module
    from SegHiResCAMLib.analysis.explain import label_map
    torch.manual_seed(5)
    out = torch.randn(2, 4, 7, 5, 3)
    out[:, 2, 0, 0, 0] = out[:, 3, 0, 0, 0]  # a tie: arg-max picks the first index either way
    monkeypatch.setattr(targets_module, "SLAB_ELEMENTS", 37)  # several slabs of uneven size
    assert len(targets_module.output_slabs(out)) > 2
    for c in range(4):
        probs = targets_module.class_probability(out, c)
        # softmax over a slab and over the whole tensor round differently in their vectorised tails: a few ulps
        torch.testing.assert_close(probs, torch.softmax(out, 1)[:, c], rtol=4e-7, atol=1e-7)
        assert torch.equal(targets_module.predicted_mask(out, c), out.argmax(1) == c)
    model = SimpleNamespace(activation="softmax", num_classes=4)
    np.testing.assert_array_equal(label_map(out, model), out[0].argmax(0).numpy())
    single = out[:, :1]
    assert torch.equal(targets_module.predicted_mask(single, 1), torch.sigmoid(single[:, 0]) > 0.5)
    assert torch.equal(targets_module.predicted_mask(single, 0), torch.sigmoid(-single[:, 0]) > 0.5)


def test_postprocess_never_overwrites_the_raw_map():
    from SegHiResCAMLib.engine.postprocess import postprocess
    raw = torch.tensor([[[1.0, -2.0], [4.0, 0.5]]])
    kept = raw.clone()
    heat, flat = postprocess(raw, (2, 2), relu=False, normalization="max")
    assert torch.equal(raw, kept) and not flat.any()
    torch.testing.assert_close(heat, kept / 4.0)
    heat, _ = postprocess(raw, (2, 2), relu=False, normalization="minmax")
    assert torch.equal(raw, kept)
    torch.testing.assert_close(heat, (kept + 2.0) / 6.0)
    heat, flat = postprocess(torch.zeros(1, 2, 2), (4, 4), normalization="max")
    assert flat.all() and not heat.any()


@pytest.mark.parametrize("classes", [2, 3, 7])
def test_is_argmax_equals_argmax_with_ties_and_nan(classes):
    from SegHiResCAMLib.engine.targets import is_argmax, predicted_mask
    rng = np.random.RandomState(classes)
    out = torch.from_numpy(rng.randint(0, 3, size=(2, classes, 5, 6, 7)).astype(np.float32))  # many ties
    for c in range(classes):
        assert torch.equal(is_argmax(out, c), out.argmax(dim=1) == c)
        assert torch.equal(predicted_mask(out, c, "softmax"), out.argmax(dim=1) == c)
    out[0, classes - 1, 1, 2, 3] = float("nan")  # arg-max ranks NaN highest
    for c in range(classes):
        assert torch.equal(is_argmax(out, c), out.argmax(dim=1) == c)
