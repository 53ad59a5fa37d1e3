"""The module panel's widgets that have no parameter-node connector: bound to the parameter node by hand.

The parameter node is the only source of truth. Its ``SlicerParameterName`` bindings cover most widgets; these do
not fit a connector, so this class copies them both ways: the model path (``modelPath``; the Path connector would
show "." for no path), the segment selector (``segmentationNode`` and ``segmentId``: one widget, two parameters),
the editable layer list (``layer``: its items come from the model), and the point list's place widget (it follows
the point selector). It also shows the groups that the target kind needs. No logic, no dialogs.
"""

from typing import Callable

#: the target kinds that show each group of the target section
GROUP_KINDS = (("segmentGroup", ("segment", "errors")), ("pointGroup", ("point",)), ("errorGroup", ("errors",)))


class InputPanel:
    """Binds the model path, segment selector, layer list and point place widget to the parameter node by hand.

    Args:
        ui: the panel's widgets.
        parameterNode: returns the current parameter node (or ``None``).
        bundledModel: the model source that needs no path (the path field is disabled for it).
    """

    def __init__(self, ui, parameterNode: Callable[[], object], bundledModel: str):
        self.ui, self.parameterNode, self.bundledModel = ui, parameterNode, bundledModel
        ui.segmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        ui.segmentSelector.connect("currentSegmentChanged(QString)", self.onSegmentChanged)
        ui.layerComboBox.connect("currentTextChanged(QString)", self.onLayerChanged)
        ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelPathChanged)
        ui.pointNodeSelector.connect("currentNodeChanged(vtkMRMLNode*)", ui.pointPlaceWidget.setCurrentNode)

    def _set(self, name, value) -> None:
        parameters = self.parameterNode()
        if parameters is not None:
            setattr(parameters, name, value)

    def onSegmentationChanged(self, node) -> None:
        self._set("segmentationNode", node)

    def onSegmentChanged(self, segmentId) -> None:
        self._set("segmentId", segmentId or "")

    def onLayerChanged(self, text) -> None:
        self._set("layer", text or "auto")

    def onModelPathChanged(self, path) -> None:
        self._set("modelPath", path or "")

    def setLayers(self, names) -> None:
        """Fill the layer list with a model's layer names, keeping the chosen layer."""
        parameters = self.parameterNode()
        current = parameters.layer
        self.ui.layerComboBox.clear()
        self.ui.layerComboBox.addItems(names)
        parameters.layer = current  # clear() and addItems() chose the first item
        self.ui.layerComboBox.setEditText(current)

    def update(self, p) -> None:
        """The widgets from the parameter node (called whenever it changes)."""
        ui = self.ui
        path = "" if p.modelPath == "." else p.modelPath  # "." was stored by an older version for no path
        if ui.modelPathLineEdit.currentPath != path:
            ui.modelPathLineEdit.currentPath = path
        ui.modelPathLineEdit.enabled = p.modelSource != self.bundledModel
        for name, kinds in GROUP_KINDS:
            getattr(ui, name).visible = p.targetKind in kinds
        ui.thresholdSpinBox.enabled = p.useThreshold
        if ui.segmentSelector.currentNode() != p.segmentationNode:
            ui.segmentSelector.setCurrentNode(p.segmentationNode)
        if p.segmentId and ui.segmentSelector.currentSegmentID() != p.segmentId:
            ui.segmentSelector.setCurrentSegmentID(p.segmentId)
        if ui.layerComboBox.currentText != p.layer:
            ui.layerComboBox.setEditText(p.layer)
