"""Stand-ins for the Qt-only parts of 3D Slicer, so that ``import SegHiResCAM`` works under plain pytest.

The PyPI package ``slicer-core`` gives the real MRML scene, nodes, segmentation logic and ``slicer.util`` array
helpers, but not what needs Qt: the ``ScriptedLoadableModule`` base classes, ``slicer.parameterNodeWrapper``
(its GUI connectors import ``qt``), ``slicer.app``, ``slicer.modules`` and ``slicer.i18n``. :func:`setup` puts
small stand-ins for exactly those into the ``slicer`` package; everything else (MRML, torch, numpy, SimpleITK)
is real. Inside the Slicer application :func:`setup` changes nothing but ``sys.path``.

As strict as Slicer, read against its sources (5.8, 5.10, 5.12): parameters are checked with ``isinstance`` (no
coercion) then ``Choice``/``WithinRange``; ``connectGui`` builds the connectors of Slicer's guiConnectors (a combo box
is cleared and refilled, which fires whatever is still connected), returns ``None`` on 5.8 and a tag on 5.10+
(:func:`emulate_slicer`); the .ui is loaded as :class:`StandInWidget` objects whose ``connect`` fails on a signal
their class does not have; ``slicer.app`` (:class:`StandaloneApplication`) runs ``--testing`` off, fills
``slicer.modules`` and calls ``setup``/``enter``/``exit``/``cleanup`` as the application does, and its event loop
fires ``QTimer`` s and ``QSocketNotifier`` s, optionally idling with the GIL held as PythonQt's main thread does
(Python then runs only when a timer is due or a watched socket readable); the scene registers the node classes
that the application's modules register (the Colors module's colour legend).
"""

import ctypes
import inspect
import logging
import os
import pathlib
import sys
import time
import types
import typing
import unittest
import xml.etree.ElementTree as ET

import vtk

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE_DIR = os.path.join(os.path.dirname(HERE), "SegHiResCAM")


# ---------------------------------------------------------------------------------------------- parameterNodeWrapper
#: the Slicer release whose ``parameterNodeWrapper`` is emulated: "5.8" (``connectGui`` returns None), "5.10"
#: (returns a tag; ``disconnectGui`` leaves the VTK observer), "5.12" (returns a tag, removes the observer).
#: Tests switch it with :func:`emulate_slicer`.
SLICER_VERSION = "5.12"
SLICER_VERSIONS = ("5.8", "5.10", "5.12")


def emulate_slicer(version):
    """Emulate the ``parameterNodeWrapper`` of Slicer ``version`` (see :data:`SLICER_VERSION`); return the old one."""
    global SLICER_VERSION
    if version not in SLICER_VERSIONS:
        raise ValueError(version)
    old, SLICER_VERSION = SLICER_VERSION, version
    return old


class Choice:
    def __init__(self, choices):
        self.choices = tuple(choices)

    def validate(self, value):
        if value not in self.choices:
            raise ValueError("value %r is not in the choices %s" % (value, self.choices))


class WithinRange:
    def __init__(self, minimum, maximum):
        self.minimum, self.maximum = minimum, maximum

    def validate(self, value):
        if not self.minimum <= value <= self.maximum:
            raise ValueError("value %r is not within [%r, %r]" % (value, self.minimum, self.maximum))


class Default:
    def __init__(self, value):
        self.value = value


class Decimals:
    def __init__(self, value):
        self.value = value


class SingleStep:
    def __init__(self, value):
        self.value = value


def _is_node_type(datatype):
    import slicer
    return isinstance(datatype, type) and issubclass(datatype, slicer.vtkMRMLNode)


_PATH_TYPES = (pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePath, pathlib.PurePosixPath,
               pathlib.PureWindowsPath)


class _Parameter:
    """One typed parameter stored in a vtkMRMLScriptedModuleNode, validated as Slicer's serializers validate:
    ``NotNone`` and ``IsInstance`` first (no coercion: a ``str`` is no ``pathlib.Path``, an ``int`` is a ``float``),
    then the annotations (``Choice``, ``WithinRange``)."""

    def __init__(self, name, annotation, default):
        self.name = name
        self.annotation = annotation
        self.type, self.extras = annotation, ()
        if typing.get_origin(annotation) is typing.Annotated:
            self.type, *extras = typing.get_args(annotation)
            self.extras = tuple(extras)
        if not (_is_node_type(self.type) or self.type in (bool, int, float, str) or self.type in _PATH_TYPES):
            raise TypeError("the stand-in has no serializer for %s: %r" % (name, self.type))
        for extra in self.extras:
            if isinstance(extra, Default):
                default = extra.value
        if default is _MISSING:
            default = None if _is_node_type(self.type) else (
                self.type() if self.type in _PATH_TYPES else {bool: False, int: 0, float: 0, str: ""}[self.type])
        self.default = default

    def validate(self, value):
        if _is_node_type(self.type):
            allowed = self.type
        else:
            if value is None:
                raise ValueError("Value must not be None")
            allowed = (int, float) if self.type is float else self.type
        if value is not None and not isinstance(value, allowed):
            raise TypeError("Value must be of type '%s', is type '%s' value '%s'" % (allowed, type(value), value))
        for extra in self.extras:
            if hasattr(extra, "validate"):
                extra.validate(value)

    def isIn(self, node):
        return node.HasParameter(self.name)

    def read(self, node):
        if _is_node_type(self.type):
            return node.GetNodeReference(self.name)
        text = node.GetParameter(self.name)
        if self.type is bool:
            return text == "True"
        return self.type(text)

    def write(self, node, value):
        self.validate(value)
        if _is_node_type(self.type):
            node.SetParameter(self.name, "")
            node.SetNodeReferenceID(self.name, value.GetID() if value is not None else None)
        elif self.type is bool:
            node.SetParameter(self.name, "True" if value else "False")
        else:
            node.SetParameter(self.name, str(value))


