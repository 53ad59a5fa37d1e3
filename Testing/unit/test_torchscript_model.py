"""TorchScript (traced and scripted) and ONNX model files: loaded as eager proxies whose layers can be explained.

The reference is always the eager network the file was made from: same layer names, same state dict, same
outputs and the same heatmaps (to 1e-6) for the engine's methods.
"""

import importlib.util
import sys
import zipfile
from typing import Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from SegHiResCAMLib.engine import SegmentTarget, count_hooks, explain, model_guard, trace_layers, whole_image_target
from SegHiResCAMLib.errors import LayerError, ModelError
from SegHiResCAMLib.models import load_model
from SegHiResCAMLib.models.torchscript import loader as torchscript  # noqa: F401
from SegHiResCAMLib.models.torchscript.loader import (accepts_torchscript_spec, is_onnx_file, is_torchscript_file,
                                               load_torchscript, torchscript_layers)
from SegHiResCAMLib.models.weights import file_sha256

from nets import TinyUNet

SHAPE = (1, 1, 8, 8, 8)
METHODS = ["seg-hires-grad-cam", "seg-grad-cam"]


class ControlFlowUNet(TinyUNet):
    """TinyUNet with scripted control flow: a raising ``if``, a loop filling a list, a helper method that calls a
    child, a free TorchScript function (``F.interpolate``) and a BatchNorm (reads its training flag)."""

    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm3d(4)

    def decode(self, u: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return self.dec(torch.cat([u, e], 1))

    def forward(self, x):
        if x.shape[1] != 1:
            raise ValueError("one input channel expected")
        e = self.enc(x)
        d = self.down(e)
        u = F.interpolate(self.up(d), size=[e.shape[2], e.shape[3], e.shape[4]], mode="nearest")
        y = self.decode(u, e)
        parts: List[torch.Tensor] = []
        for i in range(3):
            parts.append(y * float(i + 1))
        if len(parts) > 2:
            y = self.norm(parts[0] - parts[2] + parts[1] * 2.0)
        else:
            y = parts[0]
        return self.head(y)


class KitchenSink(nn.Module):
    """Common TorchScript constructs: assert, while/break/continue, list slicing and ``+=``, a helper method
    returning a tuple, ``Optional`` attribute and argument, dtype/device, str.format, ModuleDict, dict output."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv3d(1, 3, 3, padding=1), nn.Conv3d(3, 3, 1)])
        self.named = nn.ModuleDict({"a": nn.Conv3d(3, 2, 1), "b": nn.Identity()})
        self.mode: Optional[str] = None
        self.scale = 0.5
        self.register_buffer("offset", torch.tensor(0.25))

    def helper(self, xs: List[torch.Tensor]) -> Tuple[torch.Tensor, int]:
        total = xs[0]
        for t in xs[1:]:
            total = total + t
        return total, len(xs)

    def forward(self, x: torch.Tensor, extra: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        assert x.dim() == 5, "5-D input"
        y = x
        for conv in self.convs:
            y = F.relu(conv(y))
        feats: List[torch.Tensor] = []
        i = 0
        while i < 4:
            i += 1
            if i == 2:
                continue
            if i > 3:
                break
            feats.append(y * float(i))
        feats += [y]
        s, n = self.helper(feats[-3:])
        if self.mode is None and extra is None:
            s = s + self.offset * self.scale
        z = torch.zeros(s.shape, dtype=s.dtype, device=s.device)
        sizes = [int(v) for v in s.shape[2:]]
        k = max(sizes) - min(sizes) + n
        out = self.named["a"](s + z) + float(k) + float(len("size {}".format(k)))
        result: Dict[str, torch.Tensor] = {"out": out}
        result["aux"] = out.sum(dim=1, keepdim=True).to(torch.float64)
        return result


class Forked(nn.Module):
    """A sub-module the interpreter cannot run step by step (``torch.jit.fork``): it runs opaquely."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(4, 4, 3, padding=1)

    def forward(self, x):
        future = torch.jit.fork(self.conv, x)
        return torch.jit.wait(future) + x


class OpaqueInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU())
        self.fancy = Forked()
        self.head = nn.Conv3d(4, 2, 1)

    def forward(self, x):
        return self.head(self.fancy(self.enc(x)))


