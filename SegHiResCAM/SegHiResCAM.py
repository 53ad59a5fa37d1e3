"""SegHiResCAM: class-activation heatmaps for medical image segmentation models, as a 3D Slicer module.

This file is a thin shell over the pure-Python package ``SegHiResCAMLib`` (shipped next to it), which holds the
engine, model loading and the MRML bridge. PyTorch is imported by that package only when a computation runs, never
when Slicer loads this module, so Slicer starts quickly and the module still loads where PyTorch is not yet installed.
"""

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

#
# SegHiResCAM
#


class SegHiResCAM(ScriptedLoadableModule):
    """Module description shown in Slicer's module selector and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("SegHiResCAM")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["SegHiResCAM developers"]
        self.parent.helpText = _("""
Explains a segmentation model's prediction with class-activation heatmaps layered over the scan:
Seg-Grad-CAM, Seg-HiRes-Grad CAM and ProtoSeg segmentation-ability maps, for 2D and 3D PyTorch models.
See the <a href="https://github.com/seghirescam/SlicerSegHiResCAM">project page</a> for documentation.
""")
        self.parent.acknowledgementText = _("""
Built on 3D Slicer and PyTorch (installed through Slicer's PyTorch extension). The bundled example model is
HD-BET (Isensee et al., Hum. Brain Mapp. 2019), distributed under the Apache License 2.0.
""")


#
# SegHiResCAMWidget
#


class SegHiResCAMWidget(ScriptedLoadableModuleWidget):
    """Module panel. Stays thin: every computation belongs to SegHiResCAMLogic and SegHiResCAMLib."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        self.logic = None
        self.ui = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        # The panel is described in Resources/UI/SegHiResCAM.ui (edit it with Qt Designer).
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SegHiResCAM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self.logic = SegHiResCAMLogic()
        self.layout.addStretch(1)


#
# SegHiResCAMLogic
#


class SegHiResCAMLogic(ScriptedLoadableModuleLogic):
    """Headless part of the module: usable from Slicer's Python console and scripts without the widget."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)


#
# SegHiResCAMTest
#


class SegHiResCAMTest(ScriptedLoadableModuleTest):
    """Self-test run by ctest and by the module's "Reload and Test" button."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_LibraryImports()
        self.setUp()
        self.test_LogicConstructs()

    def test_LibraryImports(self):
        """The package installed with the module imports, and exposes the project's error family."""
        self.delayDisplay("Importing SegHiResCAMLib")
        import SegHiResCAMLib
        from SegHiResCAMLib.errors import SegHiResCAMError

        self.assertEqual(SegHiResCAMLib.__name__, "SegHiResCAMLib")
        self.assertTrue(issubclass(SegHiResCAMError, Exception))
        self.delayDisplay("SegHiResCAMLib imported")

    def test_LogicConstructs(self):
        """The logic can be built without the widget (as scripts and the command line do)."""
        self.delayDisplay("Constructing SegHiResCAMLogic")
        logic = SegHiResCAMLogic()
        self.assertIsInstance(logic, ScriptedLoadableModuleLogic)
        self.delayDisplay("SegHiResCAMLogic constructed")
