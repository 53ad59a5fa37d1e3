"""Shared fixtures for the SegHiResCAM test suite (plain pytest, no Slicer application)."""

import os

import pytest
import torch

# keep runs reproducible and within CI's 2 cores
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# subnormals as zero on every torch thread, as the command line does (threads inherit it: set before any op)
torch.set_flush_denormal(True)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Skips are loud: one line with their count (0 in a normal ``make test``; every test's dependency is
    installed there), then each skipped test with its reason. ``-ra`` lists them too; this makes the count explicit
    and shows it even under ``-q``/``-rN``."""
    skipped = terminalreporter.stats.get("skipped", [])
    terminalreporter.write_line("skipped tests: %d" % len(skipped), yellow=bool(skipped), bold=bool(skipped))
    for report in skipped:
        if isinstance(report.longrepr, tuple) and len(report.longrepr) == 3:
            where, reason = "%s:%s" % report.longrepr[:2], report.longrepr[2]
        else:
            where, reason = "", str(report.longrepr)
        terminalreporter.write_line("  %s: %s%s" % (report.nodeid, reason, " (%s)" % where if where else ""))
