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


def test_panel_lists_the_cases_and_steps_through_the_flagged_ones(finished, monkeypatch):
    """The module panel's "Cohort results" section (stand-in widgets of the real .ui): choosing the folder lists the
    cases flagged first; selecting a row and Show loads its four nodes; Next/Previous replace them; a failed case
    reports one error and adds nothing."""
    import SegHiResCAM
    out, frame = finished
    slicer_fixtures.clear_scene()
    widget, errors = slicer_fixtures.open_panel(SegHiResCAM, monkeypatch)
    try:
        ui, p = widget.ui, widget._parameterNode
        assert not ui.cohortShowButton.enabled and not ui.cohortNextButton.enabled
        assert "Choose the output folder" in ui.cohortNextButton.toolTip
        ui.cohortFolderLineEdit.currentPath = out  # the user picks the folder: the node follows, the list fills
        assert p.cohortFolder == out and p.cohortCase == ""
        flagged = CohortBrowser(out).flagged_ids()
        assert len(ui.cohortCaseComboBox.items) == len(frame) and ui.cohortCaseComboBox.currentIndex == -1
        assert [item.split(":")[0] for item in ui.cohortCaseComboBox.items[:len(flagged)]] == flagged
        assert ui.cohortCaseComboBox.items[0].startswith("degraded: flagged, Dice ")
        assert ui.cohortNextButton.enabled and not ui.cohortShowButton.enabled
        before = slicer_fixtures.node_ids()
        second = ui.cohortCaseComboBox.items.index(next(i for i in ui.cohortCaseComboBox.items if "not flagged" in i))
        ui.cohortCaseComboBox.currentIndex = second  # select a row (an unflagged case): the node follows
        case = p.cohortCase
        assert case == ui.cohortCaseComboBox.items[second].split(":")[0] and ui.cohortShowButton.enabled
        ui.cohortShowButton.click()
        shown = [n for n in slicer_fixtures.node_ids() if n not in before
                 and mrml.get_attributes(slicer.mrmlScene.GetNodeByID(n)).get("role") == ROLE]
        parts = sorted(mrml.get_attributes(slicer.mrmlScene.GetNodeByID(n)).get("part") for n in shown)
        assert parts == ["heatmap", "image", "prediction", "reference"] and not errors, errors
        assert all(mrml.get_attributes(slicer.mrmlScene.GetNodeByID(n)).get("case") == case for n in shown)
        assert "showing %s" % case in ui.cohortStatusLabel.text
        ui.cohortNextButton.click()  # from an unflagged case: the first flagged case, the previous nodes go
        assert p.cohortCase == flagged[0] and ui.cohortCaseComboBox.currentIndex == 0
        assert all(slicer.mrmlScene.GetNodeByID(n) is None for n in shown) and not errors, errors
        first = slicer_fixtures.node_ids()
        assert "showing %s" % flagged[0] in ui.cohortStatusLabel.text
        with pytest.raises(InputError, match="case broken has no results"):  # shown, then raised on (PythonQt prints it)
            ui.cohortPreviousButton.click()  # wraps to the last flagged case: "broken" failed: one error, nothing added
        assert p.cohortCase == flagged[-1] == "broken" and len(errors) == 1 and "broken" in errors[0]
        assert slicer_fixtures.node_ids() == first
        ui.cohortNextButton.click()  # steps past it to the first flagged case again
        assert p.cohortCase == flagged[0] and len(errors) == 1
        p.cohortFolder = ""  # the node drives the widgets: the list empties, the case's nodes go
        assert ui.cohortFolderLineEdit.currentPath == "" and ui.cohortCaseComboBox.items == []
        assert not ui.cohortNextButton.enabled and not any(
            mrml.get_attributes(slicer.mrmlScene.GetNodeByID(n)).get("role") == ROLE for n in slicer_fixtures.node_ids())
    finally:
        slicer.app.quit()
