"""Hook hygiene and model/input preservation: after success and after failure the model is exactly as found."""

import copy

import pytest
import torch
from torch import nn

from SegHiResCAMLib.engine import (SegmentTarget, auto_layer, compute_cams, count_hooks, explain, main_output,
                                   whole_image_target,
                                   trace_layers)
from SegHiResCAMLib.errors import InputError, LayerError, ModelError

from nets import TinyUNet


def snapshot(model):
    return {
        "params": {n: (p.detach().clone(), p.requires_grad, p.grad) for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "modules": [(n, type(m), m) for n, m in model.named_modules()],
        "training": {n: m.training for n, m in model.named_modules()},
        "inplace": {n: getattr(m, "inplace", None) for n, m in model.named_modules()},
        "hooks": count_hooks(model),
    }


def assert_same(model, before):
    after = snapshot(model)
    assert after["hooks"] == 0 == before["hooks"]
    assert after["modules"] == before["modules"]  # same names, types and module objects (nothing replaced)
    assert after["training"] == before["training"]
    assert after["inplace"] == before["inplace"]
    for name, (value, req, grad) in before["params"].items():
        new_value, new_req, new_grad = after["params"][name]
        assert torch.equal(new_value, value) and new_req == req and new_grad is None and grad is None
    for name, value in before["buffers"].items():
        assert torch.equal(after["buffers"][name], value)


def mixed_state_unet(nd=3):
    net = TinyUNet(nd=nd)
    net.train()
    net.dec.eval()  # mixed training flags must come back exactly
    net.enc[0].weight.requires_grad_(False)  # a frozen parameter stays frozen, the others stay trainable
    net.bn = nn.BatchNorm3d(4) if nd == 3 else nn.BatchNorm2d(4)  # buffers (running stats) must not move
    return net


@pytest.mark.parametrize("nd", [2, 3])
def test_success_leaves_model_and_input_untouched(nd):
    net = mixed_state_unet(nd)
    x = torch.randn((2, 1) + (8,) * nd)
    x_copy = x.clone()
    before = snapshot(net)
    res = compute_cams(net, x, [whole_image_target(1), whole_image_target(0)], layers=["enc", "dec", "down.2"])
    assert len(res) == 6
    assert_same(net, before)
    assert torch.equal(x, x_copy) and not x.requires_grad and x.grad is None


def test_input_that_requires_grad_is_not_touched():
    net = TinyUNet(nd=2)
    x = torch.randn(1, 1, 8, 8, requires_grad=True)
    explain(net, x, SegmentTarget(1, region=None), layer="dec")
    assert x.requires_grad and x.grad is None and x.is_leaf


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("kaboom inside the model")


@pytest.mark.parametrize("failure", ["model-raises", "layer-not-tensor", "shared-module", "unknown-layer",
                                     "target-empty", "layer-unused"])
def test_failure_leaves_model_untouched(failure):
    net = mixed_state_unet(3)
    x = torch.randn(1, 1, 8, 8, 8)
    layer = "dec"
    target = SegmentTarget(1, region=None)
    if failure == "model-raises":
        net.dec.add_module("boom", Boom())
        expected = ModelError
    elif failure == "layer-not-tensor":
        class Pair(nn.Module):
            def forward(self, x):
                return x, x
        net.pair = Pair()
        original = net.forward
        net.forward = lambda x: original(net.pair(x)[0])
        layer, expected = "pair", LayerError
    elif failure == "shared-module":
        relu = nn.ReLU()
        net.enc[1] = relu
        net.dec[1] = relu
        layer, expected = "enc.1", LayerError
    elif failure == "unknown-layer":
        layer, expected = "decc", LayerError
    elif failure == "target-empty":
        target, expected = SegmentTarget(1, region=__import__("SegHiResCAMLib.engine", fromlist=["EmptyRegion"]).MaskRegion(torch.zeros(8, 8, 8))), Exception
    else:
        layer, expected = "aux", LayerError
    before = snapshot(net)
    with pytest.raises(expected) as info:
        explain(net, x, target, layer=layer)
    assert_same(net, before)
    if failure == "unknown-layer":
        assert "did you mean dec" in str(info.value)
    if failure == "model-raises":
        assert "kaboom" in str(info.value) and "(1, 1, 8, 8, 8)" in str(info.value)


def test_inplace_relu_after_layer_does_not_alter_captured_activation():
    torch.manual_seed(2)
    net = TinyUNet(nd=3).double()
    x = torch.randn(1, 1, 8, 8, 8, dtype=torch.float64)
    # hooking the conv just before an in-place ReLU: A must be the conv output (signed), not the rectified one
    captured = {}
    handle = net.dec[0].register_forward_hook(lambda m, i, o: captured.__setitem__("A", o.clone()))
    with torch.no_grad():
        reference_out = net(x)
    handle.remove()
    assert (captured["A"] < 0).any()
    res = explain(net, x, SegmentTarget(1, region=None), layer="dec.0", relu=False, normalization="none")
    torch.testing.assert_close(res.output, reference_out, rtol=0, atol=0)
    # HiRes map = sum_k G_k A_k with A signed: recompute with autograd on an unhooked copy
    twin = copy.deepcopy(net)
    A = twin.dec[0](torch.cat([twin.up(twin.down(twin.enc(x))), twin.enc(x)], 1)).detach().requires_grad_(True)
    y = twin.head(twin.dec[1](A.clone()))
    score = (y[:, 1] * res.region).sum()
    (G,) = torch.autograd.grad(score, A)
    torch.testing.assert_close(res.raw, (G * A).sum(1).detach())


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_deep_supervision_explains_full_resolution_output(kind):
    torch.manual_seed(0)
    net = TinyUNet(nd=3, deep_supervision=kind).double()
    plain = TinyUNet(nd=3).double()
    plain.load_state_dict(net.state_dict())
    x = torch.randn(1, 1, 8, 8, 8, dtype=torch.float64)
    a = explain(net, x, SegmentTarget(1), layer="dec")
    b = explain(plain, x, SegmentTarget(1), layer="dec")
    torch.testing.assert_close(a.map, b.map)
    assert a.output.shape == (1, 2, 8, 8, 8)


def test_main_output_rules():
    small, big = torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 8, 8)
    assert main_output([small, big]) is big
    assert main_output({"aux": small, "logits": big}) is big
    assert main_output({"a": small, "b": big}, key="a") is small
    with pytest.raises(ModelError, match="keys are: a, b"):
        main_output({"a": small, "b": big}, key="c")
    with pytest.raises(ModelError, match="no output tensor"):
        main_output("nope")


