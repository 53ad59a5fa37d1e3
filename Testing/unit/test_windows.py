"""Sliding-window CAM: exact against the whole volume (one window) and the linear-head identity (many windows)."""

import pytest
import torch

from SegHiResCAMLib import catalog
from SegHiResCAMLib.engine import MaskRegion, SegmentTarget, compute_cams, count_hooks, whole_image_target
from SegHiResCAMLib.engine.windows import WindowedCAM, importance_map, window_starts
from SegHiResCAMLib.errors import CancelledError

from nets import LinearHeadNet, TinyUNet

METHODS = [m.name for m in catalog.METHODS]  # every method, seg-xres-cam included


@pytest.mark.parametrize("nd", [2, 3])
def test_single_window_equals_whole_volume(nd):
    torch.manual_seed(0)
    net = TinyUNet(nd=nd).double()
    x = torch.randn((2, 1) + (12,) * nd, dtype=torch.float64)
    targets = [whole_image_target(1), SegmentTarget(0, MaskRegion(torch.rand((12,) * nd) > 0.5))]
    ref = compute_cams(net, x, targets, ["dec", "down"], METHODS)
    win = WindowedCAM(net, x, 12, ["dec", "down"]).explain(targets, METHODS)
    assert len(ref) == len(win) == 2 * 2 * len(METHODS)
    for a, b in zip(ref, win):
        assert (a.layer, a.method) == (b.layer, b.method)
        scale = a.raw.abs().max().item() or 1.0
        torch.testing.assert_close(b.raw.double() / scale, a.raw.double() / scale, rtol=0, atol=1e-5)
        torch.testing.assert_close(b.map, a.map, rtol=0, atol=1e-5)
    assert count_hooks(net) == 0


@pytest.mark.parametrize("nd,shape", [(3, (2, 1, 20, 24, 18)), (2, (1, 1, 40, 36))])
@pytest.mark.parametrize("blend", ["constant", "gaussian"])
def test_linear_head_identity_on_the_blended_prediction(nd, shape, blend):
    torch.manual_seed(1)
    net = LinearHeadNet(nd=nd, classes=3).double()
    x = torch.randn(*shape, dtype=torch.float64)
    cam = WindowedCAM(net, x, 8, ["features"], overlap=0.5, blend=blend)
    M = torch.rand((shape[0],) + shape[2:]) > 0.5
    hires, grad = cam.explain([SegmentTarget(2, MaskRegion(M))], ["seg-hires-grad-cam", "seg-grad-cam"],
                              relu=False, normalization="none")
    assert len(cam.windows) > 20
    Y = cam.prediction()[(slice(None), 2) + tuple(slice(0, s) for s in shape[2:])]
    b = net.head.bias[2].item()
    Mf = M.double()
    torch.testing.assert_close(hires.raw.double(), Mf * (Y - b), rtol=0, atol=1e-5)
    count = Mf.flatten(1).sum(1).view((-1,) + (1,) * nd)
    torch.testing.assert_close(grad.raw.double(), count / M[0].numel() * (Y - b), rtol=0, atol=1e-5)
    # the windows really differ from one whole-volume pass (zero padding at window borders)
    with torch.no_grad():
        assert (net(x)[:, 2] - Y).abs().max() > 1e-3


@pytest.mark.parametrize("nd,shape", [(3, (1, 1, 21, 24, 17)), (2, (2, 1, 39, 36))])
@pytest.mark.parametrize("pool", [2, 3, None])
def test_seg_xres_cam_linear_head_identity_with_pools_cut_by_the_border(nd, shape, pool):
    """Seg-XRes-CAM is not element-wise: a pool window may straddle two sliding windows, so the windowed map is
    combined once from the blended A and the summed G (exactly the whole-volume map with one window, see above).
    For a head linear in the layer its raw map is ``avgpool(1[M]) * (Y^c - b_c)`` on the blended prediction: pool
    windows tiled from voxel 0, a window cut by the volume's border averaging its in-volume voxels (odd sizes
    here); ``pool_size=None`` is Seg-Grad-CAM."""
    torch.manual_seed(8)
    net = LinearHeadNet(nd=nd, classes=3).double()
    x = torch.randn(*shape, dtype=torch.float64)
    cam = WindowedCAM(net, x, 8, ["features"], overlap=0.5)
    M = torch.rand((shape[0],) + shape[2:]) > 0.6
    xres, grad = cam.explain([SegmentTarget(2, MaskRegion(M))], ["seg-xres-cam", "seg-grad-cam"], relu=False,
                             normalization="none", pool_size=pool)
    assert len(cam.windows) > 10 and xres.options["pool_size"] == pool
    Y = cam.prediction()[(slice(None), 2) + tuple(slice(0, s) for s in shape[2:])]
    b = net.head.bias[2].item()
    if pool is None:
        torch.testing.assert_close(xres.raw, grad.raw, rtol=0, atol=1e-9)
        return
    avg_pool = torch.nn.functional.avg_pool3d if nd == 3 else torch.nn.functional.avg_pool2d
    pooled = avg_pool(M.double()[:, None], pool, pool, ceil_mode=True, count_include_pad=False)[:, 0]
    for axis in range(1, nd + 1):
        pooled = pooled.repeat_interleave(pool, dim=axis)
    pooled = pooled[(slice(None),) + tuple(slice(0, s) for s in shape[2:])]
    assert set(pooled.unique().tolist()) - {0.0, 1.0}  # partial windows, the border-cut ones among them
    torch.testing.assert_close(xres.raw.double(), pooled * (Y - b), rtol=0, atol=1e-5)


