"""bfloat16 against float32 for the perturbed inputs of ``seghirescam evaluate`` and ``--check quick`` (issue 18,
part 4: "evaluate that finishes").

For each case this computes one heatmap (Seg-HiRes-Grad CAM at the model's default layer, float32), then runs the
same deletion curve, evaluate's default fractions (0, 1/8, 3/8, 5/8, 7/8, 1) in batches of 2, once with float32
forward passes and once with bfloat16 ones (:func:`torch.autocast`; the bfloat16 curve starts from the unperturbed
input scored in bfloat16, as evaluate does), alternating the two ``--repeats`` times in one process after an
untimed warm-up of each. Reported: the seconds per forward pass of each precision (median), their ratio, and the
largest difference between the two curves' normalised scores (score / y0) and deletion AUCs.

- ``hdbet-mni152``: HD-BET fold 0 on the whole MNI152 T1 (nilearn's, 197x233x189 at 1 mm; the model grid
  128x160x144 at 1.5 mm), the predicted brain: the whole-MRI run of ``benchmarks/results/evaluate.md``.
- ``hdbet-study``: HD-BET on the faithfulness study's 64^3 box of the MNI152 template (``docs/faithfulness``).
- ``unet``: the MONAI UNet of the other benchmarks (``cases.py``, seeded) on a CT-like 128^3 input, class 1 (half
  the input): the quick check's UNet case of ``benchmarks/results/check.md``.

Run from the repository root (after ``make install``)::

    .venv/bin/python studies/benchmark/bench_precision.py    # -> benchmarks/results/precision.{json,md}

bfloat16 is fast only on a CPU that computes it natively (AVX512-BF16 or AMX); the results name the CPU's flags.
"""

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "studies"))

from SegHiResCAMLib.analysis.evaluate import crop_image  # noqa: E402
from SegHiResCAMLib.analysis.explain import TargetSpec, build_target, model_input  # noqa: E402
from SegHiResCAMLib.analysis.provenance import dumps  # noqa: E402
from SegHiResCAMLib.engine import compute_cams  # noqa: E402
from SegHiResCAMLib.engine.cam import cpu_bfloat16  # noqa: E402
from SegHiResCAMLib.engine.faithfulness import DEFAULT_FRACTIONS, perturbation_curves  # noqa: E402
from SegHiResCAMLib.engine.outputs import flush_denormals  # noqa: E402
from SegHiResCAMLib.imaging import files as io  # noqa: E402
from SegHiResCAMLib.imaging.sample_data import mni152_template  # noqa: E402
from SegHiResCAMLib.models import load_model  # noqa: E402

OUT = os.path.join(ROOT, "benchmarks", "results")
CASES = ("hdbet-mni152", "hdbet-study", "unet")


