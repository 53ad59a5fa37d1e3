"""Independent reference: the engine's Seg-Grad-CAM and Seg-HiRes-Grad CAM against Captum (2D and 3D).

The explained scalar ``y^c_M = sum_{p in M} Y^c_p`` (docs/algorithms.md) is written here as a plain module wrapping
the network, ``forward(x) -> [B]``; Captum differentiates it on its own forward pass with its own hooks:

- ``LayerGradCam(wrapper, layer)`` with ``relu_attributions=False`` is ``sum_k mean_q(G_kq) A_k``: the engine's
  ``raw`` for ``seg-grad-cam``;
- ``LayerGradientXActivation(wrapper, layer)`` summed over channels is ``sum_k G_k A_k``: the engine's ``raw``
  for ``seg-hires-grad-cam``.

The heatmap is then rebuilt from Captum's map (ReLU, (bi/tri)linear up-sampling with ``align_corners=False``,
division by the per-element maximum) and compared with the engine's ``map``. Networks run in float64; the
engine hands back float32 maps, so the tolerance is 1e-5 absolute for normalised maps and 1e-5 relative to the
largest reference value for raw maps. Batches of two elements throughout, layers in the encoder (coarser than
the input: up-sampling is exercised) and in the decoder.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captum.attr import LayerGradCam, LayerGradientXActivation
from SegHiResCAMLib.engine import MaskRegion, SegmentTarget, compute_cams

TOL = 1e-5
#: largest differences seen (raw: relative to the reference's peak; map: absolute), printed at the end
DIFFS = {"raw": 0.0, "map": 0.0}
METHODS = ("seg-grad-cam", "seg-hires-grad-cam")
# enc, dec2: input grid; down, dec1: 1/2; bottleneck (and its max-pool "bottleneck.0"): 1/4 of the input grid
LAYERS = ("enc", "down", "bottleneck", "bottleneck.0", "dec1", "dec2")
SHAPES = {2: (2, 1, 12, 20), 3: (2, 1, 12, 16, 20)}
CLASSES = 3


def _conv(nd):
    return nn.Conv2d if nd == 2 else nn.Conv3d


class EncoderDecoder(nn.Module):
    """Conv -> ReLU; stride-2 conv; max-pool + conv bottleneck; transposed conv + skip; up-sample + skip; head."""

    def __init__(self, nd: int, inplace: bool = False, classes: int = CLASSES, width: int = 4):
        super().__init__()
        conv = _conv(nd)
        pool = nn.MaxPool2d if nd == 2 else nn.MaxPool3d
        transposed = nn.ConvTranspose2d if nd == 2 else nn.ConvTranspose3d
        self.enc = nn.Sequential(conv(1, width, 3, padding=1), nn.ReLU(inplace=inplace))
        self.down = nn.Sequential(conv(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(inplace=inplace))
        self.bottleneck = nn.Sequential(pool(2), conv(2 * width, 2 * width, 3, padding=1), nn.ReLU(inplace=inplace))
        # "bottleneck.1" is the raw convolution: signed activations; "bottleneck.0" is the pool
        self.up1 = transposed(2 * width, 2 * width, 2, stride=2)
        self.dec1 = nn.Sequential(conv(4 * width, 2 * width, 3, padding=1), nn.ReLU(inplace=inplace))
        self.up2 = nn.Upsample(scale_factor=2, mode="bilinear" if nd == 2 else "trilinear", align_corners=False)
        self.dec2 = nn.Sequential(conv(3 * width, width, 3, padding=1), nn.ReLU(inplace=inplace))
        self.head = conv(width, classes, 1)

    def forward(self, x):
        e = self.enc(x)
        d = self.down(e)
        b = self.bottleneck(d)
        u = self.dec1(torch.cat([self.up1(b), d], 1))
        return self.head(self.dec2(torch.cat([self.up2(u), e], 1)))


class RegionScore(nn.Module):
    """``y = sum_{p in M} s^c_p`` (or the mean over M) per batch element, shape ``[B]``; M is fixed (detached).

    ``s`` is the logit of class ``c`` or, with ``probabilities=True``, its softmax probability.
    """

    def __init__(self, net: nn.Module, class_index: int, mask: torch.Tensor, mean: bool = False,
                 probabilities: bool = False):
        super().__init__()
        self.net = net
        self.class_index = class_index
        self.register_buffer("mask", mask.detach().to(torch.float64))
        self.mean = mean
        self.probabilities = probabilities

    def forward(self, x):
        out = self.net(x)
        values = torch.softmax(out, dim=1)[:, self.class_index] if self.probabilities else out[:, self.class_index]
        dims = tuple(range(1, values.ndim))
        mask = self.mask.expand_as(values)
        total = (values * mask).sum(dim=dims)
        if self.mean:
            total = total / mask.sum(dim=dims).clamp_min(1.0)
        return total


def make_net(nd: int, inplace: bool = False, seed: int = 7) -> nn.Module:
    """A seeded random network whose head bias is centred on the test input, so every class is predicted
    somewhere in every batch element (a random head otherwise lets one class win everywhere)."""
    torch.manual_seed(seed)
    net = EncoderDecoder(nd, inplace=inplace).double().eval()
    with torch.no_grad():
        for m in net.modules():  # He initialisation keeps activations O(1) through the ReLUs
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.uniform_(m.bias, -0.1, 0.1)
        net.head.bias.zero_()
        logits = net(make_input(nd))
        net.head.bias.copy_(-logits.transpose(0, 1).flatten(1).median(dim=1).values)
    return net


def make_input(nd: int, seed: int = 11) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPES[nd], generator=gen, dtype=torch.float64)


def user_mask(nd: int) -> torch.Tensor:
    """A fixed box, different per batch element, on the output grid ``[B, *S]``."""
    shape = SHAPES[nd]
    mask = torch.zeros((shape[0],) + shape[2:], dtype=torch.bool)
    if nd == 2:
        mask[0, 2:7, 3:11] = True
        mask[1, 5:12, 10:18] = True
    else:
        mask[0, 2:7, 3:11, 4:9] = True
        mask[1, 5:12, 8:15, 10:18] = True
    return mask


def predicted(net: nn.Module, x: torch.Tensor, class_index: int) -> torch.Tensor:
    with torch.no_grad():
        return net(x).argmax(dim=1) == class_index


def captum_raw(wrapper: nn.Module, layer: nn.Module, x: torch.Tensor, method: str) -> torch.Tensor:
    """Captum's signed map on the layer grid, ``[B, *S_layer]`` float64."""
    if method == "seg-grad-cam":
        attr = LayerGradCam(wrapper, layer).attribute(x, target=None, relu_attributions=False)
        return attr[:, 0].detach()
    attr = LayerGradientXActivation(wrapper, layer).attribute(x, target=None)
    return attr.sum(dim=1).detach()