class SharedReLU(nn.Module):
    """One ReLU called twice: tracing records ``forward`` and ``forward1`` on it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(self.act(x)))


def _save(kind, net, path):
    net.eval()
    module = torch.jit.trace(net, torch.randn(SHAPE)) if kind == "traced" else torch.jit.script(net)
    module.save(str(path))
    return str(path)


def _balanced(net, x):
    """Shift the head's class-1 bias so that about half of the voxels are predicted as class 1 (a random
    network may predict almost none, which would leave nothing to explain)."""
    net.eval()
    with torch.no_grad():
        out = net(x)
        net.head.bias[1] -= (out[:, 1] - out[:, 0]).median()
    return net


@pytest.fixture(scope="module")
def x():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def files(tmp_path_factory, x):
    """{kind: (eager network, TorchScript path)} for a traced TinyUNet, a scripted ControlFlowUNet and a traced
    ControlFlowUNet (sizes read from tensors: aten::size, prim::NumToTensor, aten::Int in the graph)."""
    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("torchscript")
    out = {}
    for kind, net in (("traced", TinyUNet()), ("scripted", ControlFlowUNet()), ("traced-dynamic", ControlFlowUNet())):
        out[kind] = (_balanced(net, x), _save(kind.split("-")[0], net, folder / ("%s.pt" % kind)))
    return out


@pytest.mark.parametrize("kind", ["traced", "scripted", "traced-dynamic"])
def test_layers_parameters_and_outputs_match_the_eager_model(files, x, kind):
    net, path = files[kind]
    model = load_model(path)
    proxy = model.network
    assert [n for n, _ in proxy.named_modules()] == [n for n, _ in net.named_modules()]
    assert [type(m).__name__ for _, m in proxy.named_modules()] == [type(m).__name__ for _, m in net.named_modules()]
    state, eager_state = proxy.state_dict(), net.state_dict()
    assert list(state) == list(eager_state)
    assert all(torch.equal(state[k], eager_state[k]) for k in state)
    script = proxy._ts_script
    own = dict(script.named_parameters())
    assert all(p is own[n] for n, p in proxy.named_parameters())  # the scripted module's own tensors
    reference = torch.jit.load(path)(x)
    with torch.no_grad():
        y = proxy(x)
    assert torch.equal(y, reference)
    assert torch.allclose(y, net(x), atol=1e-6)
    assert model.spatial_dims == 3 and model.in_channels == 1
    assert model.class_names == ["background", "class1"] and model.activation == "softmax"
    assert list(model.file_hashes.values()) == [file_sha256(path)]


def test_every_layer_runs_through_its_proxy(files, x):
    """Traced: every module the trace called is hookable (``aux`` was not called: no forward in the file);
    scripted with control flow: every module."""
    for kind, expected_unhookable in (("traced", {"aux"}), ("scripted", set()), ("traced-dynamic", {"aux"})):
        net, path = files[kind]
        proxy = load_model(path).network
        rows = {row["name"]: row for row in torchscript_layers(proxy)}
        assert {name for name, row in rows.items() if not row["hookable"]} == expected_unhookable
        infos, head, out_shape = trace_layers(proxy, x)
        eager_infos, eager_head, _ = trace_layers(net, x)
        assert head == eager_head == "head" and out_shape == (1, 2, 8, 8, 8)
        assert [(i.name, i.shape, i.calls) for i in infos] == [(i.name, i.shape, i.calls) for i in eager_infos]
    scripted = load_model(files["scripted"][1]).network
    assert scripted._ts_mode == "interpreted" and scripted.get_submodule("enc.0")._ts_mode == "leaf"


@pytest.mark.parametrize("kind", ["traced", "scripted", "traced-dynamic"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("layer", ["dec", "down"])
def test_heatmaps_equal_the_eager_model(files, x, kind, method, layer):
    net, path = files[kind]
    proxy = load_model(path).network
    got = explain(proxy, x, SegmentTarget(1), layer=layer, method=method)
    want = explain(net, x, SegmentTarget(1), layer=layer, method=method)
    assert int(want.region.sum()) > 0 and not bool(want.flat.any())
    assert torch.equal(got.region, want.region)
    assert torch.allclose(got.score, want.score, atol=1e-5)
    assert torch.allclose(got.raw, want.raw, atol=1e-6)
    assert torch.allclose(got.map, want.map, atol=1e-6)
    assert float(got.map.max()) == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["traced", "scripted"])
def test_model_and_scripted_module_left_as_found(files, x, kind):
    _, path = files[kind]
    proxy = load_model(path).network
    script = proxy._ts_script
    before = {n: p.detach().clone() for n, p in script.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in script.named_buffers()}
    proxy.get_submodule("enc.0").weight.requires_grad_(False)  # a frozen parameter stays frozen
    with model_guard(proxy), torch.enable_grad():
        assert not any(p.requires_grad for p in script.parameters())  # the engine's freeze reaches the scripted code
        assert not proxy(x).requires_grad
    assert proxy(x).requires_grad
    explain(proxy, x, SegmentTarget(1), layer="dec")
    with pytest.raises(LayerError):
        explain(proxy, x, SegmentTarget(1), layer="no.such.layer")
    assert count_hooks(proxy) == 0
    for name, param in script.named_parameters():
        assert torch.equal(param, before[name]) and param.grad is None
        assert param.requires_grad == (name != "enc.0.weight")
    assert all(torch.equal(b, buffers[n]) for n, b in script.named_buffers())
    assert not any(m.training for m in proxy.modules()) and not script.training


def test_training_flag_and_buffers_reach_the_scripted_code(files, x):
    net, path = files["scripted"]
    proxy = load_model(path).network
    eager = ControlFlowUNet()
    eager.load_state_dict(net.state_dict())
    proxy.train()
    eager.train()
    with torch.no_grad():
        y, y_eager = proxy(x), eager(x)
    assert torch.allclose(y, y_eager, atol=1e-5)  # batch statistics, not running ones
    assert proxy._ts_script.norm.training
    assert torch.allclose(proxy.norm.running_mean, eager.norm.running_mean, atol=1e-7)
    assert int(proxy.norm.num_batches_tracked) == 1
    assert float(proxy.norm.running_mean.abs().sum()) > 0


def test_dtype_conversion_reaches_the_scripted_module(files, x):
    net, path = files["scripted"]
    proxy = load_model(path).network.double()
    assert proxy._ts_script.norm.running_var.dtype == torch.float64
    assert dict(proxy._ts_script.named_parameters())["enc.0.weight"].dtype == torch.float64
    eager = ControlFlowUNet().double().eval()
    eager.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert torch.allclose(proxy(x.double()), eager(x.double()), atol=1e-12)


def test_weights_file_is_loaded_into_the_scripted_module(files, x, tmp_path):
    net, path = files["traced"]
    other = TinyUNet().eval()
    torch.save(other.state_dict(), tmp_path / "other.pth")
    model = load_model(path, weights=str(tmp_path / "other.pth"))
    with torch.no_grad():
        y = model.network(x)
    assert torch.allclose(y, other(x), atol=1e-6) and not torch.allclose(y, net(x), atol=1e-3)
    assert len(model.file_hashes) == 2 and "other.pth" in model.source
    torch.save({"enc.0.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ModelError, match="do not fit"):
        load_model(path, weights=str(tmp_path / "bad.pth"))


def test_interpreter_runs_common_torchscript_constructs(tmp_path):
    torch.manual_seed(6)
    net = KitchenSink().eval()
    path = _save("scripted", net, tmp_path / "kitchen.pt")
    model = load_model(path)
    proxy = model.network
    assert proxy._ts_mode == "interpreted"
    rows = {row["name"]: row for row in torchscript_layers(proxy)}
    assert [n for n, row in rows.items() if row["hookable"]] == ["convs.0", "convs.1", "named.a", "named.b"]
    x = torch.randn(1, 1, 4, 5, 6)
    with torch.no_grad():
        got, reference, eager = proxy(x), torch.jit.load(path)(x), net(x)
    assert sorted(got) == ["aux", "out"] and got["aux"].dtype == torch.float64
    assert all(torch.equal(got[k], reference[k]) and torch.allclose(got[k], eager[k], atol=1e-6) for k in got)
    for layer in ("convs.0", "named.a"):
        mine = explain(proxy, x, whole_image_target(1), layer=layer, output_key="out")
        want = explain(net, x, whole_image_target(1), layer=layer, output_key="out")
        assert not bool(want.flat.any()) and torch.allclose(mine.map, want.map, atol=1e-6)
    assert count_hooks(proxy) == 0


def test_opaque_submodule_is_explained_whole_and_its_children_are_reported(tmp_path, x):
    torch.manual_seed(2)
    net = _balanced(OpaqueInside(), x)
    model = load_model(_save("scripted", net, tmp_path / "forked.pt"))
    proxy = model.network
    rows = {row["name"]: row for row in torchscript_layers(proxy)}
    assert rows["fancy"]["mode"] == "opaque" and rows["fancy"]["hookable"]
    assert not rows["fancy.conv"]["hookable"] and "prim::fork" in rows["fancy.conv"]["note"]
    assert [r for r, row in rows.items() if not row["hookable"]] == ["fancy.conv"]
    assert "opaque: fancy" in model.source
    for layer in ("fancy", "enc"):
        got = explain(proxy, x, SegmentTarget(1), layer=layer)
        want = explain(net, x, SegmentTarget(1), layer=layer)
        assert int(want.region.sum()) > 0 and torch.allclose(got.map, want.map, atol=1e-6)
    with pytest.raises(LayerError, match="did not run"):
        explain(proxy, x, SegmentTarget(1), layer="fancy.conv")
    assert count_hooks(proxy) == 0


def test_shared_module_in_a_trace_is_refused_and_others_work(tmp_path):
    torch.manual_seed(3)
    x = torch.randn(SHAPE)
    net = SharedReLU().eval()
    with torch.no_grad():
        net.conv.bias[1] -= (net(x)[:, 1] - net(x)[:, 0]).median()
    proxy = load_model(_save("traced", net, tmp_path / "shared.pt")).network
    assert sorted(proxy.act._ts_script._c._method_names()) == ["forward", "forward1"]
    with pytest.raises(LayerError, match="more than once"):
        explain(proxy, x, SegmentTarget(1), layer="act")
    got = explain(proxy, x, SegmentTarget(1), layer="conv")
    want = explain(net, x, SegmentTarget(1), layer="conv")
    assert torch.allclose(got.map, want.map, atol=1e-6) and count_hooks(proxy) == 0


def test_interpretation_off_runs_the_file_whole(files, x):
    net, path = files["traced"]
    model = load_torchscript(path, interpret=False)
    assert [n for n, _ in model.network.named_modules()] == [n for n, _ in net.named_modules()]
    with torch.no_grad():
        assert torch.equal(model.network(x), torch.jit.load(path)(x))
    assert "0 of 13 layers explainable" in model.source
    with pytest.raises(LayerError, match="did not run"):
        explain(model.network, x, SegmentTarget(1), layer="dec")


def test_file_detection(files, tmp_path):
    _, path = files["traced"]
    torch.save(TinyUNet().state_dict(), tmp_path / "state.pt")
    assert is_torchscript_file(path)
    assert not is_torchscript_file(str(tmp_path / "state.pt"))  # a zip, but no TorchScript code
    assert not is_torchscript_file(str(tmp_path / "missing.pt"))
    assert not is_torchscript_file("mypkg.nets:unet") and not accepts_torchscript_spec("mypkg.nets:unet")
    assert accepts_torchscript_spec(str(tmp_path / "state.pt")) and not accepts_torchscript_spec(str(tmp_path))
    assert is_onnx_file("model.ONNX") and not is_onnx_file(path)


def test_unusable_files_give_a_clear_model_error(files, tmp_path):
    _, path = files["traced"]
    data = open(path, "rb").read()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated or damaged") as info:
        load_model(str(truncated))
    assert "truncated.pt" in str(info.value)
    garbled = tmp_path / "garbled.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(garbled, "w") as dst:
        for item in src.infolist():
            body = src.read(item)
            # nets.py, or nets/___torch_mangle_N.py when TinyUNet was traced before in this process
            nets_code = item.filename.endswith(".py") and ("/nets.py" in item.filename or "/nets/" in item.filename)
            dst.writestr(item, b"def forward(self, x:\n  return ((" if nets_code else body)
    assert is_torchscript_file(str(garbled))
    with pytest.raises(ModelError, match="cannot load TorchScript file") as info:
        load_model(str(garbled))
    assert "garbled.pt" in str(info.value)
    state = tmp_path / "state.pt"
    torch.save(TinyUNet().state_dict(), state)
    with pytest.raises(ModelError, match="without TorchScript code.*--weights"):
        load_model(str(state))
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "missing.pt"))
    with pytest.raises(ModelError, match="model_args do not apply"):
        load_model(path, model_args={"classes": 3})


def test_onnx_file(tmp_path, x):
    """An ONNX export of a TinyUNet, converted by onnx2torch (installed by ``make test``): end to end against the
    eager model. No fallback: a missing converter fails here (its error is tested below)."""
    torch.manual_seed(4)
    net = _balanced(TinyUNet(), x)
    path = tmp_path / "tiny.onnx"
    torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])
    model = load_model(str(path))
    assert model.source.startswith("onnx ") and "converted by onnx2torch" in model.source
    assert isinstance(model.network, torch.fx.GraphModule)
    layer = [n for n, _ in model.network.named_modules() if n.endswith("dec/1/Relu")]
    assert len(layer) == 1 and model.spatial_dims == 3 and model.class_names == ["background", "class1"]
    with torch.no_grad():
        assert torch.allclose(model.network(x), net(x), atol=1e-5)
    got = explain(model.network, x, SegmentTarget(1), layer=layer[0])
    want = explain(net, x, SegmentTarget(1), layer="dec")
    assert int(want.region.sum()) > 0 and torch.allclose(got.map, want.map, atol=1e-5)
    assert count_hooks(model.network) == 0
    stand_in = sys.modules.get("torchvision")
    assert stand_in is None or hasattr(stand_in, "__file__")  # the torchvision stand-in is not left behind
    with pytest.raises(ModelError, match="does not exist"):
        load_model(str(tmp_path / "missing.onnx"))


@pytest.mark.parametrize("missing", ["onnx", "onnx2torch"])
def test_onnx_without_the_converter_is_a_clear_error(tmp_path, monkeypatch, missing):
    """Simulated: the package is made unimportable (``sys.modules[name] = None``: find_spec finds nothing and
    ``import`` raises). The message says how to install the converter without pulling a torchvision."""
    monkeypatch.setitem(sys.modules, missing, None)
    assert importlib.util.find_spec(missing) is None
    path = tmp_path / "tiny.onnx"
    path.write_bytes(b"not read: the converter is missing")
    with pytest.raises(ModelError) as info:
        load_model(str(path))
    text = str(info.value)
    assert "the %s package is not installed" % missing in text
    assert "pip install onnx onnx2torch" in text and "--no-deps" in text and "torchvision" in text


def test_onnx2torch_that_fails_to_import_is_a_clear_error(tmp_path, monkeypatch):
    """Installed but broken (found, yet its import raises, with or without the torchvision stand-in)."""
    import builtins
    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "onnx2torch":
            raise ImportError("simulated broken onnx2torch")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "onnx2torch", raising=False)
    monkeypatch.setattr(builtins, "__import__", broken)
    path = tmp_path / "tiny.onnx"
    path.write_bytes(b"not read: the converter cannot be imported")
    with pytest.raises(ModelError, match="cannot import onnx2torch: simulated broken onnx2torch") as info:
        load_model(str(path))
    assert "pip install onnx onnx2torch" in str(info.value)
