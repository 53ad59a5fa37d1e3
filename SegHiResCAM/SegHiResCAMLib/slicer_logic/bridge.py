"""The Slicer bridge: MRML volume, segmentation and markups nodes <-> numpy arrays with their :class:`Geometry`.

This module (and the Slicer-facing ``slicer_logic*`` modules built on it) is the only part of SegHiResCAMLib that
imports ``slicer`` and ``vtk``; no module outside ``slicer_logic`` imports it (Testing/unit/test_architecture.py). It uses only the MRML API,
so it works in the Slicer application and on a plain ``slicer-core`` scene (PyPI) alike.

Conventions:

- arrays are in numpy order ``(k, j, i)`` = ``(z, y, x)``, as ``slicer.util.arrayFromVolume`` returns them;
- a volume node's ``IJKToRAS`` matrix equals :meth:`Geometry.ijk_to_ras` of its geometry (Slicer is RAS, the
  Geometry is LPS: see :mod:`~SegHiResCAMLib.geometry`);
- every array read from a node is a copy: the nodes given as inputs are never modified;
- temporary nodes (needed by Slicer's segment export) are removed in ``finally``, also when something fails.
"""

import contextlib
from typing import Dict, Iterator, Optional, Sequence, Tuple

import numpy as np
import slicer
import vtk

from ..errors import InputError, TargetError
from ..geometry import Geometry

#: prefix of every node attribute written by SegHiResCAM
ATTRIBUTE_PREFIX = "SegHiResCAM."
#: heat colour tables of Slicer, in order of preference (present in the application, absent in slicer-core)
HEAT_COLOR_NAMES = ("Inferno", "ColdToHotRainbow")
#: name of the colour table made when none of HEAT_COLOR_NAMES is in the scene
OWN_COLOR_NAME = "SegHiResCAM heat"
#: matplotlib's "inferno" sampled at 0, 1/8, ..., 1 (interpolated linearly for the own table)
_INFERNO_ANCHORS = (
    (0.001, 0.000, 0.014), (0.129, 0.047, 0.291), (0.342, 0.062, 0.429), (0.541, 0.135, 0.415),
    (0.736, 0.216, 0.330), (0.894, 0.353, 0.194), (0.978, 0.558, 0.035), (0.975, 0.798, 0.206),
    (0.988, 0.998, 0.645),
)


def scene_of(node=None):
    scene = node.GetScene() if node is not None and node.GetScene() is not None else slicer.mrmlScene
    if scene is None:
        raise InputError("no MRML scene: set slicer.mrmlScene (inside Slicer it always exists)")
    return scene


def _check_volume(volume_node, what: str = "input volume") -> None:
    if volume_node is None:
        raise InputError("no %s given; select a scalar volume (e.g. a CT or MRI scan)" % what)
    if not volume_node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError("%s %r is a %s; a scalar volume is needed" % (what, volume_node.GetName(),
                                                                     volume_node.GetClassName()))
    image = volume_node.GetImageData()
    if image is None or image.GetNumberOfPoints() == 0:
        raise InputError("%s %r holds no voxels; load an image into it first" % (what, volume_node.GetName()))
    if image.GetNumberOfScalarComponents() != 1:
        raise InputError("%s %r has %d components per voxel; a single-component (grey-level) volume is needed"
                         % (what, volume_node.GetName(), image.GetNumberOfScalarComponents()))


def ijk_to_ras(volume_node) -> np.ndarray:
    """The node's 4x4 ``IJKToRAS`` matrix as a float64 array (without parent transforms)."""
    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix).astype(np.float64)


def volume_geometry(volume_node) -> Geometry:
    """The :class:`Geometry` (ITK order, LPS) of a scalar volume node."""
    _check_volume(volume_node)
    return Geometry.from_ijk_to_ras(ijk_to_ras(volume_node), volume_node.GetImageData().GetDimensions())


def image_from_volume(volume_node) -> Tuple[np.ndarray, Geometry]:
    """A copy of the node's voxels (numpy order) and its geometry."""
    geometry = volume_geometry(volume_node)
    return np.array(slicer.util.arrayFromVolume(volume_node), copy=True), geometry


def load_volume(path: str, name: Optional[str] = None):
    """Read an image file into a new scalar volume node with a storage node, as Slicer's "Add data" does.

    Works without the Slicer application (``slicer.util.loadVolume`` needs it); the storage node uses ITK's readers.
    """
    scene = scene_of()
    with temporary_nodes(scene, keep_on_success=True):
        volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or "")
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        if not storage.ReadData(volume):
            raise InputError("cannot read the image %r; give a NIfTI, NRRD or MetaImage file" % (path,))
        volume.SetAndObserveStorageNodeID(storage.GetID())
        volume.CreateDefaultDisplayNodes()
    return volume