_MISSING = object()
SlicerParameterNamePropertyName = "SlicerParameterName"


# GUI connectors: which widget class represents which parameter type, through which signal (Slicer's guiConnectors)
class _Connector:
    def __init__(self, widget, parameter):
        self.widget, self.parameter, self._callback = widget, parameter, None
        cls = widget.className
        ranged = [e for e in parameter.extras if isinstance(e, WithinRange)]
        if cls in ("QComboBox", "ctkComboBox"):
            choices = [e for e in parameter.extras if isinstance(e, Choice)]
            if not choices:
                raise RuntimeError("ComboBoxToStringableConnector requires the Choice annotation to be used.")
            self.choices = choices[0].choices
            widget.clear()  # emits currentIndexChanged to whatever is still connected
            for choice in self.choices:
                widget.addItem(str(choice))
            self.signal = "currentIndexChanged(int)"
        elif cls in ("QCheckBox", "ctkCheckBox"):
            self.signal = "stateChanged(int)"
        elif cls in ("QSpinBox", "QSlider"):
            self.signal = "valueChanged(int)"
            if ranged:
                widget.minimum, widget.maximum = ranged[0].minimum, ranged[0].maximum
        elif cls in ("QDoubleSpinBox", "ctkDoubleSpinBox", "ctkSliderWidget"):
            self.signal = "valueChanged(double)"
            for extra in parameter.extras:
                if isinstance(extra, Decimals):
                    widget.decimals = extra.value
                if isinstance(extra, SingleStep):
                    widget.singleStep = extra.value
            widget.minimum, widget.maximum = ((ranged[0].minimum, ranged[0].maximum) if ranged
                                              else (float("-inf"), float("inf")))
        elif cls == "ctkPathLineEdit":
            self.signal = "currentPathChanged(QString)"
        elif cls == "qMRMLNodeComboBox":
            self.signal = "currentNodeChanged(vtkMRMLNode*)"
        else:
            raise RuntimeError("Unable to create GUI connector from datatype: %s to widget %s" % (parameter.type, cls))
        kinds = {"QComboBox": None, "ctkComboBox": None, "QCheckBox": (bool,), "ctkCheckBox": (bool,),
                 "QSpinBox": (int,), "QSlider": (int,), "QDoubleSpinBox": (float,), "ctkDoubleSpinBox": (float,),
                 "ctkSliderWidget": (float,), "ctkPathLineEdit": _PATH_TYPES}
        allowed = kinds.get(cls)
        if cls == "qMRMLNodeComboBox":
            ok = _is_node_type(parameter.type)
        elif allowed is None:
            ok = parameter.type in (int, float, str, bool)
        else:
            ok = parameter.type in allowed
        if not ok:
            raise RuntimeError("Unable to create GUI connector from datatype: %s to widget %s" % (parameter.type, cls))

    def read(self):
        w, cls = self.widget, self.widget.className
        if hasattr(self, "choices"):
            return self.choices[w.currentIndex]
        if cls in ("QCheckBox", "ctkCheckBox"):
            return bool(w.checked)
        if cls == "ctkPathLineEdit":
            return self.parameter.type(w.currentPath)
        if cls == "qMRMLNodeComboBox":
            return w.currentNode()
        return w.value

    def write(self, value):
        w, cls = self.widget, self.widget.className
        if hasattr(self, "choices"):
            if value not in self.choices:
                raise ValueError("Unable to find value %s in choices %s" % (value, self.choices))
            w.currentIndex = self.choices.index(value)
        elif cls in ("QCheckBox", "ctkCheckBox"):
            w.checked = bool(value)
        elif cls == "ctkPathLineEdit":
            w.currentPath = str(value)
        elif cls == "qMRMLNodeComboBox":
            w.setCurrentNode(value)
        else:
            w.value = value

    def onChanged(self, callback):
        if self._callback is not None:
            self.widget.disconnect(self.signal, self._changed)
        self._callback = callback
        if callback is not None:
            self.widget.connect(self.signal, self._changed)

    def _changed(self, *args):
        if self._callback:
            self._callback()