def reference_map(raw: torch.Tensor, size):
    """ReLU, up-sample to the input grid (linear, ``align_corners=False``), divide by the per-element maximum.

    Returns ``(maps, flat)``; an element whose map is zero after the ReLU (a legitimate Seg-Grad-CAM outcome
    when every channel weight meets a negative activation sum) stays zero and is flagged flat.
    """
    mode = {2: "bilinear", 3: "trilinear"}[len(size)]
    maps = torch.relu(raw)
    if tuple(maps.shape[1:]) != tuple(size):
        maps = F.interpolate(maps[:, None], size=tuple(size), mode=mode, align_corners=False)[:, 0]
    peak = maps.flatten(1).amax(dim=1)
    flat = peak == 0
    scale = torch.where(flat, torch.ones_like(peak), peak)
    return maps / scale.view((-1,) + (1,) * (maps.ndim - 1)), flat


def max_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    assert tuple(got.shape) == tuple(want.shape), (tuple(got.shape), tuple(want.shape))
    return float((got.detach().double() - want.detach().double()).abs().max())


def assert_raw_close(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative to the largest reference value (stricter than 1e-5 absolute for the small maps here, looser
    only for values above 1, where float32 cannot hold 1e-5 absolute)."""
    got, want = got.detach(), want.detach()
    scale = float(want.abs().max())
    assert scale > 0, "reference raw map is identically zero: the test explains nothing"
    diff = max_diff(got, want)
    assert diff <= TOL * scale, "raw map differs from Captum by %.3g (scale %.3g)" % (diff, scale)
    DIFFS["raw"] = max(DIFFS["raw"], diff / scale)
    return diff


def assert_map_close(got: torch.Tensor, want: torch.Tensor) -> float:
    diff = max_diff(got, want)
    assert diff <= TOL, "heatmap differs from the Captum reference by %.3g" % diff
    DIFFS["map"] = max(DIFFS["map"], diff)
    return diff


def module(net: nn.Module, name: str) -> nn.Module:
    return dict(net.named_modules())[name]


def check(res, wrapper, net, x, layer: str, method: str):
    """Engine result vs Captum: raw map, heatmap, score and flags."""
    raw_ref = captum_raw(wrapper, module(net, layer), x, method)
    assert_raw_close(res.raw, raw_ref)
    map_ref, flat_ref = reference_map(raw_ref, x.shape[2:])
    assert_map_close(res.map, map_ref)
    assert torch.equal(res.flat.cpu(), flat_ref)
    with torch.no_grad():
        score = wrapper(x)
    assert_raw_close(res.score, score)
    return flat_ref


# --------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _report_differences():
    """Print the largest differences seen (visible with ``pytest -s``)."""
    yield
    print("\nlargest difference to Captum: raw %.3g (relative to peak), heatmap %.3g (absolute)"
          % (DIFFS["raw"], DIFFS["map"]))



@pytest.fixture(scope="module", params=[2, 3], ids=["2d", "3d"])
def nd(request):
    return request.param


def test_setup_is_meaningful(nd):
    """Every class is predicted somewhere in every batch element; encoder layers are coarser than the input."""
    net, x = make_net(nd), make_input(nd)
    for c in range(CLASSES):
        mask = predicted(net, x, c)
        counts = mask.flatten(1).sum(dim=1)
        assert bool((counts > 0).all()), "class %d not predicted in some batch element: %s" % (c, counts.tolist())
    grids = {}
    hooks = [module(net, name).register_forward_hook(lambda m, i, o, name=name: grids.__setitem__(name, o.shape[2:]))
             for name in LAYERS]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in hooks:
            h.remove()
    spatial = x.shape[2:]
    assert tuple(grids["enc"]) == tuple(spatial) and tuple(grids["dec2"]) == tuple(spatial)
    assert tuple(grids["down"]) == tuple(s // 2 for s in spatial) == tuple(grids["dec1"])
    assert tuple(grids["bottleneck"]) == tuple(s // 4 for s in spatial)


@pytest.mark.parametrize("attr_dim_summation", [True, False])
def test_captum_gradcam_channel_summation(nd, attr_dim_summation):
    """Captum's ``attr_dim_summation=False`` keeps channels; their sum is the summed map (sanity of the reference)."""
    net, x = make_net(nd), make_input(nd)
    wrapper = RegionScore(net, 1, predicted(net, x, 1))
    layer = module(net, "dec1")
    summed = LayerGradCam(wrapper, layer).attribute(x, relu_attributions=False, attr_dim_summation=True)
    attr = LayerGradCam(wrapper, layer).attribute(x, relu_attributions=False, attr_dim_summation=attr_dim_summation)
    per_channel = attr.sum(dim=1, keepdim=True) if not attr_dim_summation else attr
    assert attr.shape[1] == (1 if attr_dim_summation else module(net, "dec1")[0].out_channels)
    assert max_diff(per_channel, summed) <= 1e-12
    res = compute_cams(net, x, [SegmentTarget(1)], ["dec1"], "seg-grad-cam")[0]
    assert_raw_close(res.raw, per_channel[:, 0])


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("method", METHODS)
def test_predicted_region_matches_captum(nd, method, layer):
    """Default target (voxels predicted as class 1), one layer, one method."""
    net, x = make_net(nd), make_input(nd)
    mask = predicted(net, x, 1)
    res = compute_cams(net, x, [SegmentTarget(1)], [layer], method)[0]
    assert torch.equal(res.region, mask)
    assert res.raw.shape[0] == x.shape[0] and res.map.shape == (x.shape[0],) + x.shape[2:]
    flat = check(res, RegionScore(net, 1, mask), net, x, layer, method)
    assert not bool(flat.any()), "class 1 gives a non-trivial heatmap at every layer of this network"


@pytest.mark.parametrize("method", METHODS)
def test_several_targets_and_layers_in_one_call(nd, method):
    """Classes 0, 1, 2 and a user mask, at an encoder and a decoder layer, from one forward pass, each equal to
    a separate Captum run."""
    net, x = make_net(nd), make_input(nd)
    box = user_mask(nd)
    targets = [SegmentTarget(0), SegmentTarget(1), SegmentTarget(2), SegmentTarget(1, MaskRegion(box), name="box")]
    layers = ["down", "bottleneck", "dec1", "dec2"]
    results = compute_cams(net, x, targets, layers, method)
    assert len(results) == len(targets) * len(layers)
    masks = [predicted(net, x, 0), predicted(net, x, 1), predicted(net, x, 2), box]
    classes = [0, 1, 2, 1]
    for t_index, (c, mask) in enumerate(zip(classes, masks)):
        wrapper = RegionScore(net, c, mask)
        for l_index, layer in enumerate(layers):
            res = results[t_index * len(layers) + l_index]
            assert res.layer == layer and res.target is targets[t_index]
            assert torch.equal(res.region, mask)
            check(res, wrapper, net, x, layer, method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layer", ["bottleneck", "dec1"])
def test_nested_layers_in_one_call(nd, method, layer):
    """A block and its own sub-modules hooked together; the block's output is its last ReLU's output, so two
    hooks see the same tensor."""
    net, x = make_net(nd), make_input(nd)
    names = [layer] + ["%s.%d" % (layer, i) for i in range(len(module(net, layer)))]
    mask = predicted(net, x, 2)
    results = compute_cams(net, x, [SegmentTarget(2)], names, method)
    wrapper = RegionScore(net, 2, mask)
    for name, res in zip(names, results):
        assert res.layer == name
        check(res, wrapper, net, x, name, method)


@pytest.mark.parametrize("layer", ["enc", "bottleneck", "dec2"])
@pytest.mark.parametrize("method", METHODS)
def test_mean_reduction_matches_captum(nd, method, layer):
    """``reduction="mean"`` equals Captum on a wrapper dividing by |M|, for the prediction and a user mask."""
    net, x = make_net(nd), make_input(nd)
    box = user_mask(nd)
    targets = [SegmentTarget(0, reduction="mean"), SegmentTarget(2, MaskRegion(box), reduction="mean")]
    results = compute_cams(net, x, targets, [layer], method)
    for res, (c, mask) in zip(results, [(0, predicted(net, x, 0)), (2, box)]):
        check(res, RegionScore(net, c, mask, mean=True), net, x, layer, method)
    # the mean map differs from the sum map by exactly 1/|M| per batch element before normalisation
    total = compute_cams(net, x, [SegmentTarget(0)], [layer], method)[0]
    sizes = predicted(net, x, 0).flatten(1).sum(dim=1).double()
    want = total.raw.double() / sizes.view((-1,) + (1,) * (total.raw.ndim - 1))
    assert_raw_close(results[0].raw, want)
    assert_map_close(results[0].map, total.map)


@pytest.mark.parametrize("method", METHODS)
def test_probability_scores_match_captum(nd, method):
    """``score="probabilities"`` equals Captum on a softmax wrapper (saturation makes these maps small)."""
    net, x = make_net(nd), make_input(nd)
    mask = predicted(net, x, 1)
    res = compute_cams(net, x, [SegmentTarget(1, score="probabilities")], ["dec1"], method)[0]
    check(res, RegionScore(net, 1, mask, probabilities=True), net, x, "dec1", method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layer", ["enc", "enc.0", "bottleneck", "bottleneck.1", "dec1", "dec1.0"])
def test_inplace_relu_model_matches_captum_on_out_of_place_copy(nd, method, layer):
    """In-place ReLUs (as in most U-Nets) must not change the maps: engine on the in-place network, Captum on an
    out-of-place copy with the same weights; the model's flags are left as found. ``*.0``/``bottleneck.1`` are
    convolutions whose output the next in-place ReLU overwrites."""
    net_inplace = make_net(nd, inplace=True)
    net = copy.deepcopy(net_inplace)
    for m in net.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    x = make_input(nd)
    x_before = x.clone()
    mask = predicted(net, x, 1)
    res = compute_cams(net_inplace, x, [SegmentTarget(1)], [layer], method)[0]
    assert torch.equal(x, x_before)
    assert all(m.inplace for m in net_inplace.modules() if isinstance(m, nn.ReLU))
    assert all(p.requires_grad and p.grad is None for p in net_inplace.parameters())
    check(res, RegionScore(net, 1, mask), net, x, layer, method)


@pytest.mark.parametrize("method", METHODS)
def test_unnormalised_no_relu_map_is_upsampled_captum(nd, method):
    """``relu=False, normalization="none"``: the heatmap is Captum's signed map up-sampled, nothing else."""
    net, x = make_net(nd), make_input(nd)
    mask = predicted(net, x, 0)
    res = compute_cams(net, x, [SegmentTarget(0)], ["bottleneck.1"], method, relu=False, normalization="none")[0]
    raw_ref = captum_raw(RegionScore(net, 0, mask), module(net, "bottleneck.1"), x, method)
    assert bool((raw_ref < 0).any()) and bool((raw_ref > 0).any()), "want a signed map here"
    mode = "bilinear" if nd == 2 else "trilinear"
    want = F.interpolate(raw_ref[:, None], size=tuple(x.shape[2:]), mode=mode, align_corners=False)[:, 0]
    assert_raw_close(res.map, want)
