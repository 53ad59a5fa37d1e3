"""SegHiResCAM: class-activation heatmaps that explain medical segmentation models, in 2D and 3D.

The package never imports Slicer or Qt. Layers, from the bottom up (imports only go this way):

- :mod:`SegHiResCAMLib.engine`: the CAM methods, targets, layer capture (torch + numpy only);
- :mod:`SegHiResCAMLib.models`: loading models and what they expect of their input;
- :mod:`SegHiResCAMLib.imaging.files` / ``mrml``: image files / Slicer nodes <-> arrays with their geometry;
- :mod:`SegHiResCAMLib.cli.main`: the ``seghirescam`` command line.
"""

__version__ = "0.1.0"

from .errors import SegHiResCAMError  # noqa: F401
