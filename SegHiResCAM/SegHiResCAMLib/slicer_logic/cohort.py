"""A finished cohort (``seghirescam cohort ... --out DIR``) in Slicer: step through its flagged cases.

:class:`CohortBrowser` reads ``DIR/cohort.csv`` (no pandas, no Dask: only the table and the case folders) and, for
the selected case, loads the scan, the reference and the prediction (as segmentations on the scan's grid) and the
heatmap (over the scan, heat colours) into the scene; the nodes of the previously shown case are removed first, so
stepping through a cohort does not fill the scene. Nothing is added when a case cannot be shown.

Example (Slicer's Python console)::

    from SegHiResCAMLib.slicer_logic.cohort import CohortBrowser
    browser = CohortBrowser("/data/results")
    browser.flagged_ids()        # failed cases, then the lowest mean SA scores
    nodes = browser.next()       # the first flagged case: {"image": ..., "prediction": ..., "heatmap": ...}
"""

import os
from typing import Dict, List, Optional

import numpy as np

from ..analysis.cohort import CASES_DIR, HEATMAP_FILE, PREDICTION_FILE, read_result, read_table
from ..errors import InputError
from ..imaging.files import read_image
from ..imaging.resample import read_mask_on_grid
from . import bridge

#: the node attribute role of the nodes shown for a case
ROLE = "cohort-case"


def _number(text: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return float("nan")


class CohortBrowser:
    """The rows of a finished cohort and the nodes of the case on show.

    Attributes:
        out: the cohort's output folder.
        rows: ``cohort.csv`` as dicts of text, in manifest order.
        current: the case id on show, or ``None``.
    """

    def __init__(self, out: str, scene=None):
        self.out = os.fspath(out)
        self.rows = read_table(self.out)
        self.scene = scene
        self.current: Optional[str] = None
        self.nodes: Dict[str, object] = {}
        self.added: List[object] = []  # every node added for the case on show (displays, storage, legends too)

    def row(self, case_id: str) -> Dict[str, str]:
        for row in self.rows:
            if row["case_id"] == case_id:
                return row
        raise InputError("the cohort in %r has no case %r; its cases are: %s"
                         % (self.out, case_id, ", ".join(r["case_id"] for r in self.rows[:20])))

    def flagged_ids(self) -> List[str]:
        """The flagged cases, likeliest failures first: lowest mean SA score (``sa_rank``), then failed cases."""
        flagged = [r for r in self.rows if r.get("flagged") == "True"]
        return [r["case_id"] for r in sorted(flagged, key=lambda r: (r["status"] == "failed",
                                                                      _number(r.get("sa_rank")), r["case_id"]))]

    def next(self, step: int = 1) -> Dict[str, object]:
        """Show the flagged case ``step`` places after the one on show (the first one when none is), wrapping."""
        ids = self.flagged_ids()
        if not ids:
            raise InputError("the cohort in %r has no flagged case" % self.out)
        position = ids.index(self.current) + step if self.current in ids else (0 if step > 0 else -1)
        return self.show(ids[position % len(ids)])

    def clear(self) -> None:
        """Remove the nodes added for the case on show (the heat colour table stays for the next case)."""
        scene = bridge.scene_of(None) if self.scene is None else self.scene
        for node in reversed(self.added):  # displays and storage after their owners
            if scene.GetNodeByID(node.GetID()) is not None:
                scene.RemoveNode(node)
        self.nodes, self.added, self.current = {}, [], None

    def show(self, case_id: str) -> Dict[str, object]:
        """Load the case's scan, reference, prediction and heatmap (those it has) into the scene; returns the nodes
        by role (``image``, ``reference``, ``prediction``, ``heatmap``)."""
        row = self.row(case_id)
        record = read_result(self.out, case_id)
        if record is None or row.get("status") != "done":
            raise InputError("case %s has no results to show (%s): %s" % (
                case_id, row.get("status"), row.get("error") or "no case folder in %s" % self.out))
        folder = os.path.join(self.out, CASES_DIR, case_id)
        image_path = record["case"]["images"][0]
        image, geometry = read_image(image_path)  # a clear error before any node is added
        arrays = {}
        prediction_file = os.path.join(folder, PREDICTION_FILE)
        if os.path.exists(prediction_file):
            cls = int(record["provenance"].get("class_index", 1))
            arrays["prediction"] = (read_image(prediction_file)[0] == cls).astype(np.uint8)
        if record["case"].get("reference"):
            arrays["reference"] = read_mask_on_grid(record["case"]["reference"], geometry, what="reference",
                                                    binary=True)[0]
        heat_file = os.path.join(folder, HEATMAP_FILE)
        if os.path.exists(heat_file):
            arrays["heatmap"] = read_image(heat_file)[0].astype(np.float32)
        self.clear()
        scene = bridge.scene_of(None) if self.scene is None else self.scene
        nodes: Dict[str, object] = {}
        before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
        with bridge.temporary_nodes(scene, keep_on_success=True):
            nodes["image"] = bridge.load_volume(image_path, name="%s image" % case_id)
            for role in ("reference", "prediction"):
                if role in arrays:
                    nodes[role] = bridge.labels_to_segmentation(
                        arrays[role], nodes["image"], ["background", "%s %s" % (row.get("class") or "", role)],
                        name="%s %s" % (case_id, role))
            if "heatmap" in arrays:
                nodes["heatmap"] = bridge.write_volume(arrays["heatmap"], nodes["image"], name="%s heatmap" % case_id)
                bridge.show_heatmap(nodes["heatmap"], nodes["image"])
            for role, node in nodes.items():
                bridge.set_attributes(node, {"role": ROLE, "case": case_id, "part": role, "cohort": self.out,
                                             "meanSA": row.get("mean_sa"), "dice": row.get("dice")})
        self.added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())
                      if scene.GetNthNode(i).GetID() not in before and not scene.GetNthNode(i).IsA(
                          "vtkMRMLSubjectHierarchyNode") and not scene.GetNthNode(i).IsA("vtkMRMLColorTableNode")]
        self.nodes, self.current = nodes, case_id
        return dict(nodes)
