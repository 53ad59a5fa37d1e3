"""Where the voxels of an image are in physical space.

A :class:`Geometry` is the plain-data description of an image grid that every layer of SegHiResCAM passes around
next to its arrays: size, spacing, origin and direction, in the conventions of ITK / SimpleITK:

* ``size`` and ``spacing`` are in ITK index order ``(x, y, z)`` (``(x, y)`` in 2D); the numpy array of the same
  image has the reversed shape ``(z, y, x)`` (see :attr:`Geometry.array_shape`).
* ``origin`` is the physical position of the centre of voxel ``(0, 0, 0)`` in millimetres, in the patient
  coordinate system **LPS** (x grows to the patient's Left, y to Posterior, z to Superior), as DICOM and ITK use.
* ``direction`` is the row-major ``N x N`` matrix whose *columns* are the physical directions of the index axes
  (exactly what ``sitk.Image.GetDirection()`` returns).

3D Slicer works in **RAS** (Right, Anterior, Superior): the first two physical axes are negated. Slicer's
``IJKToRAS`` matrix of a volume node is therefore :meth:`Geometry.ijk_to_ras`, and
:meth:`Geometry.from_ijk_to_ras` goes back.

This module imports numpy and the standard library only.
"""

import math
from dataclasses import dataclass
from typing import Any, Dict, Sequence, Tuple

import numpy as np

from .errors import InputError

# Below this |det(direction)| the direction matrix is taken as singular (a real one has |det| = 1).
_MIN_ABS_DET = 1e-6


def _lps_ras_flip(n: int) -> np.ndarray:
    """Return the ``(n+1) x (n+1)`` homogeneous matrix that negates the first two physical axes (LPS <-> RAS)."""
    flip = np.eye(n + 1)
    for axis in range(min(2, n)):
        flip[axis, axis] = -1.0
    return flip