@contextlib.contextmanager
def temporary_nodes(scene=None, keep_on_success: bool = False) -> Iterator[None]:
    """Remove every node added to ``scene`` inside the block (always, or only on failure with ``keep_on_success``).

    The subject-hierarchy node is a scene singleton that Slicer creates on demand: it is never removed.
    """
    scene = scene or scene_of()
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}
    ok = False
    try:
        yield
        ok = True
    finally:
        if not (ok and keep_on_success):
            added = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
            for node in reversed(added):  # displays and storage after their owners
                if node.GetID() not in before and not node.IsA("vtkMRMLSubjectHierarchyNode"):
                    if scene.GetNodeByID(node.GetID()) is not None:
                        scene.RemoveNode(node)


def segment_mask(segmentation_node, segment_id: str, reference_volume) -> np.ndarray:
    """The segment as a ``uint8`` 0/1 array on exactly the reference volume's grid (numpy order).

    Slicer resamples the segment (nearest neighbour) and applies parent transforms when the segmentation was made
    on another grid; the segmentation itself is not modified.
    """
    if segmentation_node is None or not segmentation_node.IsA("vtkMRMLSegmentationNode"):
        raise TargetError("no segmentation given for the segment target; select a segmentation and a segment")
    segmentation = segmentation_node.GetSegmentation()
    if not segment_id or segmentation.GetSegment(segment_id) is None:
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        raise TargetError("segmentation %r has no segment with ID %r; its segments are: %s"
                          % (segmentation_node.GetName(), segment_id, ", ".join(names) or "(none)"))
    _check_volume(reference_volume)
    if not segmentation.ContainsRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()):
        raise TargetError("segmentation %r has no binary labelmap representation; create it in the Segmentations "
                          "module (Representations: Binary labelmap, Create) and try again" % segmentation_node.GetName())
    scene = scene_of(reference_volume)
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    with temporary_nodes(scene):
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "SegHiResCAM temporary segment")
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                segmentation_node, ids, labelmap, reference_volume):
            raise TargetError("Slicer could not export segment %r onto the grid of %r"
                              % (segment_id, reference_volume.GetName()))
        mask = (slicer.util.arrayFromVolume(labelmap) != 0).astype(np.uint8)
    expected = tuple(reversed(reference_volume.GetImageData().GetDimensions()))
    if mask.shape != expected:  # defensive: the export must use the reference geometry
        raise TargetError("the exported segment has shape %s, the volume %s" % (mask.shape, expected))
    return mask


def point_voxel(markups_node, point_index: int, volume_node) -> Tuple[int, int, int]:
    """The voxel of ``volume_node`` (numpy order ``(k, j, i)``) nearest to a markups control point.

    The point's world position is mapped through the volume's parent transform (if any) and ``RASToIJK``.
    """
    if markups_node is None or not markups_node.IsA("vtkMRMLMarkupsNode"):
        raise TargetError("no point given for the point target; place a point (markups) on the scan")
    count = markups_node.GetNumberOfControlPoints()
    if not 0 <= point_index < count:
        raise TargetError("point list %r has %d point(s); point %d does not exist"
                          % (markups_node.GetName(), count, point_index))
    world = [0.0, 0.0, 0.0]
    markups_node.GetNthControlPointPositionWorld(point_index, world)
    local = world
    parent = volume_node.GetParentTransformNode()
    if parent is not None:
        to_local = vtk.vtkGeneralTransform()
        parent.GetTransformFromWorld(to_local)
        local = list(to_local.TransformPoint(world))
    ras_to_ijk = np.linalg.inv(ijk_to_ras(volume_node))
    ijk = ras_to_ijk @ np.array(list(local) + [1.0])
    index = tuple(int(v) for v in np.round(ijk[:3]))
    size = volume_node.GetImageData().GetDimensions()
    if any(not 0 <= v < s for v, s in zip(index, size)):
        raise TargetError("point %d of %r (RAS %s) lies outside the volume %r; place it on the scan"
                          % (point_index, markups_node.GetName(), ", ".join("%.1f" % v for v in world),
                             volume_node.GetName()))
    return index[2], index[1], index[0]


def write_volume(array: np.ndarray, reference_volume, output_node=None, name: Optional[str] = None):
    """Put ``array`` (numpy order, the reference's shape) into a scalar volume on the reference volume's grid.

    ``output_node`` is updated in place when given (its data and geometry are replaced), else a node is added.
    The output gets the reference's ``IJKToRAS`` and parent transform.
    """
    expected = tuple(reversed(reference_volume.GetImageData().GetDimensions()))
    if tuple(array.shape) != expected:
        raise InputError("array shape %s differs from the volume's %s" % (tuple(array.shape), expected))
    scene = scene_of(reference_volume)
    node = output_node or scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or "")
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(ijk_to_ras(reference_volume)))
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    node.SetAndObserveTransformNodeID(reference_volume.GetTransformNodeID())
    return node