def parameterNodeWrapper(cls):
    """Typed properties over a ``vtkMRMLScriptedModuleNode`` with ``connectGui``, as Slicer's wrapper makes them
    (``slicer/parameterNodeWrapper/wrapper.py``), in the behaviour of :data:`SLICER_VERSION`."""
    hints = typing.get_type_hints(cls, include_extras=True)
    parameters = {name: _Parameter(name, hint, cls.__dict__.get(name, _MISSING)) for name, hint in hints.items()}

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode
        self._parameterGUIs, self._nextParameterGUIsTag, self._guiVtkObserverTags = {}, 0, {}
        self._updatingGUIFromParameterNode = False
        for parameter in parameters.values():  # Slicer writes the defaults of parameters not yet in the node
            if not parameter.isIn(parameterNode):
                parameter.write(parameterNode, parameter.default)

    def make_property(parameter):
        return property(lambda self: parameter.read(self.parameterNode),
                        lambda self, value: parameter.write(self.parameterNode, value))

    def checkName(name):
        if name not in parameters:
            raise ValueError("Cannot find a param with the given name: %s" % name)

    def getValue(self, name):
        checkName(name)
        return parameters[name].read(self.parameterNode)

    def setValue(self, name, value):
        checkName(name)
        parameters[name].write(self.parameterNode, value)

    def updateGui(self):
        if self._updatingGUIFromParameterNode:
            return
        try:
            self._updatingGUIFromParameterNode = True
            for mapping in list(self._parameterGUIs.values()):
                for name, connector in mapping.items():
                    connector.write(self.getValue(name))
        finally:
            self._updatingGUIFromParameterNode = False

    def connectParametersToGui(self, mapping):
        for name in mapping:
            checkName(name)
        connectors = {name: _Connector(widget, parameters[name]) for name, widget in mapping.items()}
        tag = self._nextParameterGUIsTag
        self._nextParameterGUIsTag += 1
        self._parameterGUIs[tag] = connectors

        def guiToParameter(name, connector):
            def callback():
                if not self._updatingGUIFromParameterNode:
                    self.setValue(name, connector.read())
            return callback

        for name, connector in connectors.items():
            connector.write(self.getValue(name))
            connector.onChanged(guiToParameter(name, connector))
        self._guiVtkObserverTags[tag] = self.parameterNode.AddObserver(
            vtk.vtkCommand.ModifiedEvent, lambda caller, event: updateGui(self))
        return tag

    def connectGui(self, gui):
        widgets = gui.findChildren() if getattr(gui, "isWidgetType", lambda: False)() else gui.__dict__.values()
        mapping = {w.property(SlicerParameterNamePropertyName): w for w in widgets
                   if w.property(SlicerParameterNamePropertyName)}
        tag = connectParametersToGui(self, mapping)
        return None if SLICER_VERSION == "5.8" else tag

    def disconnectGui(self, tag):
        if tag in self._parameterGUIs:
            for connector in self._parameterGUIs.pop(tag).values():
                connector.onChanged(None)
        if SLICER_VERSION == "5.12" and tag in self._guiVtkObserverTags:
            self.parameterNode.RemoveObserver(self._guiVtkObserverTags.pop(tag))

    namespace = {"__init__": __init__, "allParameters": parameters, "__doc__": cls.__doc__,
                 "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                 "getValue": getValue, "setValue": setValue, "connectGui": connectGui,
                 "connectParametersToGui": connectParametersToGui, "disconnectGui": disconnectGui,
                 "dataType": staticmethod(lambda name: parameters[name].annotation),
                 "default": lambda self, name: parameters[name].default,
                 "StartModify": lambda self: self.parameterNode.StartModify(),
                 "EndModify": lambda self, wasModified: self.parameterNode.EndModify(wasModified),
                 "AddObserver": lambda self, event, callback, priority=0.0: self.parameterNode.AddObserver(
                     event, callback, priority),
                 "RemoveObserver": lambda self, tag: self.parameterNode.RemoveObserver(tag),
                 "Modified": lambda self: self.parameterNode.Modified()}
    namespace.update({name: make_property(p) for name, p in parameters.items()})
    for name, value in cls.__dict__.items():  # methods defined on the wrapped class
        if callable(value) and name not in namespace and not name.startswith("__"):
            namespace[name] = value
    return type(cls.__name__, (), namespace)


