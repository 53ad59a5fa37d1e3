"""SegHiResCAM: class-activation heatmaps that explain medical segmentation models, in 2D and 3D.

Layers, from the bottom up; a module imports its own package and the layers below it only, which
``Testing/unit/test_architecture.py`` checks:

- :mod:`~SegHiResCAMLib.errors`, :mod:`~SegHiResCAMLib.geometry`, :mod:`~SegHiResCAMLib.catalog`: the error family,
  image grids, and the torch-free names of methods and options;
- :mod:`SegHiResCAMLib.engine`: CAM methods, targets, layer capture, sliding windows, faithfulness checks, ProtoSeg
  (torch, numpy and the standard library only);
- :mod:`SegHiResCAMLib.models`: loading models (an explicit table of model kinds) and what they expect of their input;
- :mod:`SegHiResCAMLib.imaging`: image files and DICOM <-> arrays with their geometry, resampling, the model-space
  round trip, sample data;
- :mod:`SegHiResCAMLib.analysis`: functions that return data (explain, evaluate, segmentation ability);
- :mod:`SegHiResCAMLib.reporting` (figures, tables, writers, the demo) and :mod:`SegHiResCAMLib.slicer_logic` (the
  Slicer module's headless logic, which imports ``slicer`` and ``vtk`` and runs only inside Slicer or on a
  ``slicer-core`` scene); neither imports the other;
- :mod:`SegHiResCAMLib.cli`: the ``seghirescam`` command line.

Nothing outside :mod:`SegHiResCAMLib.slicer_logic` imports Slicer, Qt or VTK (and ``slicer_logic`` itself uses no
Qt), so the package, the engine, the models and the command line import without Slicer.
"""

__version__ = "0.1.0"

from .errors import SegHiResCAMError  # noqa: F401
