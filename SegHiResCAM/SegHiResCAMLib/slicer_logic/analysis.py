"""The module's two analyses of a model on a Slicer volume, in the three steps of :mod:`.slicer_logic`.

- **Evaluate** (issue 7): faithfulness and sanity metrics of the heatmaps
  (:func:`SegHiResCAMLib.analysis.evaluate.evaluate_image`) as a table node, one row per method x layer.
- **Segmentation ability** (issue 5, ProtoSeg): SA score per layer as a table node, a plot of SA score against
  layer depth (plot series + chart nodes reading that table), the SA map of one layer as a segmentation on the
  input volume's grid, and the mean SA score (the ground-truth-free quality estimate) as a table attribute.

As for heatmaps: ``prepareAnalysis`` reads MRML on the main thread (reusing :meth:`ExplainLogic.prepare` for the
inputs and the target), ``computeAnalysis`` runs torch in any thread and touches no MRML, ``applyAnalysis`` writes
the nodes on the main thread, only after the computation succeeded, and removes them again if it fails. The
inputs are never modified. torch is imported only inside ``computeAnalysis``.
"""

import json
import math
from typing import List, Optional, Sequence

import slicer
import vtk

from .. import __version__, catalog
from ..analysis import provenance
from . import bridge as mrml
from . import ensemble_panel, panel_text
from ..errors import InputError
from .compute import ANALYSES, EVALUATION, SEGMENTATION_ABILITY, AnalysisRequest, cropRequest  # noqa: F401
from .explain import ExplainLogic, ExplainRequest, ProgressCallback

#: attribute role of the SA map segmentation and of the plot nodes
SA_MAP, SA_PLOT = "sa-map", "sa-plot"


#: the crop of an evaluation (kept under its old name)
_crop = cropRequest


def _numeric(values) -> Optional[List[float]]:
    """The column as floats (NaN for missing), or None if it holds text."""
    out = []
    for value in values:
        if value is None or value == "":
            out.append(float("nan"))
            continue
        if isinstance(value, (list, tuple, dict)):
            return None
        try:
            out.append(float(value))
        except (TypeError, ValueError):
            return None
    return out


def fill_table(table_node, headers: Sequence[str], rows: Sequence[Sequence[object]],
               text: Sequence[str] = ()) -> None:
    """Replace the table's columns: numeric columns become double arrays (NaN = n/a), ``text`` ones and the
    columns that hold text become strings."""
    table = table_node.GetTable()
    while table.GetNumberOfColumns():
        table.RemoveColumn(0)
    for index, header in enumerate(headers):
        values = [row[index] for row in rows]
        numbers = None if header in text else _numeric(values)
        array = vtk.vtkDoubleArray() if numbers is not None else vtk.vtkStringArray()
        array.SetName(str(header))
        for value in (numbers if numbers is not None else values):
            array.InsertNextValue(value if numbers is not None else str(value))
        table.AddColumn(array)
    table_node.Modified()