# ---------------------------------------------------------------------------------------------- widgets of the .ui
_OBJECT = {"destroyed()", "destroyed(QObject*)", "objectNameChanged(QString)"}
_WIDGET = _OBJECT | {"customContextMenuRequested(QPoint)", "windowTitleChanged(QString)", "windowIconChanged(QIcon)"}
_BUTTON = _WIDGET | {"clicked()", "clicked(bool)", "pressed()", "released()", "toggled(bool)"}
_MRML_WIDGET = _WIDGET | {"mrmlSceneChanged(vtkMRMLScene*)"}
_NODE_SELECTION = {"currentNodeChanged(vtkMRMLNode*)", "currentNodeChanged(bool)"}
#: the signals (with their C++ signatures, as PythonQt's ``connect`` wants them) of the widget classes of the .ui
SIGNALS = {
    "QWidget": _WIDGET, "QLabel": _WIDGET | {"linkActivated(QString)", "linkHovered(QString)"},
    "QPushButton": _BUTTON, "QCheckBox": _BUTTON | {"stateChanged(int)"},
    "ctkCollapsibleButton": _BUTTON | {"contentsCollapsed(bool)"},
    "QComboBox": _WIDGET | {"activated(int)", "activated(QString)", "currentIndexChanged(int)",
                            "currentIndexChanged(QString)", "currentTextChanged(QString)", "editTextChanged(QString)",
                            "highlighted(int)", "highlighted(QString)", "textActivated(QString)",
                            "textHighlighted(QString)"},
    "QSpinBox": _WIDGET | {"valueChanged(int)", "valueChanged(QString)", "textChanged(QString)", "editingFinished()"},
    "QDoubleSpinBox": _WIDGET | {"valueChanged(double)", "valueChanged(QString)", "textChanged(QString)",
                                 "editingFinished()"},
    "QProgressBar": _WIDGET | {"valueChanged(int)"},
    "QLineEdit": _WIDGET | {"textChanged(QString)", "textEdited(QString)", "editingFinished()", "returnPressed()"},
    "ctkPathLineEdit": _WIDGET | {"currentPathChanged(QString)", "validInputChanged(bool)"},
    "qMRMLWidget": _MRML_WIDGET, "qSlicerWidget": _MRML_WIDGET,
    "qMRMLNodeComboBox": _WIDGET | _NODE_SELECTION | {
        "currentNodeIDChanged(QString)", "nodeActivated(vtkMRMLNode*)", "nodeAdded(vtkMRMLNode*)",
        "nodeAddedByUser(vtkMRMLNode*)", "nodeAboutToBeAdded(vtkMRMLNode*)", "nodeAboutToBeRemoved(vtkMRMLNode*)",
        "nodeAboutToBeEdited(vtkMRMLNode*)", "currentNodeRenamed(QString)"},
    "qMRMLSegmentSelectorWidget": _MRML_WIDGET | _NODE_SELECTION | {"currentSegmentChanged(QString)",
                                                                   "segmentSelectionChanged(QStringList)"},
    "qSlicerMarkupsPlaceWidget": _MRML_WIDGET | {"activeMarkupsFiducialPlaceModeChanged(bool)",
                                                "activeMarkupsPlaceModeChanged(bool)"},
    "QTimer": _OBJECT | {"timeout()"},
    "QSocketNotifier": _OBJECT | {"activated(int)", "activated(QSocketDescriptor,QSocketNotifier::Type)"},
}
#: Qt's defaults of the properties the module and the connectors use
_DEFAULTS = {"QSpinBox": dict(value=0, minimum=0, maximum=99, singleStep=1, specialValueText=""),
             "QDoubleSpinBox": dict(value=0.0, minimum=0.0, maximum=99.99, singleStep=1.0, decimals=2,
                                    specialValueText=""),
             "QCheckBox": dict(checked=False), "QComboBox": dict(currentIndex=-1, currentText="", editable=False),
             "ctkPathLineEdit": dict(currentPath="", filters="AllEntries"),  # ctkPathLineEdit's default filters
             "QProgressBar": dict(value=0)}
#: property -> (signal, argument) emitted when it changes, per widget class
_NOTIFY = {"currentIndex": {"QComboBox": [("currentIndexChanged(int)", lambda w, v: v),
                                          ("currentTextChanged(QString)", lambda w, v: w.currentText)]},
           "checked": {"QCheckBox": [("toggled(bool)", lambda w, v: bool(v)),
                                     ("stateChanged(int)", lambda w, v: 2 if v else 0)]},
           "value": {"QSpinBox": [("valueChanged(int)", lambda w, v: v)],
                     "QDoubleSpinBox": [("valueChanged(double)", lambda w, v: v)],
                     "QProgressBar": [("valueChanged(int)", lambda w, v: v)]},
           "text": {"QLineEdit": [("textChanged(QString)", lambda w, v: v)]},
           "currentPath": {"ctkPathLineEdit": [("currentPathChanged(QString)", lambda w, v: v)]}}


def _call_slot(slot, args):
    """Call ``slot`` with as many of ``args`` as it takes, as PythonQt does."""
    try:
        signature = inspect.signature(slot)
    except (TypeError, ValueError):
        return slot(*args)
    params = list(signature.parameters.values())
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return slot(*args)
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return slot(*args[:len(positional)])


