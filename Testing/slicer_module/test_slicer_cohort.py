"""Stepping through a finished cohort's flagged cases on a real slicer-core scene (issue 19): the nodes hold the
files' voxels on the scan's grid, the previous case's nodes are removed, a failed case adds nothing."""

import os

import numpy as np
import pytest

import cohort_model
import slicer_fixtures
import slicer_standalone

slicer = slicer_standalone.setup()

from SegHiResCAMLib.analysis import cohort  # noqa: E402
from SegHiResCAMLib.errors import InputError  # noqa: E402
from SegHiResCAMLib.imaging.files import read_image  # noqa: E402
from SegHiResCAMLib.slicer_logic import bridge as mrml  # noqa: E402
from SegHiResCAMLib.slicer_logic.cohort import ROLE, CohortBrowser  # noqa: E402


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("slicer-cohort"))
    manifest = cohort_model.write_cohort(os.path.join(folder, "in"))
    out = os.path.join(folder, "out")
    frame = cohort.run_cohort(manifest, out, cohort.ModelSpec(cohort_model.SPEC),
                              cohort.CohortOptions(device="cpu", threads=1), scheduler="none", progress=False)
    return out, frame


def test_step_through_the_flagged_cases(finished):
    out, frame = finished
    slicer_fixtures.clear_scene()
    browser = CohortBrowser(out)
    expected = list(frame[frame["flagged"] & (frame["status"] == "done")].sort_values("sa_rank")["case_id"])
    assert browser.flagged_ids() == expected + ["broken"] and expected[0] == "degraded"
    empty = slicer_fixtures.node_ids()
    nodes = browser.next()
    assert browser.current == "degraded" and sorted(nodes) == ["heatmap", "image", "prediction", "reference"]
    folder = cohort.case_folder(out, "degraded")
    image_file = os.path.join(os.path.dirname(out), "in", "scans", "degraded.nii.gz")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(nodes["image"]), read_image(image_file)[0])
    heat = read_image(os.path.join(folder, cohort.HEATMAP_FILE))[0]
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(nodes["heatmap"]), heat)
    np.testing.assert_allclose(mrml.ijk_to_ras(nodes["heatmap"]), mrml.ijk_to_ras(nodes["image"]))
    prediction = read_image(os.path.join(folder, cohort.PREDICTION_FILE))[0] == 1
    for role, want in (("prediction", prediction), ("reference", read_image(image_file.replace(".nii", "-ref.nii"))[0])):
        segmentation = nodes[role]
        assert segmentation.GetSegmentation().GetNumberOfSegments() == 1
        got = mrml.segment_mask(segmentation, segmentation.GetSegmentation().GetNthSegmentID(0), nodes["image"])
        np.testing.assert_array_equal(got, want != 0)
    assert all(mrml.get_attributes(n)["role"] == ROLE and mrml.get_attributes(n)["case"] == "degraded"
               for n in nodes.values())
    shown = slicer_fixtures.node_ids()
    second = browser.next()  # the next flagged case replaces the first one's nodes
    assert browser.current == expected[1]
    assert all(slicer.mrmlScene.GetNodeByID(n.GetID()) is None for n in nodes.values())
    assert len(slicer_fixtures.node_ids()) == len(shown)
    assert mrml.get_attributes(second["image"])["case"] == expected[1]
    # a failed case: one clear error, the case on show stays, nothing is added
    before = slicer_fixtures.node_ids()
    with pytest.raises(InputError, match="case broken has no results to show \\(failed\\): InputError: Could not read"):
        browser.show("broken")
    assert slicer_fixtures.node_ids() == before and browser.current == expected[1]
    browser.clear()
    colours = [n for n in slicer_fixtures.node_ids() if n not in empty]
    assert len(colours) == 1 and slicer.mrmlScene.GetNodeByID(colours[0]).IsA("vtkMRMLColorTableNode")


def test_a_folder_without_a_cohort_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match="holds no cohort.csv"):
        CohortBrowser(str(tmp_path))