def labels_to_segmentation(labels: np.ndarray, reference_volume, class_names: Sequence[str],
                           segmentation_node=None, name: Optional[str] = None):
    """One segment per non-zero label of a label map on the reference volume's grid, named by ``class_names``.

    An existing ``segmentation_node`` is emptied and refilled (a rerun replaces its segments).
    """
    scene = scene_of(reference_volume)
    node = segmentation_node or scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or "")
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    node.GetSegmentation().RemoveAllSegments()
    with temporary_nodes(scene):
        labelmap = write_volume(labels.astype(np.uint16 if labels.max(initial=0) > 255 else np.uint8),
                                reference_volume, scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode"))
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, node):
            raise InputError("Slicer could not turn the model's prediction into segments")
    segmentation = node.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        value = segment.GetLabelValue()
        segment.SetName(class_names[value] if 0 <= value < len(class_names) else "class %d" % value)
    node.SetAndObserveTransformNodeID(reference_volume.GetTransformNodeID())
    node.CreateDefaultDisplayNodes()
    return node


def heat_color_node(scene=None):
    """Slicer's Inferno (or ColdToHotRainbow) colour table when the scene has it, else a table of our own.

    The own table (inferno, 256 entries) is made once per scene and reused.
    """
    scene = scene or scene_of()
    for name in HEAT_COLOR_NAMES + (OWN_COLOR_NAME,):
        nodes = scene.GetNodesByClassByName("vtkMRMLColorNode", name)
        if nodes.GetNumberOfItems() > 0:
            return nodes.GetItemAsObject(0)
    table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", OWN_COLOR_NAME)
    table.SetTypeToUser()
    table.SetNumberOfColors(256)
    anchors = np.asarray(_INFERNO_ANCHORS)
    positions = np.linspace(0.0, 1.0, len(anchors))
    for i, t in enumerate(np.linspace(0.0, 1.0, 256)):
        r, g, b = (float(np.interp(t, positions, anchors[:, c])) for c in range(3))
        table.SetColor(i, "%d" % i, r, g, b, 1.0)
    table.SetAttribute(ATTRIBUTE_PREFIX + "role", "colors")
    return table


def show_heatmap(heat_node, background_volume=None, opacity: float = 0.5, lower_threshold: float = 0.1) -> None:
    """Show a 0..1 heatmap over its scan in every slice view.

    Foreground layer at ``opacity``, heat colour table (:func:`heat_color_node`), window 0..1, and values below
    ``lower_threshold`` transparent (the display node's threshold), so the scan shows where the map is cold; a
    colour legend of the scale (:func:`show_color_legend`).
    """
    scene = scene_of(heat_node)
    if heat_node.GetDisplayNode() is None:
        heat_node.CreateDefaultDisplayNodes()
    display = heat_node.GetDisplayNode()
    modified = display.StartModify()
    display.SetAndObserveColorNodeID(heat_color_node(scene).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.AutoThresholdOff()
    display.SetThreshold(float(lower_threshold), 1.0)
    display.ApplyThresholdOn()
    display.SetInterpolate(1)
    display.EndModify(modified)
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        if background_volume is not None:
            composite.SetBackgroundVolumeID(background_volume.GetID())
        composite.SetForegroundVolumeID(heat_node.GetID())
        composite.SetForegroundOpacity(float(opacity))
    show_color_legend(heat_node)


def show_color_legend(heat_node):
    """The colour legend of the heatmap's scale (0..1, the heat colour table) in the views: the
    ``vtkMRMLColorLegendDisplayNode`` of Slicer's Colors module, made once per heatmap and reused by a rerun.

    Returns the legend node, or ``None`` where the scene cannot make one: the Colors module of the application
    registers the node class; a bare ``slicer-core`` scene has the class but does not register it.
    """
    scene = scene_of(heat_node)
    colors = getattr(slicer, "vtkSlicerColorLogic", None)
    if colors is None or not hasattr(slicer, "vtkMRMLColorLegendDisplayNode") \
            or not scene.IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):
        return None
    legend = colors.GetColorLegendDisplayNode(heat_node) or colors.AddDefaultColorLegendDisplayNode(heat_node)
    if legend is not None:
        modified = legend.StartModify()
        legend.SetTitleText("heat (0-1)")
        legend.SetLabelFormat("%.1f")
        legend.SetVisibility(True)
        legend.EndModify(modified)
    return legend


def set_attributes(node, values: Dict[str, object]) -> None:
    """Store ``values`` as node attributes ``SegHiResCAM.<key>`` (strings; saved with the scene)."""
    for key, value in values.items():
        node.SetAttribute(ATTRIBUTE_PREFIX + key, "" if value is None else str(value))


def get_attributes(node) -> Dict[str, str]:
    """The ``SegHiResCAM.*`` attributes of a node, without the prefix."""
    names = node.GetAttributeNames() or ()
    return {name[len(ATTRIBUTE_PREFIX):]: node.GetAttribute(name) for name in names
            if name.startswith(ATTRIBUTE_PREFIX)}


def find_output(scene, role: str, input_volume, node_class: str):
    """The node of ``node_class`` that SegHiResCAM made with ``role`` for ``input_volume`` (reused by a rerun)."""
    for i in range(scene.GetNumberOfNodesByClass(node_class)):
        node = scene.GetNthNodeByClass(i, node_class)
        if (node.GetAttribute(ATTRIBUTE_PREFIX + "role") == role
                and node.GetAttribute(ATTRIBUTE_PREFIX + "inputVolumeID") == input_volume.GetID()):
            return node
    return None