class StandInWidget:
    """A widget of the .ui: its class, name and designer properties; signals checked against the class's real
    signals (an unknown signal raises, where PythonQt would print a warning and never call the slot)."""

    def __init__(self, className, name="", properties=None):
        d = self.__dict__
        d["className"], d["name"], d["_properties"] = className, name, dict(properties or {})
        d["_connections"], d["_children"], d["items"], d["_node"], d["_segment"] = {}, [], [], None, ""
        d["_scene"] = None
        d.update(enabled=True, visible=True, text="", toolTip="")
        d.update(_DEFAULTS.get(className, {}))
        for key, value in d["_properties"].items():
            if key in _DEFAULTS.get(className, {}) or key in ("text", "toolTip", "enabled", "visible"):
                d[key] = value

    def __setattr__(self, key, value):
        if key == "value" and self.className in ("QSpinBox", "QDoubleSpinBox"):
            value = min(max(value, self.minimum), self.maximum)
            if self.className == "QDoubleSpinBox":
                value = round(float(value), self.decimals)
        if key == "currentIndex":
            self.__dict__["currentText"] = self.items[value] if 0 <= value < len(self.items) else ""
        old = self.__dict__.get(key, _MISSING)
        self.__dict__[key] = value
        if old != value:
            for signal, argument in _NOTIFY.get(key, {}).get(self.className, []):
                self.emit(signal, argument(self, value))

    # ---- QObject
    def _check(self, signal):
        if signal not in SIGNALS.get(self.className, ()):
            raise AttributeError("%s %r has no signal %r (PythonQt would connect nothing)" % (
                self.className, self.name, signal))

    def connect(self, signal, slot):
        self._check(signal)
        self._connections.setdefault(signal, []).append(slot)
        return True

    def disconnect(self, signal, slot):
        self._check(signal)
        slots = self._connections.get(signal, [])
        if slot in slots:
            slots.remove(slot)

    def connected(self, signal):
        return list(self._connections.get(signal, []))

    def emit(self, signal, *args):
        self._check(signal)
        for slot in list(self._connections.get(signal, [])):
            _call_slot(slot, args)

    def property(self, name):
        return self._properties.get(name)

    def setProperty(self, name, value):
        self._properties[name] = value

    def isWidgetType(self):
        return True

    def findChildren(self, *args):
        found = []
        for child in self._children:
            found += [child] + child.findChildren()
        return found

    def show(self):
        self.visible = True

    def hide(self):
        self.visible = False

    def click(self):
        if self.enabled:
            self.emit("clicked(bool)", False) if self._connections.get("clicked(bool)") else None
            self.emit("clicked()") if self._connections.get("clicked()") else None

    # ---- QComboBox
    def clear(self):
        self.__dict__["items"] = []
        self.currentIndex = -1

    def addItem(self, text):
        self.items.append(str(text))
        if self.currentIndex == -1:
            self.currentIndex = 0

    def addItems(self, items):
        for item in items:
            self.addItem(item)

    def setEditText(self, text):
        self.__dict__["currentText"] = text
        self.emit("editTextChanged(QString)", text)

    # ---- MRML widgets
    def setMRMLScene(self, scene):
        self.__dict__["_scene"] = scene
        if self.className in ("qMRMLWidget", "qSlicerWidget", "qMRMLSegmentSelectorWidget",
                              "qSlicerMarkupsPlaceWidget"):
            self.emit("mrmlSceneChanged(vtkMRMLScene*)", scene)

    def mrmlScene(self):
        return self._scene

    def currentNode(self):
        return self._node

    def setCurrentNode(self, node):
        if node is not self._node:
            self.__dict__["_node"] = node
            if self.className != "qSlicerMarkupsPlaceWidget":
                self.emit("currentNodeChanged(vtkMRMLNode*)", node)
                self.emit("currentNodeChanged(bool)", node is not None)

    def currentSegmentID(self):
        return self._segment

    def setCurrentSegmentID(self, segmentId):
        if segmentId != self._segment:
            self.__dict__["_segment"] = segmentId
            self.emit("currentSegmentChanged(QString)", segmentId)


class StandInLayout:
    def __init__(self):
        self.widgets = []

    def addWidget(self, widget):
        self.widgets.append(widget)

    def addStretch(self, stretch=0):
        pass


def _ui_value(element):
    for child in element:
        if child.tag in ("string", "cstring", "enum", "set"):
            return child.text or ""
        if child.tag == "bool":
            return child.text == "true"
        if child.tag == "number":
            return int(child.text)
        if child.tag == "double":
            return float(child.text)
    return None


