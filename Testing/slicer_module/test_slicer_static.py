"""Static checks of the Slicer extension: CMake file lists, the .ui bindings, the ExtensionsIndex entry, icons.

A file that the module's CMakeLists.txt does not list is not installed with the extension, and a
``SlicerParameterName`` that names no parameter fails only when the panel opens in Slicer: both are caught here.
"""

import json
import os
import re
import struct
import xml.etree.ElementTree as ET

import pytest

import slicer_standalone

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODULE = os.path.join(ROOT, "SegHiResCAM")
LIB = os.path.join(MODULE, "SegHiResCAMLib")
UI = os.path.join(MODULE, "Resources", "UI", "SegHiResCAM.ui")
#: the only files of the package that may import Slicer, VTK or Qt (imports go one way: Testing/unit/test_architecture.py)
#: the Slicer side of the package (only it imports slicer/vtk: Testing/unit/test_architecture.py checks that)
SLICER_SIDE = os.path.join(LIB, "slicer_logic")
#: widget class -> the parameter types its parameterNodeWrapper connector accepts
CONNECTORS = {"QCheckBox": {"bool"}, "QSpinBox": {"int"}, "QDoubleSpinBox": {"float"}, "QComboBox": {"str"},
              "ctkPathLineEdit": {"Path"}, "qMRMLNodeComboBox": {"node"}}


def read(*parts):
    with open(os.path.join(ROOT, *parts), encoding="utf-8") as handle:
        return handle.read()


def cmake_set(text, name):
    """The items of ``set(NAME item ...)`` in a CMake file (comments removed)."""
    text = re.sub(r"#[^\n]*", "", text)
    match = re.search(r"set\(\s*%s\b(.*?)\)" % re.escape(name), text, re.S)
    assert match, "set(%s ...) not found" % name
    return match.group(1).split()


def cmake_value(text, name):
    match = re.search(r'set\(\s*%s\s+"([^"]*)"\s*\)' % re.escape(name), text)
    return match.group(1) if match else None


def png_size(path):
    with open(path, "rb") as handle:
        head = handle.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "%s is not a PNG" % path
    return struct.unpack(">II", head[16:24])


def module_files():
    """Every file that must be installed: the module script, the package's .py files, the module's resources."""
    found = {"SegHiResCAM.py"}
    for folder in (LIB, os.path.join(MODULE, "Resources")):
        for parent, dirs, files in os.walk(folder):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in files:
                if folder == LIB and not name.endswith(".py"):
                    continue
                found.add(os.path.relpath(os.path.join(parent, name), MODULE).replace(os.sep, "/"))
    return found


def test_module_cmake_lists_every_file_and_only_existing_ones():
    text = read("SegHiResCAM", "CMakeLists.txt")
    name = re.search(r"set\(MODULE_NAME (\w+)\)", text).group(1)
    listed = [item.replace("${MODULE_NAME}", name)
              for item in cmake_set(text, "MODULE_PYTHON_SCRIPTS") + cmake_set(text, "MODULE_PYTHON_RESOURCES")]
    assert len(listed) == len(set(listed)), "a file is listed twice"
    missing = sorted(p for p in listed if not os.path.isfile(os.path.join(MODULE, p)))
    assert not missing, "CMakeLists.txt lists files that do not exist: %s" % missing
    unlisted = sorted(module_files() - set(listed))
    assert not unlisted, "add these files to SegHiResCAM/CMakeLists.txt (else they are not installed): %s" % unlisted
    assert "slicerMacroBuildScriptedModule(" in text and "add_subdirectory(Testing)" in text


def test_self_test_is_registered_once():
    module = read("SegHiResCAM", "CMakeLists.txt")
    assert "add_subdirectory(Python)" in read("SegHiResCAM", "Testing", "CMakeLists.txt")
    python = re.sub(r"#[^\n]*", "", read("SegHiResCAM", "Testing", "Python", "CMakeLists.txt"))
    scripts = re.findall(r"slicer_add_python_unittest\(\s*SCRIPT\s+(\S+?)\s*\)", python)
    assert len(scripts) == 1
    script = scripts[0].replace("${CMAKE_CURRENT_SOURCE_DIR}", os.path.join(MODULE, "Testing", "Python"))
    script = script.replace("${MODULE_NAME}", "SegHiResCAM")
    assert os.path.samefile(script, os.path.join(MODULE, "SegHiResCAM.py"))
    assert "slicer_add_python_unittest" not in re.sub(r"#[^\n]*", "", module)


def test_extension_metadata_is_complete():
    text = read("CMakeLists.txt")
    assert re.search(r"project\(SegHiResCAM\)", text) and "add_subdirectory(SegHiResCAM)" in text
    for key in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert cmake_value(text, "EXTENSION_" + key), "EXTENSION_%s is empty" % key
    assert "PyTorch" in cmake_value(text, "EXTENSION_DEPENDS").split()
    for key in ("ICONURL", "SCREENSHOTURLS"):  # the URLs point at files of this repository's main branch
        for url in cmake_value(text, "EXTENSION_" + key).split():
            path = url.split("/main/", 1)[1]
            assert os.path.isfile(os.path.join(ROOT, path)), "%s points at a missing file %s" % (key, path)
            width, height = png_size(os.path.join(ROOT, path))
            assert (width, height) == (128, 128) if key == "ICONURL" else width >= 600