@dataclass(frozen=True)
class Geometry:
    """The physical grid of an N-dimensional image (ITK conventions, LPS).

    Args:
        size: number of voxels along each index axis, ITK order ``(x, y, z)``.
        spacing: voxel size in mm along each index axis, ITK order; every entry > 0.
        origin: LPS position in mm of the centre of voxel ``(0, ..., 0)``.
        direction: row-major ``N x N`` direction cosines (columns = index axes in LPS), invertible.

    Values are normalised on construction to tuples of Python ``int`` / ``float`` so that instances compare,
    hash and serialise predictably. Bad values raise :class:`~SegHiResCAMLib.errors.InputError`.

    Example:
        >>> g = Geometry.identity((4, 3, 2))
        >>> g.size, g.array_shape
        ((2, 3, 4), (4, 3, 2))
    """

    size: Tuple[int, ...]
    spacing: Tuple[float, ...]
    origin: Tuple[float, ...]
    direction: Tuple[float, ...]

    def __post_init__(self) -> None:
        size = _as_tuple(self.size, "size")
        n = len(size)
        if n < 1:
            raise InputError("Geometry size is empty; give one voxel count per image axis, e.g. (x, y, z).")
        if not all(float(s).is_integer() and s >= 1 for s in size):
            raise InputError(f"Geometry size {size} is invalid; every entry must be a whole number >= 1.")
        size = tuple(int(s) for s in size)
        spacing = tuple(float(s) for s in _as_tuple(self.spacing, "spacing"))
        origin = tuple(float(s) for s in _as_tuple(self.origin, "origin"))
        direction = tuple(float(s) for s in _as_tuple(self.direction, "direction"))
        if len(spacing) != n or len(origin) != n:
            raise InputError(
                f"Geometry has size {size} ({n} axes) but spacing {spacing} and origin {origin}; "
                f"give {n} values for each."
            )
        if len(direction) != n * n:
            raise InputError(
                f"Geometry direction has {len(direction)} values; a {n}D image needs {n * n} "
                "(row-major direction cosines, as SimpleITK GetDirection() returns)."
            )
        if not all(math.isfinite(s) and s > 0 for s in spacing):
            raise InputError(f"Geometry spacing {spacing} is invalid; every entry must be a finite number > 0 mm.")
        if not all(math.isfinite(v) for v in origin + direction):
            raise InputError(f"Geometry origin {origin} / direction {direction} contain NaN or infinity.")
        det = float(np.linalg.det(np.asarray(direction).reshape(n, n)))
        if abs(det) < _MIN_ABS_DET:
            raise InputError(
                f"Geometry direction {direction} is not invertible (determinant {det:.3g}); "
                "its columns must be independent axis directions (normally orthonormal)."
            )
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)

    # ------------------------------------------------------------------ basic properties
    @property
    def ndim(self) -> int:
        """Number of spatial axes (2 or 3 in practice)."""
        return len(self.size)

    @property
    def array_shape(self) -> Tuple[int, ...]:
        """Shape of the numpy array of this image: ``size`` reversed, e.g. ``(z, y, x)``."""
        return tuple(reversed(self.size))

    @property
    def direction_matrix(self) -> np.ndarray:
        """The direction as an ``N x N`` float64 array (columns = index axes in LPS)."""
        return np.asarray(self.direction, dtype=np.float64).reshape(self.ndim, self.ndim)

    def same_grid(self, other: "Geometry", atol: float = 1e-5) -> bool:
        """Tell whether ``other`` describes the same voxel grid.

        Args:
            other: the geometry to compare with.
            atol: absolute tolerance for spacing (mm), origin (mm) and direction cosines.

        Returns:
            True when the sizes are equal and spacing, origin and direction agree within ``atol``.
        """
        if not isinstance(other, Geometry) or self.size != other.size:
            return False
        return all(
            np.allclose(a, b, rtol=0.0, atol=atol)
            for a, b in (
                (self.spacing, other.spacing),
                (self.origin, other.origin),
                (self.direction, other.direction),
            )
        )

    # ------------------------------------------------------------------ matrices
    def ijk_to_lps(self) -> np.ndarray:
        """Return the homogeneous ``(N+1) x (N+1)`` matrix mapping a voxel index ``(x, y, z, 1)`` to LPS mm.

        Returns:
            float64 array ``M`` with ``M[:N, :N] = direction @ diag(spacing)`` and ``M[:N, N] = origin``.
        """
        n = self.ndim
        matrix = np.eye(n + 1)
        matrix[:n, :n] = self.direction_matrix * np.asarray(self.spacing)[None, :]
        matrix[:n, n] = self.origin
        return matrix

    def ijk_to_ras(self) -> np.ndarray:
        """Return the homogeneous index -> RAS matrix, i.e. what Slicer's volume ``IJKToRAS`` must equal.

        Returns:
            float64 ``(N+1) x (N+1)`` array: :meth:`ijk_to_lps` with its first two rows negated.
        """
        return _lps_ras_flip(self.ndim) @ self.ijk_to_lps()

    @classmethod
    def from_ijk_to_ras(cls, matrix: Any, size: Sequence[int]) -> "Geometry":
        """Build a geometry from a homogeneous index -> RAS matrix (the inverse of :meth:`ijk_to_ras`).

        Args:
            matrix: ``(N+1) x (N+1)`` array-like (e.g. Slicer's 4x4 ``IJKToRAS`` as numpy); the last row must be
                ``(0, ..., 0, 1)``.
            size: voxel counts in ITK order ``(x, y, z)``, e.g. ``imageData.GetDimensions()`` in Slicer.

        Returns:
            The geometry; spacing is the length of each matrix column, direction the normalised columns.
        """
        m = np.asarray(matrix, dtype=np.float64)
        size = tuple(size)
        n = len(size)
        if m.shape != (n + 1, n + 1):
            raise InputError(
                f"IJK-to-RAS matrix has shape {m.shape}; for an image of size {size} it must be {(n + 1, n + 1)}."
            )
        if not np.allclose(m[n], np.eye(n + 1)[n], atol=1e-9):
            raise InputError(f"IJK-to-RAS matrix last row {m[n].tolist()} is not (0, ..., 0, 1); not an affine map.")
        lps = _lps_ras_flip(n) @ m
        linear = lps[:n, :n]
        spacing = np.linalg.norm(linear, axis=0)
        if not np.all(spacing > 0):
            raise InputError(f"IJK-to-RAS matrix {m.tolist()} has a zero column; every axis needs a spacing > 0.")
        direction = linear / spacing[None, :]
        return cls(
            size=size,
            spacing=tuple(spacing.tolist()),
            origin=tuple(lps[:n, n].tolist()),
            direction=tuple(direction.ravel().tolist()),
        )

    # ------------------------------------------------------------------ plain data
    def to_dict(self) -> Dict[str, list]:
        """Return a JSON-friendly dict (lists of int / float) that :meth:`from_dict` turns back into an equal object."""
        return {
            "size": list(self.size),
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": list(self.direction),
        }

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Geometry":
        """Build a geometry from the output of :meth:`to_dict` (keys ``size``, ``spacing``, ``origin``, ``direction``).

        Args:
            d: the mapping; extra keys are ignored.

        Returns:
            The geometry.
        """
        if not isinstance(d, dict):
            raise InputError(
                f"Geometry data must be a dict with size/spacing/origin/direction, got {type(d).__name__}."
            )
        missing = [k for k in ("size", "spacing", "origin", "direction") if k not in d]
        if missing:
            raise InputError(f"Geometry data lacks {missing}; it needs size, spacing, origin and direction.")
        return cls(size=d["size"], spacing=d["spacing"], origin=d["origin"], direction=d["direction"])

    @classmethod
    def identity(cls, array_shape: Sequence[int]) -> "Geometry":
        """Return the geometry of an array with unit spacing, zero origin and identity direction.

        Args:
            array_shape: numpy shape of the image, e.g. ``(z, y, x)`` (components must not be included).

        Returns:
            A geometry with ``size = reversed(array_shape)``.
        """
        shape = tuple(array_shape)
        n = len(shape)
        return cls(
            size=tuple(reversed(shape)),
            spacing=(1.0,) * n,
            origin=(0.0,) * n,
            direction=tuple(np.eye(n).ravel().tolist()),
        )


def _as_tuple(value: Any, name: str) -> tuple:
    """Turn a sequence / numpy array into a flat tuple, or raise an InputError naming the field."""
    try:
        arr = np.asarray(value)
        if arr.dtype.kind not in "iuf":
            raise TypeError(arr.dtype)
        return tuple(arr.ravel().tolist())
    except (TypeError, ValueError) as exc:
        raise InputError(f"Geometry {name} {value!r} is not a sequence of numbers.") from exc
