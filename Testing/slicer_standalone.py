"""Stand-ins for the Qt-only parts of 3D Slicer, so that ``import SegHiResCAM`` works under plain pytest.

The PyPI package ``slicer-core`` gives the real MRML scene, nodes, segmentation logic and ``slicer.util`` array
helpers, but not what needs Qt: the ``ScriptedLoadableModule`` base classes, ``slicer.parameterNodeWrapper``
(its GUI connectors import ``qt``), ``slicer.app``, ``slicer.modules`` and ``slicer.i18n``. :func:`setup` puts
small stand-ins for exactly those into the ``slicer`` package; everything else (MRML, torch, numpy, SimpleITK)
is real. Inside the Slicer application :func:`setup` changes nothing but ``sys.path``.

Only the subset of ``parameterNodeWrapper`` that the module uses is here: typed parameters (``bool``, ``int``,
``float``, ``str``, ``pathlib.Path``, MRML node classes) stored in the scripted module node as Slicer stores them,
defaults, and the ``Choice`` / ``WithinRange`` / ``Default`` annotations, checked on assignment.
"""

import logging
import os
import pathlib
import sys
import types
import typing
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
MODULE_DIR = os.path.join(os.path.dirname(HERE), "SegHiResCAM")


# ---------------------------------------------------------------------------------------------- parameterNodeWrapper
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


def _is_node_type(datatype):
    import slicer
    return isinstance(datatype, type) and issubclass(datatype, slicer.vtkMRMLNode)


class _Parameter:
    """One typed parameter stored in a vtkMRMLScriptedModuleNode (strings, or a node reference)."""

    def __init__(self, name, annotation, default):
        self.name = name
        self.type, self.extras = annotation, ()
        if typing.get_origin(annotation) is typing.Annotated:
            self.type, *extras = typing.get_args(annotation)
            self.extras = tuple(extras)
        for extra in self.extras:
            if isinstance(extra, Default):
                default = extra.value
        if default is _MISSING:
            default = None if _is_node_type(self.type) else {bool: False, int: 0, float: 0.0, str: "",
                                                              pathlib.Path: pathlib.Path()}[self.type]
        self.default = default

    def validate(self, value):
        if _is_node_type(self.type):
            if value is not None and not isinstance(value, self.type):
                raise ValueError("%s must be a %s, got %r" % (self.name, self.type.__name__, value))
            return value
        value = self.type(value)
        for extra in self.extras:
            if hasattr(extra, "validate"):
                extra.validate(value)
        return value

    def read(self, node):
        if _is_node_type(self.type):
            return node.GetNodeReference(self.name)
        text = node.GetParameter(self.name)
        if self.type is bool:
            return text == "True"
        return self.type(text)

    def write(self, node, value):
        value = self.validate(value)
        if _is_node_type(self.type):
            node.SetNodeReferenceID(self.name, value.GetID() if value is not None else None)
        else:
            node.SetParameter(self.name, str(value))


_MISSING = object()


def parameterNodeWrapper(cls):
    """Typed properties over a ``vtkMRMLScriptedModuleNode``, as ``slicer.parameterNodeWrapper`` makes them."""
    hints = typing.get_type_hints(cls, include_extras=True)
    parameters = {name: _Parameter(name, hint, cls.__dict__.get(name, _MISSING)) for name, hint in hints.items()}

    def __init__(self, parameterNode):
        self.parameterNode = parameterNode
        for parameter in parameters.values():  # Slicer writes the defaults of parameters not yet in the node
            missing = (parameterNode.GetNodeReferenceID(parameter.name) is None if _is_node_type(parameter.type)
                       else not parameterNode.GetParameter(parameter.name))
            if missing and parameter.default is not None:
                parameter.write(parameterNode, parameter.default)

    def make_property(parameter):
        return property(lambda self: parameter.read(self.parameterNode),
                        lambda self, value: parameter.write(self.parameterNode, value))

    namespace = {"__init__": __init__, "allParameters": parameters, "__doc__": cls.__doc__,
                 "__module__": cls.__module__, "__qualname__": cls.__qualname__}
    namespace.update({name: make_property(p) for name, p in parameters.items()})
    for name, value in cls.__dict__.items():  # methods defined on the wrapped class
        if callable(value) and name not in namespace and not name.startswith("__"):
            namespace[name] = value

    def connectGui(self, widget):
        raise NotImplementedError("connectGui needs Qt: it works in the Slicer application only")

    namespace["connectGui"] = connectGui
    namespace["disconnectGui"] = lambda self, tag: None
    return type(cls.__name__, (), namespace)


# ---------------------------------------------------------------------------------------------- ScriptedLoadableModule
class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent
        self.moduleName = self.__class__.__name__
        parent.title = self.moduleName
        parent.categories, parent.dependencies, parent.contributors = [], [], []
        parent.helpText = parent.acknowledgementText = ""

    def getDefaultModuleDocumentationLink(self, docPage=None):
        return ""


class ScriptedLoadableModuleWidget:
    def __init__(self, parent=None):
        raise NotImplementedError("module panels need Qt: they work in the Slicer application only")


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
class StandaloneApplication:
    """The few members of ``slicer.app`` that module code may ask for outside the application."""

    applicationName = "slicer-core (no application)"

    def testingEnabled(self):
        return True

    def processEvents(self):
        pass

    def layoutManager(self):
        return None


def _module(name, **members):
    module = types.ModuleType(name)
    module.__dict__.update(members)
    return module


def setup(new_scene: bool = False):
    """Make ``import SegHiResCAM`` work on a real slicer-core MRML scene; return the ``slicer`` package.

    Idempotent. ``new_scene`` replaces ``slicer.mrmlScene`` by a fresh scene.
    """
    import slicer

    if MODULE_DIR not in sys.path:
        sys.path.insert(0, MODULE_DIR)
    if new_scene or getattr(slicer, "mrmlScene", None) is None:
        slicer.mrmlScene = slicer.vtkMRMLScene()
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
            WithinRange=WithinRange, Default=Default),
        "slicer.i18n": _module("slicer.i18n", tr=lambda text: text, translate=lambda context, text: text),
    }
    for name, module in pieces.items():
        sys.modules[name] = module
        setattr(slicer, name.split(".", 1)[1], module)
    if not hasattr(slicer, "app"):
        slicer.app = StandaloneApplication()
    if not hasattr(slicer, "modules"):
        slicer.modules = types.SimpleNamespace()
    return slicer