def test_auto_layer_is_last_full_resolution_block_before_head():
    net = TinyUNet(nd=3)
    x = torch.randn(1, 1, 8, 8, 8)
    assert auto_layer(net, x) == "dec"
    infos, head, out_shape = trace_layers(net, x)
    assert head == "head" and out_shape == (1, 2, 8, 8, 8)
    shapes = {i.name: i.shape for i in infos}
    assert shapes["down"] == (1, 8, 4, 4, 4) and shapes["aux"] is None
    assert count_hooks(net) == 0
    res = explain(net, x, SegmentTarget(1, region=None), layer="auto")
    assert res.layer == "dec"


def test_bad_inputs_fail_early_with_remedy():
    net = TinyUNet(nd=3)
    with pytest.raises(InputError, match="expects 1 input channel.*has 2"):
        explain(net, torch.randn(1, 2, 8, 8, 8), layer="dec")
    with pytest.raises(InputError, match="NaN"):
        explain(net, torch.full((1, 1, 8, 8, 8), float("nan")), layer="dec")
    with pytest.raises(InputError, match=r"\[batch, channels"):
        explain(net, torch.randn(8, 8, 8), layer="dec")
    with pytest.raises(InputError, match="unknown method"):
        explain(net, torch.randn(1, 1, 8, 8, 8), layer="dec", method="hires")
    assert count_hooks(net) == 0


def test_cancelled_gradient_means_are_flagged_for_grad_cam_only():
    """A layer followed by instance normalisation: every channel's gradient averages to 0 (a shift of a channel
    does not change the normalised output), so Grad-CAM's channel weights are rounding noise; HiRes is fine."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.InstanceNorm3d(4, affine=True), nn.ReLU(),
                        nn.Conv3d(4, 2, 1))
    x = torch.randn(1, 1, 8, 8, 8)
    grad_cam, hires = compute_cams(net, x, [whole_image_target(1)], ["0"], ["seg-grad-cam", "seg-hires-grad-cam"])
    assert grad_cam.options["gradient_mean_ratio"] < 1e-4
    assert len(grad_cam.warnings) == 1 and "cancel" in grad_cam.warnings[0] and "layer 0" in grad_cam.warnings[0]
    assert hires.warnings == []
    plain = explain(net, x, whole_image_target(1), layer="2", method="seg-grad-cam")
    assert plain.warnings == [] and plain.options["gradient_mean_ratio"] > 1e-3


def test_session_reuses_the_forward_pass_for_new_targets():
    from SegHiResCAMLib.engine import CAMSession, SegmentTarget, VoxelRegion
    torch.manual_seed(3)
    net = TinyUNet(nd=3)
    x = torch.randn(1, 1, 8, 8, 8)
    calls = {"n": 0}
    counter = net.register_forward_pre_hook(lambda m, i: calls.__setitem__("n", calls["n"] + 1))
    session = CAMSession(net, x, ["dec", "down"])
    first = session.explain([whole_image_target(1)])
    second = session.explain([SegmentTarget(1, VoxelRegion((4, 4, 4), radius=2))], method="seg-grad-cam")
    assert calls["n"] == 1  # one forward pass served both calls
    counter.remove()
    for res, target, method in [(first, whole_image_target(1), "seg-hires-grad-cam"),
                                (second, SegmentTarget(1, VoxelRegion((4, 4, 4), radius=2)), "seg-grad-cam")]:
        fresh = compute_cams(net, x, [target], ["dec", "down"], method)
        for a, b in zip(res, fresh):
            torch.testing.assert_close(a.map, b.map)
    assert count_hooks(net) == 0 and all(p.requires_grad for p in net.parameters())
    session.release()
    with pytest.raises(Exception, match="released"):
        session.explain([whole_image_target(1)])
