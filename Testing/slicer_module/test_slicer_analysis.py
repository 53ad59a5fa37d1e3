"""Evaluate and Segmentation ability on a real slicer-core scene with the tiny factory model (issues 7 and 5).

The table nodes hold exactly what the headless APIs return (``evaluate_image(...).table()``, ``sa_score.layer_rows``);
the plot nodes read the SA table; the SA map lies on the input volume's grid; failures add no nodes; inputs stay
unchanged; the panel runs both on the worker thread.
"""

import math

import numpy as np
import pytest

import slicer_fixtures
import slicer_standalone
from slicer_fixtures import IJK_TO_RAS, SPEC, node_ids

slicer = slicer_standalone.setup()

import SegHiResCAM  # noqa: E402
from SegHiResCAMLib.slicer_logic import bridge as mrml  # noqa: E402
from SegHiResCAMLib.analysis import segmentation_ability as sa_score
from SegHiResCAMLib.slicer_logic import analysis as slicer_analysis
from SegHiResCAMLib.slicer_logic import selftest  # noqa: E402
from SegHiResCAMLib.errors import InputError, SegHiResCAMError  # noqa: E402
from SegHiResCAMLib.analysis.evaluate import evaluate_image  # noqa: E402
from SegHiResCAMLib.models import load_model  # noqa: E402
from SegHiResCAMLib.analysis.explain import TargetSpec  # noqa: E402


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return slicer_fixtures.save_toy_weights(tmp_path_factory.mktemp("slicer-analysis"))


@pytest.fixture()
def volume():
    slicer_fixtures.clear_scene()
    image = np.random.RandomState(0).randn(12, 16, 14).astype(np.float32)
    return slicer.util.addVolumeFromArray(image, IJK_TO_RAS, name="oblique")


def table_contents(node):
    table = node.GetTable()
    headers = [table.GetColumn(c).GetName() for c in range(table.GetNumberOfColumns())]
    rows = [[table.GetValue(r, c).ToString() if table.GetColumn(c).IsA("vtkStringArray")
             else table.GetValue(r, c).ToDouble() for c in range(len(headers))] for r in range(table.GetNumberOfRows())]
    return headers, rows


def assert_rows_equal(actual, expected):
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            if isinstance(a, str):
                assert a == str(b)
            else:
                b = float("nan") if b in ("", None) else float(b)
                assert (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-6, abs=1e-9)


def test_evaluate_table_equals_the_headless_api(volume, weights):
    before = selftest.hashVolume(volume), volume.GetMTime()
    logic = SegHiResCAM.SegHiResCAMLogic()
    node = logic.evaluate(volume, model=SPEC, weights=weights, layer="dec", steps=3, classIndex=1)
    assert node.IsA("vtkMRMLTableNode") and (selftest.hashVolume(volume), volume.GetMTime()) == before
    image, geometry = mrml.image_from_volume(volume)
    expected = evaluate_image(load_model(SPEC, weights=weights), image, geometry, TargetSpec(class_index=1),
                              methods=["seg-hires-grad-cam"], layers="dec", steps=3).table()
    headers, rows = table_contents(node)
    assert headers == expected[0]
    assert_rows_equal(rows, expected[1])
    assert [r[0] for r in rows] == ["seg-hires-grad-cam", "random-order"] and [r[1] for r in rows] == ["dec", "-"]
    attributes = mrml.get_attributes(node)
    assert attributes["role"] == "evaluation" and attributes["inputVolumeID"] == volume.GetID()
    assert "Evaluation: 2 rows" in logic.summary(node)


def test_evaluate_by_default_uses_the_command_lines_default_steps(volume, weights):
    """The panel's steps 0 ("default") is evaluate's measured rule, as on the command line; 1 step is refused."""
    logic = SegHiResCAM.SegHiResCAMLogic()
    node = logic.evaluate(volume, model=SPEC, weights=weights, layer="dec", classIndex=1)
    image, geometry = mrml.image_from_volume(volume)
    expected = evaluate_image(load_model(SPEC, weights=weights), image, geometry, TargetSpec(class_index=1),
                              methods=["seg-hires-grad-cam"], layers="dec")
    assert expected.metadata["shortcut"]["fractions"] == [0.0, 0.125, 0.375, 0.625, 0.875, 1.0]
    headers, rows = table_contents(node)
    assert headers == expected.table()[0]
    assert_rows_equal(rows, expected.table()[1])
    with pytest.raises(InputError, match="0 \\(evaluate's default"):
        logic.evaluate(volume, model=SPEC, weights=weights, layer="dec", steps=1)