def loadUI(path):
    """The .ui at ``path`` as :class:`StandInWidget` objects (the top widget, its children reachable by
    ``findChildren``); the top widget's ``mrmlSceneChanged`` reaches the receivers of the .ui's connections."""
    if not os.path.isfile(path):
        raise RuntimeError("Could not load UI file: file not found " + str(path))
    root = ET.parse(path).getroot()

    def build(element):
        properties = {p.get("name"): _ui_value(p) for p in element.findall("property")}
        widget = StandInWidget(element.get("class"), element.get("name"), properties)
        for child in element.iter("widget"):
            if child is not element and _parent_widget(element, child):
                widget._children.append(build(child))
        return widget

    def _parent_widget(parent, child):  # child's closest widget ancestor is parent (through layouts and items)
        stack = [(parent, c) for c in parent]
        while stack:
            _, element = stack.pop()
            if element is child:
                return True
            if element.tag != "widget":
                stack += [(element, c) for c in element]
        return False

    top = build(root.find("widget"))
    byName = {w.name: w for w in [top] + top.findChildren()}
    connections = root.find("connections")
    for connection in (connections if connections is not None else []):
        sender, receiver = byName[connection.find("sender").text], byName[connection.find("receiver").text]
        slot = connection.find("slot").text.split("(")[0]
        sender.connect(connection.find("signal").text, getattr(receiver, slot))
    return top


def childWidgetVariables(widget):
    ui = types.SimpleNamespace()
    for child in widget.findChildren():
        if child.name:
            setattr(ui, child.name, child)
    return ui


class QTimer(StandInWidget):
    """``qt.QTimer``: fired by :meth:`StandaloneApplication.runEventLoop` (the application's event loop)."""

    timers = []

    def __init__(self, parent=None):
        super().__init__("QTimer")
        self.__dict__.update(interval=0, singleShot=False, _active=False, _due=0.0)
        QTimer.timers.append(self)

    def setInterval(self, msec):
        self.__dict__["interval"] = msec

    def start(self, msec=None):
        if msec is not None:
            self.setInterval(msec)
        self.__dict__.update(_active=True, _due=time.perf_counter() + self.interval / 1000.0)

    def stop(self):
        self.__dict__["_active"] = False

    def isActive(self):
        return self._active

    @property
    def active(self):
        return self._active


class QSocketNotifier(StandInWidget):
    """``qt.QSocketNotifier``: the event loop (:meth:`StandaloneApplication.runEventLoop`) emits ``activated(int)``
    while the socket is readable (level-triggered, as Qt). Strict: a notifier left enabled on a closed socket
    raises there (Qt prints "Invalid socket" and disables it)."""

    Read, Write, Exception = 0, 1, 2
    notifiers = []

    def __init__(self, socket, type, parent=None):
        super().__init__("QSocketNotifier")
        if type != QSocketNotifier.Read:
            raise NotImplementedError("the stand-in watches reading only")
        self.__dict__.update(_socket=int(socket), _enabled=True)
        QSocketNotifier.notifiers.append(self)

    def socket(self):
        return self._socket

    def setEnabled(self, enabled):
        self.__dict__["_enabled"] = bool(enabled)

    def isEnabled(self):
        return self._enabled


