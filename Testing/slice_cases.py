"""The small anisotropic 3D case the slice-model tests share: a 8 x 10 x 6 grid (numpy (6, 10, 8)), its slices'
2D grids, and a seeded random image on it."""

import numpy as np

from SegHiResCAMLib.geometry import Geometry

SIZE = (8, 10, 6)  # x, y, z: the numpy array is (6, 10, 8)
SPACING = (1.0, 1.5, 2.0)
ORIGIN = (3.0, -2.0, 7.5)


def plane(axis):
    """The 2D grid of a slice perpendicular to numpy axis ``axis`` (in-plane spacing, ITK order)."""
    rest = [a for a in range(3) if a != axis]
    shape = tuple(SIZE[::-1][a] for a in rest)
    return Geometry(size=shape[::-1], spacing=tuple(SPACING[2 - a] for a in rest[::-1]), origin=(0, 0),
                    direction=(1, 0, 0, 1))


def random_image():
    """The seeded float32 image on the ``SIZE`` grid (numpy order)."""
    return np.random.RandomState(3).randn(*SIZE[::-1]).astype(np.float32)