def test_evaluate_crop_keeps_a_point_target_inside(volume, weights):
    point = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    ras = IJK_TO_RAS @ np.array([2.0, 3.0, 4.0, 1.0])  # voxel (i, j, k) = (2, 3, 4)
    point.AddControlPoint(*ras[:3])
    logic = SegHiResCAM.SegHiResCAMLogic()
    request = logic.prepareAnalysis("evaluation", logic.prepare(volume, model=SPEC, weights=weights, pointNode=point,
                                                                radiusMm=2.0, layer="dec"), steps=2, cropVoxels=8)
    image, geometry, target = slicer_analysis._crop(request)
    assert image.shape == (8, 8, 8) and geometry.array_shape == (8, 8, 8)
    k, j, i = target["voxel"]
    np.testing.assert_allclose(geometry.ijk_to_ras() @ [i, j, k, 1.0], ras, atol=1e-9)
    node = logic.applyAnalysis(request, logic.computeAnalysis(request))
    assert node.GetNumberOfRows() == 2


def test_segmentation_ability_nodes(volume, weights):
    before = selftest.hashVolume(volume), volume.GetMTime()
    logic = SegHiResCAM.SegHiResCAMLogic()
    node = logic.segmentationAbility(volume, model=SPEC, weights=weights, classIndex=1)
    assert (selftest.hashVolume(volume), volume.GetMTime()) == before
    image, geometry = mrml.image_from_volume(volume)
    expected = sa_score.sa_score_image(load_model(SPEC, weights=weights), image, geometry, class_index=1,
                                       layers="all", map_layer="last-feature")
    rows = sa_score.layer_rows(expected)
    headers, values = table_contents(node)
    assert headers == list(rows[0])
    assert_rows_equal(values, [[row[h] for h in headers] for row in rows])
    attributes = mrml.get_attributes(node)
    assert float(attributes["meanSA"]) == pytest.approx(expected.mean_sa, nan_ok=True)
    assert attributes["mapLayer"] == expected.map_layer
    assert "Mean SA score" in logic.summary(node)
    chart = node.GetNodeReference("SegHiResCAMPlotChart")
    assert chart.IsA("vtkMRMLPlotChartNode") and chart.GetNumberOfPlotSeriesNodes() == 1
    series = chart.GetNthPlotSeriesNode(0)
    assert series.GetTableNodeID() == node.GetID()
    assert (series.GetXColumnName(), series.GetYColumnName()) == ("depth", "sa_score")
    segmentation = node.GetNodeReference("SegHiResCAMSAMap")
    assert segmentation.IsA("vtkMRMLSegmentationNode")
    # on the input volume's grid: reference geometry = the volume's, and the map equals the headless one
    reference = slicer.vtkSegmentationConverter.SerializeImageGeometry(
        slicer.util.vtkMatrixFromArray(mrml.ijk_to_ras(volume)), volume.GetImageData())
    assert segmentation.GetSegmentation().GetConversionParameter("Reference image geometry") == reference
    assert expected.sa_map.any() and segmentation.GetSegmentation().GetNumberOfSegments() == 1
    mask = mrml.segment_mask(segmentation, segmentation.GetSegmentation().GetNthSegmentID(0), volume)
    np.testing.assert_array_equal(mask, expected.sa_map)


def test_segmentation_ability_with_a_segment_reference_and_named_layer(volume, weights):
    segmentation, segmentId = selftest.sphereSegmentOnOtherGrid(volume, radiusMm=6.0, spacingMm=1.9, angleDeg=35)
    hashes = selftest.hashVolume(volume), selftest.hashSegmentation(segmentation)
    node = SegHiResCAM.SegHiResCAMLogic().segmentationAbility(
        volume, model=SPEC, weights=weights, segmentationNode=segmentation, segmentId=segmentId, layer="dec")
    assert (selftest.hashVolume(volume), selftest.hashSegmentation(segmentation)) == hashes
    assert mrml.get_attributes(node)["mapLayer"] == "dec"
    assert "sa_score_vs_prediction" in table_contents(node)[0]  # a ground-truth reference was used


def test_failures_add_no_nodes(volume, weights, monkeypatch):
    logic = SegHiResCAM.SegHiResCAMLogic()
    before, hashed = node_ids(), selftest.hashVolume(volume)
    with pytest.raises(SegHiResCAMError):
        logic.segmentationAbility(volume, model=SPEC, weights=weights, layer="no.such.layer")
    with pytest.raises(SegHiResCAMError):
        logic.evaluate(volume, model=SPEC, weights=weights, layer="no.such.layer", steps=2)
    with pytest.raises(InputError):
        logic.evaluate(volume, model=SPEC, weights=weights, steps=1)
    assert node_ids() == before
    request = logic.prepareAnalysis("segmentation-ability", logic.prepare(volume, model=SPEC, weights=weights))
    result = logic.computeAnalysis(request)

    def broken(*args, **kwargs):
        raise InputError("broken on purpose")
    monkeypatch.setattr(mrml, "labels_to_segmentation", broken)  # fails after the table and plot nodes were made
    with pytest.raises(InputError):
        logic.applyAnalysis(request, result)
    assert node_ids() == before and selftest.hashVolume(volume) == hashed
