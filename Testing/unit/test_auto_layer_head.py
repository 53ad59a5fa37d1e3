"""The head found by the layer trace (and so the ``auto`` layer) when a freed intermediate of the output's shape
left its memory address to the output.

``trace_layers`` recognises the head by the address and shape of its output tensor. Before the fix a module
whose output had the final shape and was freed before the output was made (conv -> norm -> conv) could pass for
the head: on this machine at 32^3 the trace named ``up`` here, and MONAI's ``UNet`` (residual units) at 32^3
its ``model.2.0.conv``, so ``auto`` fell back to a half-resolution layer (``model.1``). Whether the allocator
reuses the address depends on the sizes, so several are tried."""

import torch
from torch import nn

from SegHiResCAMLib.engine.layers import auto_layer, trace_layers


class Tail(nn.Module):
    """conv -> 1x1 conv to the output's channels -> norm -> 1x1 head: ``up``'s output has the output's shape and
    is freed once ``norm`` has run, before ``head`` allocates the output."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv3d(1, 4, 3, padding=1)
        self.up = nn.Conv3d(4, 2, 1)
        self.norm = nn.InstanceNorm3d(2)
        self.head = nn.Conv3d(2, 2, 1)

    def forward(self, x):
        return self.head(self.norm(self.up(self.body(x))))


class ViewOut(nn.Module):
    """The output is a view of the head's tensor (same address): the head is still found."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv3d(1, 4, 3, padding=1)
        self.head = nn.Conv3d(4, 2, 1)

    def forward(self, x):
        return self.head(self.body(x))[:, :]


def test_freed_intermediate_of_the_output_shape_is_not_the_head():
    torch.manual_seed(0)
    for size in (16, 24, 32, 40, 48):
        net = Tail().eval()
        x = torch.randn(1, 1, size, size, size)
        _, head, _ = trace_layers(net, x)
        assert head == "head", (size, head)
        assert auto_layer(net, x) == "norm", size


def test_output_that_is_a_view_of_the_head():
    net = ViewOut().eval()
    _, head, _ = trace_layers(net, torch.randn(1, 1, 8, 8, 8))
    assert head == "head"
