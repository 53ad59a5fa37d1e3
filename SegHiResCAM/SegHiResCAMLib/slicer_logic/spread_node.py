"""The spread map of a TTA run in the scene: a second volume next to the heatmap (issue 18, section 3).

With mirroring TTA the heatmap is the mean of the mirrorings' maps (:func:`~SegHiResCAMLib.analysis.ensemble.
explain_ensemble`); the voxel-wise spread map (``std / (|mean| + eps)``: where the mirrorings disagree) goes into a
volume named ``"<scan> heatmap spread (TTA)"`` on the heatmap's grid, referenced from the heatmap as
``SegHiResCAMSpread``. The agreement (mean pairwise correlation of the maps) and the number of maps are heatmap
attributes, read by the summary line (:func:`.panel_text.resultSummary`). A run without TTA unsets the reference
and the attributes: the summary never shows an agreement that belongs to an earlier run.
"""

from typing import Optional

from . import bridge as mrml

#: the heatmap's node reference to its spread map
REFERENCE = "SegHiResCAMSpread"


def ensembleAttributes(info: dict) -> dict:
    """The heatmap attributes of an ensemble run (``agreement``, ``members``): ``""`` for a single run."""
    ensemble = info.get("ensemble") or {}
    if "agreement" not in ensemble:
        return {"agreement": "", "members": ""}
    return {"agreement": "%.3f" % float(ensemble["agreement"]), "members": int(ensemble["members"])}


def applySpread(scene, heatmap, inputVolume, spread, info: dict) -> Optional[object]:
    """Write ``spread`` (``None``: no TTA) into the input's spread volume (reused by a rerun) and reference it from
    ``heatmap``; without a spread map, unset the reference. Returns the spread volume or ``None``.
    Call inside the ``temporary_nodes`` block of the heatmap, so that a failure removes what was added."""
    mrml.set_attributes(heatmap, ensembleAttributes(info))
    if spread is None:
        heatmap.RemoveNodeReferenceIDs(REFERENCE)
        return None
    node = mrml.find_output(scene, "spread", inputVolume, "vtkMRMLScalarVolumeNode")
    node = mrml.write_volume(spread, inputVolume, node,
                             name=scene.GenerateUniqueName("%s heatmap spread (TTA)" % inputVolume.GetName()))
    mrml.set_attributes(node, dict(role="spread", inputVolumeID=inputVolume.GetID(),
                                   **ensembleAttributes(info)))
    heatmap.SetNodeReferenceID(REFERENCE, node.GetID())
    return node