def _forward_counter(net):
    """Counts the forward calls of ``net``; returns the counter and the hook handle to remove."""
    calls = {"n": 0}
    handle = net.register_forward_pre_hook(lambda m, i: calls.__setitem__("n", calls["n"] + 1))
    return calls, handle


def test_second_target_reuses_the_prediction_and_cancel_between_windows():
    torch.manual_seed(2)
    net = TinyUNet(nd=3)
    calls, counter = _forward_counter(net)
    x = torch.randn(1, 1, 24, 24, 24)
    cam = WindowedCAM(net, x, 16, ["dec"], overlap=0.5)
    cam.explain([whole_image_target(1)])
    first = calls["n"]
    cam.explain([whole_image_target(0)])
    assert calls["n"] - first == len(cam.windows)  # pass 2 only; pass 1 (blended prediction) is reused
    counter.remove()
    seen = []

    def cancel(fraction, message):
        seen.append(message)
        if "gradients, window 2" in message:
            raise CancelledError("cancelled")

    with pytest.raises(CancelledError):
        WindowedCAM(net, x, 16, ["dec"], overlap=0.5, progress=cancel).explain([whole_image_target(1)])
    assert count_hooks(net) == 0 and all(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("nd,shape", [(3, (1, 1, 24, 20, 16)), (2, (2, 1, 40, 36))])
def test_windows_outside_the_target_are_skipped_and_the_maps_stay_exact(nd, shape):
    """A small target (a clicked voxel) runs only the windows whose share of dS/dY is non-zero; the linear-head
    identity still holds exactly, for the element-wise map and for Grad-CAM's blended channel weights."""
    torch.manual_seed(6)
    net = LinearHeadNet(nd=nd, classes=3).double()
    x = torch.randn(*shape, dtype=torch.float64)
    cam = WindowedCAM(net, x, 8, ["features"], overlap=0.5)
    M = torch.zeros((shape[0],) + shape[2:], dtype=torch.bool)
    M[(slice(None),) + (slice(1, 4),) * nd] = True  # a corner: a few windows cover it
    calls, handle = _forward_counter(net)
    try:
        hires, grad = cam.explain([SegmentTarget(2, MaskRegion(M))], ["seg-hires-grad-cam", "seg-grad-cam"],
                                  relu=False, normalization="none")
        first = calls["n"]
        # Grad-CAM needs every window's activation once (without a graph): pass 1 + those, then only the live ones
        assert 0 < cam.windows_run < len(cam.windows) / 4
        assert hires.options["windows_run"] == cam.windows_run
        # a second small target reuses the prediction and the blended activations: only its live windows run
        (again,) = cam.explain([SegmentTarget(1, MaskRegion(M))], "seg-grad-cam", relu=False, normalization="none")
        assert calls["n"] - first == cam.windows_run
    finally:
        handle.remove()
    Y = cam.prediction()[(slice(None), slice(None)) + tuple(slice(0, s) for s in shape[2:])]
    Mf = M.double()
    count = Mf.flatten(1).sum(1).view((-1,) + (1,) * nd)
    for res, c in ((hires, 2), (grad, 2), (again, 1)):
        b = net.head.bias[c].item()
        expected = Mf * (Y[:, c] - b) if res.method == "seg-hires-grad-cam" else count / M[0].numel() * (Y[:, c] - b)
        torch.testing.assert_close(res.raw.double(), expected, rtol=0, atol=1e-5)


def _naive_windowed(net, cam, target, layer, methods):
    """Reference for every method: the whole-volume gradient of the target, every window run forward and
    backward with its share, the per-window maps summed and A, G blended over all windows."""
    import torch.nn.functional as F
    from SegHiResCAMLib.engine.methods import get_method
    Y = cam.prediction().detach().requires_grad_(True)
    crop = (slice(None),) + tuple(slice(0, s) for s in cam.spatial)
    region = torch.zeros((Y.shape[0],) + cam.padded, dtype=torch.bool)
    region[crop] = target.region(Y.detach()[(slice(None),) + crop])
    (gY,) = torch.autograd.grad(target(Y, region).sum(), Y)
    module = dict(net.named_modules())[layer]
    built = [get_method(m) for m in methods]
    maps, A, W, G = {}, None, None, None
    for start in cam.windows:
        where = cam._slices(start)
        store = {}
        handle = module.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
        try:
            out = net(cam.x[where])
        finally:
            handle.remove()
        a = store["a"]
        (g,) = torch.autograd.grad(out, a, grad_outputs=gY[where] * cam.weights / cam._norm[where[2:]])
        a, g = a.detach(), g.detach()
        f = [r // n for r, n in zip(cam.roi, a.shape[2:])]
        grid = tuple(p // k for p, k in zip(cam.padded, f))
        if A is None:
            A = torch.zeros(a.shape[:2] + grid, dtype=a.dtype)
            G, W = torch.zeros_like(A), torch.zeros(grid, dtype=a.dtype)
        at = (slice(None), slice(None)) + tuple(slice(s // k, s // k + n) for s, k, n in zip(start, f, a.shape[2:]))
        w = F.adaptive_avg_pool3d(cam.weights[None, None].to(a.dtype), tuple(a.shape[2:]))[0, 0]
        A[at] += a * w
        W[at[2:]] += w
        G[at] += g
        for m in built:
            if m.elementwise:
                maps.setdefault(m.name, torch.zeros((a.shape[0],) + grid, dtype=a.dtype))[(slice(None),) + at[2:]] += \
                    m.combine(a, g)
    for m in built:
        if not m.elementwise:
            maps[m.name] = m.combine(A / W.clamp_min(1e-12), G)
    return maps


@pytest.mark.parametrize("score", ["logits", "probabilities"])
def test_skipped_windows_give_the_maps_of_every_window_run(score):
    """The same small target on a U-Net (skip connection, non-linear head): every method's map equals the
    reference that runs every window (zero shares included) and blends over all of them."""
    torch.manual_seed(7)
    net = TinyUNet(nd=3).double()
    x = torch.randn((1, 1, 24, 24, 16), dtype=torch.float64)
    M = torch.zeros(24, 24, 16, dtype=torch.bool)
    M[18:22, 2:6, 9:12] = True
    target = SegmentTarget(1, MaskRegion(M), score=score)
    cam = WindowedCAM(net, x, 8, ["dec"], overlap=0.5)
    fast = cam.explain([target], METHODS, relu=False, normalization="none")
    assert 0 < cam.windows_run < len(cam.windows) / 2
    ref = _naive_windowed(net, cam, target, "dec", METHODS)
    for res in fast:
        expected = ref[res.method][(slice(None),) + tuple(slice(0, n) for n in res.raw.shape[1:])]
        scale = expected.abs().max().item()
        assert scale > 0, res.method
        torch.testing.assert_close(res.raw.double() / scale, expected / scale, rtol=0, atol=1e-6, msg=res.method)


def test_window_layout_helpers():
    assert window_starts(100, 40, 0.25, 1) == [0, 30, 60]
    assert window_starts(100, 40, 0.25, 16) == [0, 16, 32, 48, 60]
    assert window_starts(30, 40, 0.25) == [0]
    w = importance_map((9, 9), "gaussian")
    assert w.max() == 1.0 and w.min() > 0 and w[4, 4] == 1.0 and w[0, 0] < w[4, 0] < w[4, 4]


@pytest.mark.parametrize("score,reduction", [("logits", "mean"), ("probabilities", "sum"),
                                             ("probabilities", "mean")])
def test_single_window_equals_whole_volume_for_every_score(score, reduction):
    torch.manual_seed(3)
    net = TinyUNet(nd=3).double()
    x = torch.randn((2, 1, 12, 12, 12), dtype=torch.float64)
    targets = [SegmentTarget(1, MaskRegion(torch.rand(12, 12, 12) > 0.5), score=score, reduction=reduction)]
    ref = compute_cams(net, x, targets, ["dec"], METHODS)
    win = WindowedCAM(net, x, 12, ["dec"]).explain(targets, METHODS)
    for a, b in zip(ref, win):
        torch.testing.assert_close(b.score.double(), a.score.double(), rtol=1e-6, atol=1e-9)
        scale = a.raw.abs().max().item() or 1.0
        torch.testing.assert_close(b.raw.double() / scale, a.raw.double() / scale, rtol=0, atol=1e-5)


@pytest.mark.parametrize("score,reduction", [("logits", "sum"), ("probabilities", "mean")])
def test_window_shares_equal_the_whole_volume_gradient(score, reduction):
    """Each window's share is computed on the window alone; it equals the whole-volume gradient's share."""
    torch.manual_seed(4)
    net = TinyUNet(nd=3).double()
    x = torch.randn((1, 1, 20, 24, 16), dtype=torch.float64)
    cam = WindowedCAM(net, x, 8, ["dec"], overlap=0.5, blend="gaussian")
    target = SegmentTarget(1, MaskRegion(torch.rand(20, 24, 16) > 0.3), score=score, reduction=reduction)
    (res,) = cam.explain([target], "seg-hires-grad-cam", relu=False, normalization="none")
    assert len(cam.windows) > 8
    ref = _naive_windowed(net, cam, target, "dec", ["seg-hires-grad-cam"])["seg-hires-grad-cam"]
    ref = ref[(slice(None),) + tuple(slice(0, n) for n in res.raw.shape[1:])]
    scale = ref.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(res.raw.double() / scale, ref / scale, rtol=0, atol=1e-6)  # float32 window weights


@pytest.mark.parametrize("windowed", [False, True])
def test_mixed_precision_on_the_cpu_is_bfloat16_with_float32_maps(windowed, monkeypatch):
    """``--amp`` on a CPU: the forward pass runs in bfloat16 (forced here, so that the path runs on any CPU; a CPU
    without native bfloat16 is refused, see test_bad_inputs), maps come back float32 and close to float32's."""
    import SegHiResCAMLib.engine.cam as cam
    monkeypatch.setattr(cam, "cpu_bfloat16", lambda: True)
    torch.manual_seed(3)
    net = TinyUNet(nd=3)
    x = torch.randn(1, 1, 16, 16, 16)
    targets = [whole_image_target(1)]
    seen = []
    hook = net.dec[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))

    def run(amp):
        if windowed:
            return WindowedCAM(net, x, 8, ["dec"], overlap=0.5, autocast=amp).explain(targets, METHODS[:2])
        return compute_cams(net, x, targets, ["dec"], METHODS[:2], autocast=amp)
    try:
        full, mixed = run(False), run(True)
    finally:
        hook.remove()
    assert torch.bfloat16 in seen and torch.float32 in seen  # autocast reached the convolutions
    for a, b in zip(full, mixed):
        assert b.map.dtype == b.raw.dtype == torch.float32 and b.map.shape == a.map.shape
        r = torch.corrcoef(torch.stack([a.raw.flatten(), b.raw.flatten()]))[0, 1]
        assert r > 0.99, (a.method, float(r))
    assert count_hooks(net) == 0


@pytest.mark.parametrize("windowed", [False, True])
def test_float16_backward_is_seeded_at_a_safe_scale(windowed, monkeypatch):
    """``--amp`` on CUDA runs the graph in float16, where a small seed underflows (confident probabilities: p(1-p)
    ~1e-10 and less). Simulated with float16 autocast on the CPU: the seed is scaled by a power of two and the
    gradients scaled back, so the map stays that of float32; unscaled, the gradients vanish."""
    import SegHiResCAMLib.engine.cam as cam
    import SegHiResCAMLib.engine.windows as windows
    half = lambda device: torch.autocast("cpu", dtype=torch.float16)  # noqa: E731
    monkeypatch.setattr(cam, "autocast_context", half)
    monkeypatch.setattr(windows, "autocast_context", half)
    torch.manual_seed(4)
    net = TinyUNet(nd=3)
    with torch.no_grad():
        net.head.weight.mul_(60.0)  # confident (logit margins 20-40): the probability gradients are tiny
        net.head.bias.mul_(60.0)
    x = torch.randn(1, 1, 16, 16, 16)
    targets = [SegmentTarget(1, score="probabilities", reduction="mean")]

    def run(amp):
        if windowed:
            return WindowedCAM(net, x, 16, ["dec"], autocast=amp).explain(targets, "seg-hires-grad-cam")[0]
        return compute_cams(net, x, targets, ["dec"], "seg-hires-grad-cam", autocast=amp)[0]
    full, mixed = run(False), run(True)
    assert full.raw.abs().max() < 1e-6  # the float32 map itself is tiny
    r = torch.corrcoef(torch.stack([full.raw.flatten(), mixed.raw.flatten()]))[0, 1]
    assert r > 0.99 and torch.allclose(mixed.raw.abs().max(), full.raw.abs().max(), rtol=0.05)
    monkeypatch.setattr(cam, "power_of_two", lambda seed: 1.0)
    monkeypatch.setattr(windows, "power_of_two", lambda seed: 1.0)
    unscaled = run(True)
    assert unscaled.raw.abs().max() < 0.5 * full.raw.abs().max()  # what the scaling prevents
