"""``reusing_freed_memory``: a loop of CPU passes keeps its freed memory instead of paying the kernel to zero fresh
pages for every pass (engine/outputs.py); the deletion/insertion scorer and model randomisation run inside it."""

import resource

import pytest
import torch
from torch import nn

from SegHiResCAMLib.engine import outputs
from SegHiResCAMLib.engine.cam import compute_cams
from SegHiResCAMLib.engine.faithfulness import model_randomization, perturbation_curves
from SegHiResCAMLib.engine.outputs import MALLOC_VARIABLE, reusing_freed_memory
from SegHiResCAMLib.engine.targets import SegmentTarget

pytestmark = pytest.mark.skipif(outputs._glibc() is None, reason="needs the GNU C library (Linux)")

SIZE = 64 << 20  # bytes: far above glibc's largest mmap threshold (32 MiB)
PAGES = SIZE // 4096


def _faults_of_second_allocation() -> int:
    """Minor page faults of writing a fresh 64 MiB tensor right after an equal one was freed."""
    first = torch.ones(SIZE // 4, dtype=torch.float32)
    del first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    second = torch.ones(SIZE // 4, dtype=torch.float32)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del second
    return faults


def _resident() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def test_freed_memory_is_reused_inside_and_returned_after(monkeypatch):
    monkeypatch.delenv(MALLOC_VARIABLE, raising=False)
    with reusing_freed_memory() as active:
        assert active
        # the kernel zeroes no new pages once the loop runs (in a heap that earlier tests left fragmented, the
        # first rounds may land on free blocks whose pages malloc_trim gave back)
        assert min(_faults_of_second_allocation() for _ in range(4)) < PAGES // 20
        kept = _resident()
    # (outside a block glibc gives a freed 64 MiB straight back and the next one costs 16384 faults again)
    assert kept - _resident() > SIZE // 2  # settings restored and the kept memory given back


def test_nested_blocks_keep_the_setting_until_the_outer_one_ends(monkeypatch):
    monkeypatch.delenv(MALLOC_VARIABLE, raising=False)
    with reusing_freed_memory():
        with reusing_freed_memory():
            pass
        assert outputs._reuse_depth == 1
        assert min(_faults_of_second_allocation() for _ in range(4)) < PAGES // 20
        kept = _resident()
    assert outputs._reuse_depth == 0
    assert kept - _resident() > SIZE // 2


def test_the_environment_variable_keeps_the_system_settings(monkeypatch):
    calls = []
    monkeypatch.setattr(outputs, "_glibc", lambda: calls.append(1))
    monkeypatch.setenv(MALLOC_VARIABLE, "system")
    with reusing_freed_memory() as active:
        assert not active and outputs._reuse_depth == 0
    assert not calls  # the C library is not touched


class _Net(nn.Module):
    """A tiny segmentation network that logs, for each forward pass (its randomised copies' too), whether freed
    memory was being kept."""

    log = []  # a class attribute: shared with the deep copies that model randomisation makes

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 4, 3, padding=1)
        self.head = nn.Conv3d(4, 2, 1)

    def forward(self, x):
        _Net.log.append(outputs._reuse_depth > 0)
        return self.head(torch.relu(self.conv(x)))


def test_curves_and_randomisation_run_inside_and_give_the_same_numbers(monkeypatch):
    results = {}
    for setting in ("", "system"):
        monkeypatch.setenv(MALLOC_VARIABLE, setting)
        net = _Net().eval()
        x = torch.randn(1, 1, 12, 12, 12, generator=torch.Generator().manual_seed(1))
        segment = torch.zeros(1, 12, 12, 12, dtype=torch.bool)
        segment[:, 3:9, 3:9, 3:9] = True
        target = SegmentTarget(1)
        reference = compute_cams(net, x, [target], ["conv"], ["seg-grad-cam"])
        heat = torch.rand(12, 12, 12, generator=torch.Generator().manual_seed(2))
        _Net.log.clear()
        curves = perturbation_curves(net, x, target, [heat], steps=4, batch_size=1)
        # 2 curves x 3 interior steps + the fully replaced input, all in the scorer's loop
        assert sum(_Net.log) == (7 if setting == "" else 0) and len(_Net.log) >= 7
        _Net.log.clear()
        stages = model_randomization(net, x, target, ["conv"], ["seg-grad-cam"], 2, reference=reference,
                                     segment=segment)
        # the passes of the two randomised stages (a first pass that finds the module order runs before)
        assert _Net.log[-2:] == [setting == ""] * 2 and sum(_Net.log) == (2 if setting == "" else 0)
        assert outputs._reuse_depth == 0  # left again
        results[setting] = ([c.scores for c in curves[0].values()],
                            [s.correlations_in_segment for s in stages])
    assert results[""] == results["system"]