class _PollFd(ctypes.Structure):
    _fields_ = [("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short)]


_POLLIN, _POLLERR, _POLLHUP, _POLLNVAL = 0x1, 0x8, 0x10, 0x20


def _idle(seconds, holdGIL):
    """Idle up to ``seconds`` or until a watched socket is readable; return the notifiers to activate.

    ``holdGIL``: in C with the GIL held (``poll`` through ``ctypes.PyDLL``), as Qt's event loop under PythonQt."""
    watched = [n for n in QSocketNotifier.notifiers if n.isEnabled()]
    QSocketNotifier.notifiers[:] = watched  # the disabled ones are dropped (the module lets go of them too)
    if not watched:
        if holdGIL:
            ctypes.PyDLL(None).usleep(int(seconds * 1e6))
        else:
            time.sleep(seconds)
        return []
    fds = (_PollFd * len(watched))(*[(n.socket(), _POLLIN, 0) for n in watched])
    timeout = int(max(0.0, seconds) * 1000 + 0.999)
    if holdGIL:
        ctypes.PyDLL(None).poll(fds, ctypes.c_ulong(len(watched)), ctypes.c_int(timeout))
    else:
        import select
        poller = select.poll()
        for n in watched:
            poller.register(n.socket(), select.POLLIN)
        events = dict(poller.poll(timeout))
        for fd in fds:
            fd.revents = events.get(fd.fd, 0)
    for notifier, fd in zip(watched, fds):
        if fd.revents & _POLLNVAL:
            raise RuntimeError("QSocketNotifier: socket %d is closed but its notifier is still enabled" % fd.fd)
    return [n for n, fd in zip(watched, fds) if fd.revents & (_POLLIN | _POLLERR | _POLLHUP)]


# ---------------------------------------------------------------------------------------------- ScriptedLoadableModule
class ScriptedLoadableModule:
    def __init__(self, parent):
        import slicer
        self.parent = parent
        self.moduleName = self.__class__.__name__
        parent.title = ""
        parent.categories, parent.dependencies, parent.contributors = [], [], []
        parent.helpText = parent.acknowledgementText = ""
        if not hasattr(slicer, "selfTests"):
            slicer.selfTests = {}
        slicer.selfTests[self.moduleName] = getattr(self, "runTest", None)

    def resourcePath(self, filename):
        return os.path.join(os.path.dirname(self.parent.path), "Resources", filename)

    def getDefaultModuleDocumentationLink(self, docPage=None):
        return ""


class ModulePanel(StandInWidget):
    """The C++ ``qSlicerScriptedLoadableModuleWidget`` that holds a module's Python widget: layout, isEntered."""

    def __init__(self):
        super().__init__("qMRMLWidget", "modulePanel")
        self.__dict__.update(isEntered=False, _layout=StandInLayout())

    def layout(self):
        return self._layout


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        import slicer
        self.moduleName = self.__class__.__name__
        if self.moduleName.endswith("Widget"):
            self.moduleName = self.moduleName[:-6]
        self.developerMode = False
        self.parent = parent if parent else ModulePanel()
        self.layout = self.parent.layout()
        if not parent:
            self.parent.setMRMLScene(slicer.mrmlScene)
            self.setup()

    def resourcePath(self, filename):
        return os.path.join(os.path.dirname(inspect.getfile(self.__class__)), "Resources", filename)

    def setup(self):
        pass

    def cleanup(self):
        pass

    def enter(self):
        pass

    def exit(self):
        pass


class ScriptedLoadableModuleLogic:
    """Slicer's base logic: ``getParameterNode`` returns the module's singleton scripted module node."""

    def __init__(self, parent=None):
        name = self.__class__.__name__
        self.moduleName = name[:-len("Logic")] if name.endswith("Logic") else name

    def getParameterNode(self):
        import slicer
        scene = slicer.mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetName(scene.GenerateUniqueName(self.moduleName))
            node.SetAttribute("ModuleName", self.moduleName)
            node = scene.AddNode(node)
        return node


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, msec=1000):
        logging.info(message)

    def takeScreenshot(self, name, description, type=-1):
        logging.info("screenshot %s: %s (not taken outside Slicer)", name, description)


# ---------------------------------------------------------------------------------------------- app, modules, i18n
class ModuleParent:
    """The C++ ``qSlicerScriptedLoadableModule`` of a module (``slicer.modules.<lower-case name>``)."""

    def __init__(self, name, path):
        self.name, self.path = name, path
        self.widget = None

    def isScripted(self):
        return True

    def widgetRepresentation(self):
        return self.widget.parent if self.widget else None


class StandaloneApplication:
    """``slicer.app`` as far as module code and the module's life cycle go: the application loads a module
    (``slicer.modules``), creates its widget and calls ``setup()`` when the module is first shown, ``enter()`` each
    time it is shown, ``exit()`` when the user switches away, ``cleanup()`` when the application quits; closing
    the scene; the event loop that fires ``QTimer`` s and ``QSocketNotifier`` s, optionally holding the GIL while
    idle as PythonQt does."""

    applicationName = "slicer-core (no application)"

    def __init__(self):
        self._testingEnabled = False  # the application runs without --testing
        self.current = None

    def testingEnabled(self):
        return self._testingEnabled

    def setTestingEnabled(self, enabled):
        self._testingEnabled = bool(enabled)

    def layoutManager(self):
        return None

    def loadModule(self, pythonModule, name=None):
        """Instantiate the module class of ``pythonModule`` and register it in ``slicer.modules``."""
        import slicer
        name = name or pythonModule.__name__
        parent = ModuleParent(name, pythonModule.__file__)
        instance = getattr(pythonModule, name)(parent)
        parent.instance, parent.pythonModule = instance, pythonModule
        setattr(slicer.modules, name.lower(), parent)
        setattr(slicer.modules, name + "Instance", instance)
        return parent

    def selectModule(self, name):
        """Show module ``name`` in the module panel: ``exit()`` the current one; ``setup()`` (first time), ``enter()``."""
        import slicer
        module = getattr(slicer.modules, name.lower())
        if self.current is module:
            return module.widget
        self.leaveModule()
        if module.widget is None:
            panel = ModulePanel()
            panel.setMRMLScene(slicer.mrmlScene)
            module.widget = getattr(module.pythonModule, name + "Widget")(panel)
            setattr(slicer.modules, name + "Widget", module.widget)
            module.widget.setup()
        self.current = module
        module.widget.parent.__dict__["isEntered"] = True
        module.widget.enter()
        return module.widget

    def leaveModule(self):
        """Switch the module panel to another module: ``exit()`` of the current one."""
        if self.current is not None:
            module, self.current = self.current, None
            module.widget.parent.__dict__["isEntered"] = False
            module.widget.exit()

    def quit(self):
        """The application quits: ``exit()`` of the shown module, then ``cleanup()`` of every widget."""
        import slicer
        self.leaveModule()
        for module in list(vars(slicer.modules).values()):
            if isinstance(module, ModuleParent) and module.widget is not None:
                module.widget.cleanup()

    def closeScene(self):
        """File > Close Scene."""
        import slicer
        slicer.mrmlScene.Clear(0)

    def processEvents(self):
        now = time.perf_counter()
        for timer in list(QTimer.timers):
            if timer._active and now >= timer._due:
                if timer.singleShot:
                    timer.stop()
                else:
                    timer.__dict__["_due"] = now + timer.interval / 1000.0
                timer.emit("timeout()")

    def runEventLoop(self, until=None, timeout=60.0, holdGIL=False):
        """Run the event loop until ``until()`` is true (or ``timeout`` s): fire due timers and the notifiers of
        readable sockets, idle in between.

        ``holdGIL``: idle as Slicer's main thread does, inside Qt's event loop with the GIL held (PythonQt does not
        release it), in C through ``ctypes.PyDLL`` (which keeps the GIL), and run Python (``until`` included) only
        when a timer is due or a watched socket readable, as PythonQt does; else ``time.sleep``/``select``, with
        ``until`` asked at least every 20 ms. Returns whether ``until()`` became true.
        """
        deadline = time.perf_counter() + timeout
        ready = []
        while time.perf_counter() < deadline:
            self.processEvents()
            for notifier in ready:
                if notifier.isEnabled():
                    notifier.emit("activated(int)", notifier.socket())
            if until is not None and until():
                return True
            now = time.perf_counter()
            due = [t._due for t in QTimer.timers if t._active] or ([] if holdGIL else [now + 0.02])
            wait = max(0.0, min(due + [deadline]) - now)
            if not holdGIL:
                wait = min(wait, 0.02)
            ready = _idle(wait, holdGIL)
        return until is None


def _module(name, **members):
    module = types.ModuleType(name)
    module.__dict__.update(members)
    return module


def register_module_nodes(scene):
    """Register in ``scene`` the node classes that the application's modules register and a bare slicer-core
    scene lacks: the Colors module's ``vtkMRMLColorLegendDisplayNode``. Returns ``scene``."""
    import slicer
    legend = getattr(slicer, "vtkMRMLColorLegendDisplayNode", None)
    if legend is not None and not scene.IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):
        scene.RegisterNodeClass(legend())
    return scene


