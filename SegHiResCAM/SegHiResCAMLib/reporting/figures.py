"""Every figure of the package (matplotlib, imported only when a figure is drawn), written atomically as PNG.

- :func:`heatmap_figure`: three orthogonal slices, the scan in grey, the heatmap in a perceptual colour map with
  a colour bar and transparent low values;
- :func:`plot_curves`: the deletion and insertion curves of an :class:`~SegHiResCAMLib.analysis.evaluate.Evaluation`;
- :func:`plot_sa`: the SA score of every layer against depth (:mod:`SegHiResCAMLib.analysis.segmentation_ability`).
"""

from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
import torch

from ..analysis.evaluate import RANDOM_ORDER, Evaluation
from ..analysis.segmentation_ability import ImageSA
from ..errors import InputError
from ..geometry import Geometry
from ..imaging.conversion import from_sitk, to_sitk
from ..imaging.files import atomic_write


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


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
    plt = _pyplot()

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


def plot_curves(evaluation: Evaluation, path: str, title: Optional[str] = None) -> str:
    """Deletion and insertion curves, one line per method x layer (colour = method, line style = layer)."""
    plt = _pyplot()

    methods = list(dict.fromkeys(r["method"] for r in evaluation.rows if r["method"] != RANDOM_ORDER))
    layers = list(dict.fromkeys(r["layer"] for r in evaluation.rows if r["method"] != RANDOM_ORDER))
    colours = plt.get_cmap("tab10")
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=False)
    normalised = evaluation.metadata.get("y0", 1.0) > 0
    for ax, mode in zip(axes, ("deletion", "insertion")):
        for key, pair in evaluation.curves.items():
            method, layer = key.split(" @ ")
            curve = pair[mode]
            ys = curve.normalized if normalised else curve.scores
            xs = [100 * f for f in curve.fractions]
            if method == RANDOM_ORDER:
                ax.plot(xs, ys, color="black", lw=2.2, alpha=0.6, label="random order (reference)")
            else:
                ax.plot(xs, ys, color=colours(methods.index(method) % 10),
                        ls=styles[layers.index(layer) % len(styles)], lw=1.4,
                        label="%s @ %s (AUC %.3f)" % (method, layer, curve.auc if normalised else curve.auc_raw))
        ax.set_title("%s (%s)" % (mode, "lower AUC = more faithful" if mode == "deletion" else
                                  "higher AUC = more faithful"))
        ax.set_xlabel("%% of voxels %s, most salient first" % ("removed" if mode == "deletion" else "inserted"))
        ax.set_ylabel("y / y0" if normalised else "score y")
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, [n.split(" (AUC")[0] for n in names], loc="center right", fontsize=7, frameon=False)
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 0.78, 1))
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
    return path


def plot_sa(path: str, result: ImageSA, title: str, protect: Sequence[str] = ()) -> None:
    """PNG: SA score of every layer (all units) against depth, every unit as a dot, the model's Dice if known."""
    plt = _pyplot()

    layers = result.report.layers
    depth = [r.depth for r in layers]
    fig, ax = plt.subplots(figsize=(max(8.0, 0.16 * len(layers) + 3), 5.2))
    for r in layers:
        if r.units is not None:
            values = r.units[0].cpu().numpy()
            ax.scatter(np.full(values.shape, r.depth) + np.linspace(-0.25, 0.25, len(values)), values, s=3,
                       color="0.6", alpha=0.5, linewidths=0, label="_units")
    ax.plot(depth, [float(r.score[0]) for r in layers], "-o", color="C0", ms=3.5, label="layer (all units)")
    ax.plot(depth, [float(torch.max(torch.nan_to_num(r.units[0], nan=-1))) if r.units is not None else np.nan
                    for r in layers], "--", color="C1", lw=1, label="best unit")
    feats = [r for r in layers if r.feature]
    ax.scatter([r.depth for r in feats], [float(r.score[0]) for r in feats], s=60, facecolors="none",
               edgecolors="C3", label="feature layers (mean SA %.3f)" % result.mean_sa, zorder=3)
    if result.dice is not None:
        ax.axhline(result.dice, color="C2", ls=":", label="Dice of the prediction %.3f" % result.dice)
    step = max(1, len(layers) // 40)
    ax.set_xticks(depth[::step])
    ax.set_xticklabels([r.name for r in layers][::step], rotation=90, fontsize=6)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("layer (depth = execution order)")
    ax.set_ylabel("SA score (Dice of the ProtoSeg map)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    try:
        atomic_write(path, protect=protect, write=lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)
