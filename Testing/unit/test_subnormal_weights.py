"""Subnormal weights are set to zero when a model is loaded (models/weights.py:zero_subnormal_parameters): the
outputs stay the same, the count is in the model's provenance, and the bits decide (not a comparison, which sees
zero wherever the processor treats subnormals as zero, as the test suite's conftest makes it)."""

import torch

import toy_models
from SegHiResCAMLib.models import load_model
from SegHiResCAMLib.models.weights import _subnormal, zero_subnormal_parameters


def _subnormal_float32(count, negative=False):
    """``count`` float32 subnormals made from their bits (no arithmetic, which flushing would turn into 0)."""
    bits = torch.arange(1, count + 1, dtype=torch.int32) * 997
    if negative:
        bits = bits | torch.tensor(-2 ** 31, dtype=torch.int32)
    return bits.view(torch.float32)


def test_bits_find_subnormals_that_a_comparison_misses():
    values = torch.cat([_subnormal_float32(3), _subnormal_float32(2, negative=True),
                        torch.tensor([0.0, -0.0, 1.0, float(torch.finfo(torch.float32).tiny), float("inf"),
                                      float("nan")])])
    assert _subnormal(values).tolist() == [True] * 5 + [False] * 6
    # the other widths, also from bits: the smallest and the largest subnormal, the smallest normal, zero and -0.0
    for dtype, int_dtype, fraction_bits in ((torch.float16, torch.int16, 10), (torch.bfloat16, torch.int16, 7),
                                            (torch.float64, torch.int64, 52)):
        sign = -(2 ** (torch.finfo(dtype).bits - 1))
        bits = torch.tensor([1, 2 ** fraction_bits - 1, 2 ** fraction_bits, 0, sign], dtype=int_dtype)
        assert _subnormal(bits.view(dtype)).tolist() == [True, True, False, False, False], dtype


def test_loaded_model_has_its_subnormal_weights_zeroed_and_the_same_outputs(tmp_path):
    torch.manual_seed(0)
    net = toy_models.unet3d()
    with torch.no_grad():
        weights = [p for p in net.parameters() if p.dim() > 1]
        planted = 0
        for p in weights[:2]:
            flat = p.view(-1)
            flat[:7] = _subnormal_float32(7)
            planted += 7
    path = tmp_path / "unet.pt"
    torch.save(net.state_dict(), str(path))
    model = load_model("toy_models:unet3d", weights=str(path))
    assert model.resolved["subnormal_parameters_zeroed"] == planted
    assert model.describe()["resolved"]["subnormal_parameters_zeroed"] == planted
    assert not any(bool(_subnormal(p).any()) for p in model.network.parameters())
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.network(x), net.eval()(x))
    assert zero_subnormal_parameters(model.network) == 0  # nothing left: a second call changes nothing


def test_hd_bet_loads_with_its_subnormal_weights_zeroed():
    model = load_model("hd-bet")
    assert model.resolved["subnormal_parameters_zeroed"] == 7389865  # 45% of its 16.3 M parameters
    assert not any(bool(_subnormal(p).any()) for p in model.network.parameters())
