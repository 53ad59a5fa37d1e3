"""Overlap and heat measures on the image grid: :func:`dice` of two masks, :func:`energy_ratio` of a heatmap."""

import numpy as np


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two binary masks (non-zero = inside; 1.0 when both are empty)."""
    a, b = np.asarray(a) != 0, np.asarray(b) != 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def energy_ratio(heat: np.ndarray, mask: np.ndarray) -> float:
    """Mean heat inside the mask divided by the mean heat outside (inf when outside is 0, NaN when a side is
    empty)."""
    inside = heat[mask != 0]
    outside = heat[mask == 0]
    if inside.size == 0 or outside.size == 0:
        return float("nan")
    mean_out = float(outside.mean())
    return float("inf") if mean_out == 0 else float(inside.mean()) / mean_out
