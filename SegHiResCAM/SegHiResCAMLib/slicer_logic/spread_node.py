"""The spread map of an ensemble or TTA run in the scene: a second volume next to the heatmap (issue 18, section 3).

With mirroring TTA, several weights files or the folds of an nnU-Net folder (:mod:`.ensemble_panel`) the heatmap
is the mean of the members' maps (:func:`~SegHiResCAMLib.analysis.ensemble.explain_ensemble`); the voxel-wise
spread map (``std / (|mean| + eps)``: where the members disagree) goes into a volume named
``"<scan> heatmap spread (TTA)"`` (mirrorings only), ``"<scan> heatmap spread (slice axes)"`` (a 2D model along
every slice axis only) or ``"<scan> heatmap spread (ensemble)"`` on the heatmap's
grid, referenced from the heatmap as ``SegHiResCAMSpread``. The agreement (mean pairwise correlation of the maps),
the number of maps and what the members differ in (``ensembleKind``: ``mirrorings``, ``folds``, ``weights files``,
``slice axes``,
joined by `` x ``) are heatmap attributes, read by the summary line (:func:`.panel_text.resultSummary`). A run
without an ensemble unsets the reference and the attributes: the summary never shows an agreement that belongs to
an earlier run.
"""

from typing import Optional

from . import bridge as mrml

#: the heatmap's node reference to its spread map
REFERENCE = "SegHiResCAMSpread"


def ensembleKind(metadata: Optional[dict], models: str = "models") -> str:
    """What the members of an ensemble run differ in (``metadata["ensemble"]["kind"]``), joined by `` x ``, with
    ``models`` named as the panel chose them (``folds``, ``weights files``); ``""`` for a single run."""
    kinds = ((metadata or {}).get("ensemble") or {}).get("kind") or []
    return " x ".join(models if kind == "models" else str(kind) for kind in kinds)


def ensembleAttributes(info: dict, kind: str = "") -> dict:
    """The heatmap attributes of an ensemble run (``agreement``, ``members``, ``ensembleKind``): ``""`` for a
    single run."""
    ensemble = info.get("ensemble") or {}
    if "agreement" not in ensemble:
        return {"agreement": "", "members": "", "ensembleKind": ""}
    return {"agreement": "%.3f" % float(ensemble["agreement"]), "members": int(ensemble["members"]),
            "ensembleKind": kind}


def spreadName(inputVolume, kind: str) -> str:
    """``"<scan> heatmap spread (TTA)"`` for mirrorings only, ``"<scan> heatmap spread (slice axes)"`` for slice
    axes only, else ``"<scan> heatmap spread (ensemble)"``."""
    name = "TTA" if kind in ("", "mirrorings") else "slice axes" if kind == "slice axes" else "ensemble"
    return "%s heatmap spread (%s)" % (inputVolume.GetName(), name)


def applySpread(scene, heatmap, inputVolume, spread, info: dict, metadata: Optional[dict] = None,
                models: str = "models") -> Optional[object]:
    """Write ``spread`` (``None``: no ensemble) into the input's spread volume (reused by a rerun) and reference
    it from ``heatmap``; without a spread map, unset the reference. Returns the spread volume or ``None``.
    ``metadata``: the run's (what the members differ in), ``models``: the members' name (see :func:`ensembleKind`).
    Call inside the ``temporary_nodes`` block of the heatmap, so that a failure removes what was added."""
    attributes = ensembleAttributes(info, ensembleKind(metadata, models))
    mrml.set_attributes(heatmap, attributes)
    if spread is None:
        heatmap.RemoveNodeReferenceIDs(REFERENCE)
        return None
    name = spreadName(inputVolume, attributes["ensembleKind"])
    node = mrml.find_output(scene, "spread", inputVolume, "vtkMRMLScalarVolumeNode")
    if node is not None and node.GetName().startswith("%s heatmap spread (" % inputVolume.GetName()) \
            and not node.GetName().startswith(name):  # our name of another kind of run: the new kind's
        node.SetName(scene.GenerateUniqueName(name))
    node = mrml.write_volume(spread, inputVolume, node, name=scene.GenerateUniqueName(name))
    mrml.set_attributes(node, dict(role="spread", inputVolumeID=inputVolume.GetID(), **attributes))
    heatmap.SetNodeReferenceID(REFERENCE, node.GetID())
    return node
