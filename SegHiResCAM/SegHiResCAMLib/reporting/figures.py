"""Figures and reports of heatmaps: three orthogonal slices, the scan in grey, the heatmap in a perceptual colour
map with a colour bar and transparent low values; a Markdown report (matplotlib is needed for figures only).
"""

from typing import Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..geometry import Geometry
from ..imaging.files import atomic_write, from_sitk, to_sitk


def _to_lps(array: np.ndarray, geometry: Geometry) -> Tuple[np.ndarray, Tuple[float, ...]]:
    """Reorient (permute/flip, no interpolation) so that array axes are (S, P, L) growth = numpy (z, y, x) of LPS."""
    image = sitk.DICOMOrient(to_sitk(array, geometry), "LPS")
    out, geom = from_sitk(image)
    return out, geom.spacing


def slice_centre(mask: Optional[np.ndarray], heat: np.ndarray) -> Tuple[int, ...]:
    """Centre of mass of the target mask (or of the heatmap when no mask is given), rounded to a voxel."""
    weights = mask.astype(float) if mask is not None and mask.any() else np.clip(heat, 0, None)
    if weights.sum() == 0:
        return tuple(s // 2 for s in heat.shape)
    grids = np.indices(heat.shape)
    return tuple(int(round(float((g * weights).sum() / weights.sum()))) for g in grids)


def heatmap_figure(path: str, image: np.ndarray, heat: np.ndarray, geometry: Geometry, title: str,
                   mask: Optional[np.ndarray] = None, threshold: float = 0.1, cmap: str = "inferno") -> str:
    """Write a PNG with axial, coronal and sagittal slices through the target.

    Args:
        path: the PNG to write.
        image: the scan on ``geometry`` (numpy order).
        heat: the heatmap on the same grid, values in [0, 1].
        geometry: the grid (any orientation; shown in radiological convention).
        title: figure title.
        mask: the target region (its outline is drawn, and the slices go through its centre of mass).
        threshold: heat values below this are transparent.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if image.shape != heat.shape or image.shape != geometry.array_shape or geometry.ndim != 3:
        raise InputError("figure needs a 3D image and heatmap on the same grid")
    img, spacing = _to_lps(image.astype(np.float32), geometry)
    hm, _ = _to_lps(heat.astype(np.float32), geometry)
    mk = _to_lps(mask.astype(np.uint8), geometry)[0] if mask is not None else None
    z, y, x = slice_centre(mk, hm)
    sx, sy, sz = spacing
    lo, hi = np.percentile(img, [1, 99.5])
    views = [
        ("axial", img[z], hm[z], None if mk is None else mk[z], sy / sx, False),
        ("coronal", img[:, y, :], hm[:, y, :], None if mk is None else mk[:, y, :], sz / sx, True),
        ("sagittal", img[:, :, x], hm[:, :, x], None if mk is None else mk[:, :, x], sz / sy, True),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.6), facecolor="black")
    shown = None
    for ax, (name, scan, h, m, aspect, flip) in zip(axes, views):
        origin = "lower" if flip else "upper"
        ax.imshow(scan, cmap="gray", vmin=lo, vmax=hi, aspect=aspect, origin=origin, interpolation="nearest")
        shown = ax.imshow(np.ma.masked_less(h, threshold), cmap=cmap, vmin=0.0, vmax=1.0, alpha=0.75,
                          aspect=aspect, origin=origin, interpolation="nearest")
        if m is not None and m.any():
            ax.contour(m.astype(float), levels=[0.5], colors=["#00e5ff"], linewidths=0.8, origin=origin)
        ax.set_title(name, color="white", fontsize=10)
        ax.axis("off")
    cbar = fig.colorbar(shown, ax=list(axes), fraction=0.025, pad=0.02)
    cbar.ax.yaxis.set_tick_params(color="white")
    cbar.outline.set_edgecolor("white")
    plt.setp(cbar.ax.get_yticklabels(), color="white")
    cbar.set_label("heat (values < %.2f transparent)" % threshold, color="white")
    fig.suptitle(title, color="white", fontsize=11)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, facecolor="black", format="png"))
    finally:
        plt.close(fig)
    return path


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two binary masks (1.0 when both are empty)."""
    a, b = np.asarray(a) != 0, np.asarray(b) != 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def energy_ratio(heat: np.ndarray, mask: np.ndarray) -> float:
    """Mean heat inside the mask divided by the mean heat outside (inf when outside is 0)."""
    inside = heat[mask != 0]
    outside = heat[mask == 0]
    if inside.size == 0 or outside.size == 0:
        return float("nan")
    mean_out = float(outside.mean())
    return float("inf") if mean_out == 0 else float(inside.mean()) / mean_out


def markdown_report(path: str, title: str, summary: Dict[str, object], rows: List[Dict[str, object]],
                    provenance: Dict[str, object], ratio_label: str = "mean heat inside / outside the mask") -> str:
    """Write a short Markdown report: summary, one table row per heatmap (with its figure), provenance."""
    lines = ["# %s" % title, ""]
    for key, value in summary.items():
        lines.append("- **%s**: %s" % (key, value))
    lines += ["", "| method | layer | %s | figure |" % ratio_label, "|---|---|---|---|"]
    for row in rows:
        lines.append("| %s | %s | %.2f | ![](%s) |" % (row["method"], row["layer"], row["ratio"], row["figure"]))
    warnings = ["- %s / %s: %s" % (row["method"], row["layer"], w) for row in rows for w in row.get("warnings", [])]
    if warnings:
        lines += ["", "Warnings:", ""] + warnings
    lines += ["", "## Provenance", "", "```"]
    for key, value in provenance.items():
        lines.append("%s: %s" % (key, value))
    lines += ["```", ""]
    def write(tmp):
        with open(tmp, "w") as handle:
            handle.write("\n".join(lines))
    atomic_write(path, write)
    return path