def test_extensions_index_entry():
    """Resources/SegHiResCAM.json follows the ExtensionsIndex schema v1.0.2 and agrees with CMakeLists.txt."""
    entry = json.loads(read("Resources", "SegHiResCAM.json"))
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
               "dicom_support_rule", "build_subdirectory", "enabled", "tier"}
    assert {"$schema", "category", "scm_url"} <= set(entry) <= allowed
    assert "slicer-extension-catalog-entry-schema-v1.0.2.json" in entry["$schema"]
    cmake = read("CMakeLists.txt")
    assert entry["category"] == cmake_value(cmake, "EXTENSION_CATEGORY")
    assert entry["build_dependencies"] == cmake_value(cmake, "EXTENSION_DEPENDS").split()
    assert entry["scm_type"] == "git" and entry["scm_url"].endswith(".git")
    assert entry["scm_url"][:-4].rstrip("/") == cmake_value(cmake, "EXTENSION_HOMEPAGE").rstrip("/")
    assert isinstance(entry["tier"], int) and 1 <= entry["tier"] <= 5


def test_icons_are_128_pixels():
    for path in (("Resources", "Icons", "SegHiResCAM.png"), ("SegHiResCAM", "Resources", "Icons", "SegHiResCAM.png")):
        assert png_size(os.path.join(ROOT, *path)) == (128, 128)


@pytest.fixture(scope="module")
def parameters():
    slicer_standalone.setup()
    import SegHiResCAM
    return SegHiResCAM.SegHiResCAMParameterNode.allParameters


def _kind(parameter):
    import slicer
    t = parameter.type
    if isinstance(t, type) and issubclass(t, slicer.vtkMRMLNode):
        return "node"
    return t.__name__


def test_ui_binds_existing_parameters_with_fitting_widgets(parameters):
    root = ET.parse(UI).getroot()
    bound = {}
    for widget in root.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = widget
    unknown = sorted(set(bound) - set(parameters))
    assert not unknown, "SlicerParameterName names no parameter: %s" % unknown
    for name, widget in bound.items():
        assert _kind(parameters[name]) in CONNECTORS[widget.get("class")], (name, widget.get("class"))
        if widget.get("class") == "qMRMLNodeComboBox":
            types = [s.text for p in widget.findall("property") if p.get("name") == "nodeTypes" for s in p.iter("string")]
            assert types == [parameters[name].type.__name__], (name, types)
    # the parameters without a connector are synchronised by hand in the widget
    assert set(parameters) - set(bound) == {"segmentationNode", "segmentId", "layer", "modelPath", "modelCardPath",
                                             "cohortFolder", "cohortCase", "weightsPaths", "folds"}


def test_widget_code_uses_only_widgets_of_the_ui():
    names = {w.get("name") for w in ET.parse(UI).getroot().iter("widget")}
    used = set(re.findall(r"self\.ui\.(\w+)", read("SegHiResCAM", "SegHiResCAM.py")))
    assert used and not used - names, sorted(used - names)
    from SegHiResCAMLib.slicer_logic import channel_panel  # the panel's model card and channel widgets
    used = set(re.findall(r"\bui\.(\w+)", read("SegHiResCAM", "SegHiResCAMLib", "slicer_logic", "channel_panel.py")))
    assert used and not (used | set(channel_panel.CHANNEL_LABELS)) - names
    # the panel's other hand-bound widgets
    for module in ("input_panel.py", "cohort_panel.py", "ensemble_panel.py"):
        used = set(re.findall(r"\bui\.(\w+)", read("SegHiResCAM", "SegHiResCAMLib", "slicer_logic", module)))
        assert used and not used - names, (module, sorted(used - names))
    connections = ET.parse(UI).getroot().find("connections")
    scene_receivers = {c.find("receiver").text for c in connections if c.find("slot").text.startswith("setMRMLScene")}
    top = ET.parse(UI).getroot().find("widget")  # the panel itself emits mrmlSceneChanged
    mrml_widgets = {w.get("name") for w in top.iter("widget")
                    if w is not top and w.get("class").startswith(("qMRML", "qSlicerMarkups"))}
    assert mrml_widgets <= scene_receivers, "widgets that never get the scene: %s" % sorted(mrml_widgets - scene_receivers)


def test_module_file_stays_thin():
    assert len(read("SegHiResCAM", "SegHiResCAM.py").splitlines()) <= 400


def test_slicer_side_logic_has_no_qt_and_no_dialogs():
    """The logic is headless (console, scripts, tests): no Qt import, no message boxes."""
    qt = re.compile(r"^\s*(import|from)\s+(qt|ctk)\b", re.M)
    dialogs = re.compile(r"\b(errorDisplay|warningDisplay|infoDisplay|confirm\w*Display|messageBox|delayDisplay)\(")
    for name in sorted(set(os.listdir(SLICER_SIDE)) - {"selftest.py", "__pycache__"}):
        source = open(os.path.join(SLICER_SIDE, name), encoding="utf-8").read()
        assert not qt.search(source) and not dialogs.search(source), name
