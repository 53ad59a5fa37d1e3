"""Shared fixtures for the SegHiResCAM test suite (plain pytest, no Slicer application)."""

import importlib.util
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


@pytest.fixture(autouse=True)
def _float32_unless_asked(monkeypatch):
    """``precision="auto"`` (evaluate's and the quick check's default) resolves to float32 on every machine, so that
    a test's numbers do not depend on whether its CPU computes bfloat16 natively; the bfloat16 tests ask for it, or
    patch this back (``--amp`` tests patch it themselves)."""
    from SegHiResCAMLib.engine import cam

    monkeypatch.setattr(cam, "cpu_bfloat16", lambda: False)
    yield


#: the repository's studies/ folder (scripts, not a package)
STUDIES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "studies")


@pytest.fixture(scope="session")
def load_study():
    """``load_study(name)``: the script ``studies/<name>.py`` loaded as a fresh module ``<name>_study`` (its
    functions are tested without running its ``main``)."""
    def load(name):
        spec = importlib.util.spec_from_file_location(name + "_study", os.path.join(STUDIES, name + ".py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    return load


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
