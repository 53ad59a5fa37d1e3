"""Connected components of a mask with SimpleITK (C++): the fast labeller of the analysis layer.

Labels follow :func:`SegHiResCAMLib.engine.regions.connected_components` exactly (full connectivity: 8 in 2D, 26
in 3D; labels 1..n in C order of each component's first voxel, background 0), which the engine computes in pure
torch by label propagation: that needs as many passes as the longest path through a component (tens of seconds
for a thin shell around a brain), where SimpleITK needs one scan.

This module never imports slicer, qt, vtk or torch.
"""

import numpy as np
import SimpleITK as sitk


def label_components(mask: np.ndarray) -> np.ndarray:
    """Label the connected components of a boolean 2-D or 3-D mask (``int64``; see the module docstring)."""
    fg = np.asarray(mask) != 0
    if fg.ndim not in (2, 3):
        raise ValueError("label_components needs a 2-D or 3-D mask, got %d-D" % fg.ndim)
    if not fg.any():
        return np.zeros(fg.shape, np.int64)
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(fg.astype(np.uint8)), True))
    flat = labels.ravel()
    values, first = np.unique(flat, return_index=True)  # value 0 (background) comes first
    order = np.argsort(first[values != 0], kind="stable")  # by first voxel in C order
    remap = np.zeros(int(values.max()) + 1, np.int64)
    remap[values[values != 0][order]] = np.arange(1, len(order) + 1)
    return remap[labels]