class AnalysisLogic(ExplainLogic):
    """:class:`ExplainLogic` plus :meth:`evaluate` and :meth:`segmentationAbility` (module docstring)."""

    def prepareAnalysisFromParameters(self, parameters, kind: str) -> AnalysisRequest:
        """:meth:`prepareAnalysis` with the values of the module's parameter node."""
        methods = list(catalog.method_names()) if parameters.evaluateAllMethods else [parameters.method]
        return self.prepareAnalysis(kind, self.prepareFromParameters(parameters), methods=methods,
                                    steps=parameters.evaluateSteps, cropVoxels=parameters.evaluateCropVoxels)

    def prepareAnalysis(self, kind: str, request: ExplainRequest, methods: Optional[Sequence[str]] = None,
                        steps: int = 0, cropVoxels: int = 0) -> AnalysisRequest:
        if kind not in ANALYSES:
            raise InputError("analysis must be one of %s, got %r" % (", ".join(ANALYSES), kind))
        methods = list(methods or [request.method])
        for method in methods:
            if method not in catalog.method_names():
                raise InputError("method must be one of %s, got %r" % (", ".join(catalog.method_names()), method))
        axes = getattr(request, "sliceAxes", None) or []
        if len(getattr(request, "memberWeights", None) or []) > 1 or axes \
                or ensemble_panel.isFoldEnsemble(getattr(request, "folds", None)):
            raise InputError("the %s analyses one model, not an ensemble (%s): keep one weights file, one fold and "
                             "one slice axis, or use Apply for the ensemble's mean map and spread map"
                             % (kind, "%d weights files" % len(request.memberWeights) if request.memberWeights
                                else "slice axes %s" % ", ".join(axes) if axes else "folds %s" % request.folds))
        if isinstance(steps, bool) or int(steps) != steps or steps < 0 or steps == 1:
            raise InputError("steps must be 0 (evaluate's default: interior points at 1/8, 3/8, 5/8 and 7/8) or a "
                             "whole number >= 2 of equal steps, got %r" % (steps,))
        if isinstance(cropVoxels, bool) or int(cropVoxels) != cropVoxels or cropVoxels < 0:
            raise InputError("cropVoxels must be 0 (whole image) or a voxel count, got %r" % (cropVoxels,))
        return AnalysisRequest(kind, request, methods, int(steps), int(cropVoxels))

    def applyAnalysis(self, request: AnalysisRequest, result, show: bool = True):
        """Write the result into the scene (new nodes, removed again on failure); returns the table node."""
        scene = mrml.scene_of()
        r = request.explain
        volume = scene.GetNodeByID(r.inputVolumeID)
        if volume is None:
            raise InputError("the input volume was removed during the computation; nothing was added")
        common = dict(inputVolumeID=r.inputVolumeID, target=r.targetDescription, classIndex=r.target["class_index"],
                      version=__version__)
        with mrml.temporary_nodes(scene, keep_on_success=True):
            table = scene.AddNewNodeByClass("vtkMRMLTableNode")
            if request.kind == EVALUATION:
                table.SetName(scene.GenerateUniqueName("%s evaluation" % volume.GetName()))
                fill_table(table, *result.table(), text=("method", "layer"))
                verdicts = {"%s @ %s" % (row["method"], row["layer"]): panel_text.evaluationVerdict(
                    result.rows, row["method"], row["layer"]) for row in result.rows}
                verdicts.pop("%s @ -" % panel_text.RANDOM_ORDER, None)
                mrml.set_attributes(table, dict(role=EVALUATION, steps=request.steps, cropVoxels=request.cropVoxels,
                                                verdicts=provenance.dumps(verdicts, indent=None),
                                                metadata=provenance.dumps(result.metadata, indent=None), **common))
                for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")):  # its heatmaps' summaries
                    node = scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
                    if node.GetAttribute(mrml.ATTRIBUTE_PREFIX + "role") == "heatmap":
                        self.updateSummary(node)
            else:
                self._applySA(scene, volume, table, result, common, show)
        return table

    def _applySA(self, scene, volume, table, result, common: dict, show: bool) -> None:
        from ..analysis.segmentation_ability import layer_rows
        rows = layer_rows(result)
        headers = list(dict.fromkeys(key for row in rows for key in row))
        table.SetName(scene.GenerateUniqueName("%s segmentation ability" % volume.GetName()))
        fill_table(table, headers, [[row.get(key, "") for key in headers] for row in rows],
                   text=("layer", "kind", "resolution"))
        mrml.set_attributes(table, dict(role=SEGMENTATION_ABILITY, meanSA=result.mean_sa, mapLayer=result.map_layer,
                                        metadata=provenance.dumps(result.metadata, indent=None), **common))
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", "%s SA score" % volume.GetName())
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("depth")
        series.SetYColumnName("sa_score")
        series.SetPlotType(series.PlotTypeScatter)
        series.SetMarkerStyle(series.MarkerStyleCircle)
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", table.GetName() + " plot")
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
        chart.SetTitle("SA score by layer (mean SA score %.3f)" % result.mean_sa)
        chart.SetXAxisTitle("layer depth")
        chart.SetYAxisTitle("SA score (Dice)")
        for node in (series, chart):
            mrml.set_attributes(node, dict(role=SA_PLOT, **common))
        table.SetNodeReferenceID("SegHiResCAMPlotChart", chart.GetID())
        if result.sa_map is not None:
            segmentation = mrml.labels_to_segmentation(
                result.sa_map, volume, ["background", "SA map %s" % result.map_layer],
                name=scene.GenerateUniqueName("%s SA map" % volume.GetName()))
            mrml.set_attributes(segmentation, dict(role=SA_MAP, layer=result.map_layer, **common))
            table.SetNodeReferenceID("SegHiResCAMSAMap", segmentation.GetID())
        plots = getattr(getattr(slicer, "modules", None), "plots", None)
        if show and plots is not None:  # the application: show the chart in a plot view
            plots.logic().ShowChartInLayout(chart)

    def evaluationVerdict(self, heatmap) -> str:
        """The verdict (:func:`.panel_text.evaluationVerdict`) of the latest evaluation of the same input volume,
        target and class that has a row for the heatmap's method and layer; "" when there is none."""
        values, scene = mrml.get_attributes(heatmap), mrml.scene_of(heatmap)
        key = "%s @ %s" % (values.get("method"), values.get("layer"))
        for i in reversed(range(scene.GetNumberOfNodesByClass("vtkMRMLTableNode"))):
            table = mrml.get_attributes(scene.GetNthNodeByClass(i, "vtkMRMLTableNode"))
            if table.get("role") == EVALUATION and all(table.get(name) == values.get(name) for name in
                                                       ("inputVolumeID", "target", "classIndex")):
                verdict = json.loads(table.get("verdicts") or "{}").get(key)
                if verdict:
                    return verdict
        return ""

    @staticmethod
    def summary(table) -> str:
        """One line for the panel's status label."""
        values = mrml.get_attributes(table)
        if values.get("role") == SEGMENTATION_ABILITY:
            mean = float(values["meanSA"])
            return "Mean SA score %s (%d layers, SA map of %s)" % (
                "n/a" if math.isnan(mean) else "%.3f" % mean, table.GetNumberOfRows(), values.get("mapLayer") or "-")
        verdicts = json.loads(values.get("verdicts") or "{}")
        return "Evaluation: %d rows in table %r%s" % (table.GetNumberOfRows(), table.GetName(), "".join(
            "; %s: %s" % (key, text[len("evaluation: "):]) for key, text in verdicts.items() if text))

    # ------------------------------------------------------------------ all three steps
    def evaluate(self, inputVolume, methods: Optional[Sequence[str]] = None, steps: int = 0, cropVoxels: int = 0,
                 progress: Optional[ProgressCallback] = None, **explainArgs):
        """Faithfulness metrics of the heatmaps of ``inputVolume`` as a new ``vtkMRMLTableNode``.

        Args:
            inputVolume, **explainArgs: the scan, model, target, ``method``, ``layer``... as for
                :meth:`ExplainLogic.process` (``outputVolume``, ``addPrediction`` are ignored).
            methods: the CAM methods compared (default: ``method`` only); a row each, plus the random-order row.
            steps: deletion/insertion steps, 0 for evaluate's default (interior points at 1/8, 3/8, 5/8 and 7/8,
                :data:`~SegHiResCAMLib.engine.faithfulness.DEFAULT_FRACTIONS`, whose error against the full
                computation is measured; the cost of 5 equal steps); the cost is about ``2 x (len(methods) + 1) x
                steps`` forward passes.
            cropVoxels: evaluate a cube of this many voxels per axis around the target (0: the whole scan).

        Returns:
            The table node: the columns of ``Evaluation.table()`` (method, layer text; the rest numbers, NaN = n/a).
        """
        request = self.prepareAnalysis(EVALUATION, self.prepare(inputVolume, **explainArgs), methods, steps,
                                       cropVoxels)
        return self.applyAnalysis(request, self.computeAnalysis(request, progress))

    def segmentationAbility(self, inputVolume, progress: Optional[ProgressCallback] = None, show: bool = True,
                            **explainArgs):
        """ProtoSeg segmentation ability of the model's layers on ``inputVolume``.

        ``classIndex`` is the explained class; a segment target (``segmentationNode``, ``segmentId``) is the
        reference (ground truth), else the model's own prediction; ``layer`` picks the SA map (``auto``: the last
        feature layer). Returns the table node (one row per layer: depth, sa_score...; attribute
        ``SegHiResCAM.meanSA``), which references the plot chart (``SegHiResCAMPlotChart``) and the SA map
        segmentation on the input volume's grid (``SegHiResCAMSAMap``).
        """
        request = self.prepareAnalysis(SEGMENTATION_ABILITY, self.prepare(inputVolume, **explainArgs))
        return self.applyAnalysis(request, self.computeAnalysis(request, progress), show=show)