def _case(name):
    """``(model, image, geometry, layer, title)``."""
    if name.startswith("hdbet"):
        model = load_model("hd-bet")
        image, geometry = io.read_image(mni152_template().t1)
        image = image.astype(np.float32)
        if name == "hdbet-mni152":
            return model, image, geometry, model.default_layer, "HD-BET fold 0, whole MNI152 T1 %s" % (image.shape,)
        import faithfulness as study
        with open(os.path.join(ROOT, "docs", "faithfulness", "mni152.json")) as handle:
            box = json.load(handle)["crop"]["box"]
        size = [b - a for a, b in box]
        image, geometry, _ = crop_image(image, geometry, size, [a + n // 2 for (a, _), n in zip(box, size)])
        model = study.dataclasses.replace(model, preprocessing=study.dataclasses.replace(model.preprocessing,
                                                                                         min_size=None))
        return model, image, geometry, model.default_layer, "HD-BET fold 0, the study's 64^3 box of MNI152"
    from cases import UNET_LAYER, build_unet, ct_sized_input
    from SegHiResCAMLib.geometry import Geometry
    from SegHiResCAMLib.models.base import Preprocessing, SegModel
    torch.manual_seed(0)
    model = SegModel(network=build_unet().eval(), name="monai-unet", preprocessing=Preprocessing(divisible_by=16),
                     output="logits")
    geometry = Geometry(size=(128,) * 3, spacing=(1.0,) * 3, origin=(0.0,) * 3, direction=tuple(np.eye(3).flatten()))
    return model, ct_sized_input((128,) * 3), geometry, UNET_LAYER, "MONAI UNet (cases.py, seeded), CT-like 128^3"


def run_case(name, repeats):
    model, image, geometry, layer, title = _case(name)
    x, space, _ = model_input(model, image, geometry, "cpu")
    target = build_target(TargetSpec(class_index=1), space, model)
    result = compute_cams(model.network, x, [target], [layer], ["seg-hires-grad-cam"], output_key=model.output_key)[0]
    y0 = float(result.score[0])
    interior = len(DEFAULT_FRACTIONS) - 1  # the fully replaced input and the interior points (deletion only)

    def curve(precision):
        t0 = time.perf_counter()
        got = perturbation_curves(model.network, x, target, [result.map[0]], steps=list(DEFAULT_FRACTIONS),
                                  modes=("deletion",), region=result.region, batch_size=2, precision=precision,
                                  reference_score=y0 if precision == "float32" else None,
                                  output_key=model.output_key)[0]["deletion"]
        forwards = interior + (precision != "float32")
        return (time.perf_counter() - t0) / forwards, got

    curve("float32"), curve("bfloat16")  # warm-up
    seconds = {"float32": [], "bfloat16": []}
    curves = {}
    for i in range(repeats):
        for precision in (("float32", "bfloat16") if i % 2 == 0 else ("bfloat16", "float32")):
            s, got = curve(precision)
            seconds[precision].append(s)
            curves[precision] = got
    single, half = curves["float32"], curves["bfloat16"]
    return {"case": name, "title": title, "input": list(x.shape), "layer": result.layer, "y0_float32": y0,
            "y0_bfloat16": half.reference, "seconds_per_forward": seconds,
            "median_s": {p: float(np.median(v)) for p, v in seconds.items()},
            "ratio": float(np.median(seconds["bfloat16"]) / np.median(seconds["float32"])),
            "fractions": single.fractions, "normalized": {"float32": single.normalized, "bfloat16": half.normalized},
            "max_abs_normalized_diff": float(max(abs(a - b) for a, b in zip(single.normalized, half.normalized))),
            "deletion_auc": {"float32": single.auc, "bfloat16": half.auc},
            "auc_diff": half.auc - single.auc, "load_average_end": list(os.getloadavg())}


def markdown(data):
    lines = ["# bfloat16 against float32 for the perturbed inputs", "",
             "Made by `%s` (%d torch threads, CPU; bfloat16 native on this CPU: %s; %s). One deletion curve of a "
             "Seg-HiRes-Grad CAM map at evaluate's default fractions, batches of 2, float32 and bfloat16 alternating "
             "%d times after a warm-up; seconds per forward pass are medians. Raw numbers: "
             "`benchmarks/results/precision.json`." % (data["command"], data["threads"], data["cpu_bfloat16"],
                                                       data["cpu_flags"], data["repeats"]), "",
             "| case | input | s per pass: float32, bfloat16 | ratio | y0 float32, bfloat16 | max abs difference of "
             "score / y0 | deletion AUC float32, bfloat16 |", "|---|---|---|---|---|---|---|"]
    for c in data["cases"]:
        lines.append("| %s | %s | %.2f, %.2f | %.2f | %.6g, %.6g | %.4f | %.4f, %.4f |" % (
            c["title"], "x".join(str(s) for s in c["input"][2:]), c["median_s"]["float32"], c["median_s"]["bfloat16"],
            c["ratio"], c["y0_float32"], c["y0_bfloat16"], c["max_abs_normalized_diff"], c["deletion_auc"]["float32"],
            c["deletion_auc"]["bfloat16"]))
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    flush_denormals()
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as handle:
            line = next((l for l in handle if l.startswith("flags")), "")
        flags = " ".join(f for f in line.split() if "bf16" in f or f.startswith("amx"))
    data = {"command": "python studies/benchmark/bench_precision.py " + " ".join(argv or sys.argv[1:]),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "cpu_bfloat16": cpu_bfloat16(), "cpu_flags": flags or "flags not read", "repeats": args.repeats,
            "cases": []}
    for name in [c for c in args.cases.split(",") if c]:
        print("case %s ..." % name, flush=True)
        data["cases"].append(run_case(name, args.repeats))
        c = data["cases"][-1]
        print("  %.2f s / %.2f s per pass (ratio %.2f); max |d score/y0| %.4f; dAUC %+.4f" % (
            c["median_s"]["float32"], c["median_s"]["bfloat16"], c["ratio"], c["max_abs_normalized_diff"],
            c["auc_diff"]), flush=True)
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "precision.json"), "w") as handle:
            handle.write(dumps(data, indent=1))
        with open(os.path.join(args.out, "precision.md"), "w") as handle:
            handle.write(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