def setup(new_scene: bool = False):
    """Make ``import SegHiResCAM`` work on a real slicer-core MRML scene; return the ``slicer`` package.

    Idempotent. ``new_scene`` replaces ``slicer.mrmlScene`` by a fresh scene.
    """
    import slicer

    if MODULE_DIR not in sys.path:
        sys.path.insert(0, MODULE_DIR)
    if new_scene or getattr(slicer, "mrmlScene", None) is None:
        slicer.mrmlScene = slicer.vtkMRMLScene()
    register_module_nodes(slicer.mrmlScene)
    try:  # inside the Slicer application the real pieces exist: use them
        import slicer.ScriptedLoadableModule  # noqa: F401
        return slicer
    except ImportError:
        pass
    pieces = {
        "slicer.ScriptedLoadableModule": _module(
            "slicer.ScriptedLoadableModule", ScriptedLoadableModule=ScriptedLoadableModule,
            ScriptedLoadableModuleWidget=ScriptedLoadableModuleWidget,
            ScriptedLoadableModuleLogic=ScriptedLoadableModuleLogic,
            ScriptedLoadableModuleTest=ScriptedLoadableModuleTest),
        "slicer.parameterNodeWrapper": _module(
            "slicer.parameterNodeWrapper", parameterNodeWrapper=parameterNodeWrapper, Choice=Choice,
            WithinRange=WithinRange, Default=Default, Decimals=Decimals, SingleStep=SingleStep,
            SlicerParameterNamePropertyName=SlicerParameterNamePropertyName),
        "slicer.i18n": _module("slicer.i18n", tr=lambda text: text, translate=lambda context, text: text),
    }
    for name, module in pieces.items():
        sys.modules[name] = module
        setattr(slicer, name.split(".", 1)[1], module)
    try:
        import qt  # noqa: F401
    except ImportError:
        sys.modules["qt"] = _module("qt", QTimer=QTimer, QWidget=StandInWidget,
                                    QSocketNotifier=QSocketNotifier)
    slicer.util.loadUI, slicer.util.childWidgetVariables = loadUI, childWidgetVariables
    if not isinstance(getattr(slicer, "app", None), StandaloneApplication):
        slicer.app = StandaloneApplication()
    if not hasattr(slicer, "modules"):
        slicer.modules = types.SimpleNamespace()
    return slicer
