"""``explain --check quick`` (issue 18, part 3): a one-line verdict stored in the JSON, with its numbers."""

import json
import re

import numpy as np
import pytest
import torch

from SegHiResCAMLib.analysis.check import check_name, with_agreement
from SegHiResCAMLib.analysis.explain import TargetSpec, explain_image
from SegHiResCAMLib.engine import SegmentTarget
from SegHiResCAMLib.engine.cam import compute_cams
from SegHiResCAMLib.engine.faithfulness import (UpstreamRecorder, model_randomization, parameter_layers,
                                                perturbation_curves, placed_fractions, recording_parameter_layers)
from SegHiResCAMLib.cli import main
from SegHiResCAMLib.errors import InputError
from SegHiResCAMLib.geometry import Geometry
from SegHiResCAMLib.imaging import files as io
from SegHiResCAMLib.models.base import Preprocessing, SegModel
from SegHiResCAMLib.slicer_logic.panel_text import resultSummary

import toy_models

SHAPE = (32, 32, 32)
VERDICT = re.compile(r"^(passes|fails) model randomisation \(rho (-?\d\.\d\d|n/a)\); "
                     r"deletion AUC( \(raw\))? -?\d+\.\d\d vs random -?\d+\.\d\d: (better|no better) than "
                     r"random$")


def _case():
    torch.manual_seed(0)
    model = SegModel(network=toy_models.unet3d().eval(), name="toy", preprocessing=Preprocessing(divisible_by=2),
                     output="logits")
    geometry = Geometry(size=SHAPE[::-1], spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
                        direction=tuple(np.eye(3).flatten()))
    image = np.random.RandomState(0).randn(*SHAPE).astype(np.float32)
    mask = np.zeros(SHAPE, np.uint8)
    mask[10:18, 12:20, 8:14] = 1
    return model, image, geometry, mask


def test_quick_check_gives_one_verdict_line_and_its_numbers():
    model, image, geometry, mask = _case()
    spec = [TargetSpec(1, mask=mask)]
    plain = explain_image(model, image, geometry, spec, layers="dec", device="cpu")
    got = explain_image(model, image, geometry, spec, layers="dec", device="cpu", check="quick")
    assert "verdict" not in plain.metadata
    np.testing.assert_array_equal(plain.heatmaps[0].array, got.heatmaps[0].array)  # the map is not touched
    verdict, check = got.metadata["verdict"], got.metadata["check"]
    assert VERDICT.match(verdict), verdict and "\n" not in verdict
    rho = check["model_randomization"]["spearman_in_segment"]
    assert check["model_randomization"]["passes"] == (rho <= 0.5) and verdict.startswith(
        "passes" if rho <= 0.5 else "fails")
    assert check["model_randomization"]["randomized"] and "dec" in check["model_randomization"]["randomized"][0]
    deletion = check["deletion"]
    assert "%.2f vs random %.2f" % (deletion["auc"], deletion["auc_random"]) in verdict
    assert deletion["better_than_random"] == (deletion["auc"] < deletion["auc_random"])
    assert verdict.endswith(": better than random" if deletion["better_than_random"] else ": no better than random")
    # the target's box + 16 is most of the 32^3 input: its 3 passes would cost more than 2 on the whole input
    assert len(deletion["fractions"]) == 2 and deletion["box"] is None and deletion["box_rejected"] is None
    assert deletion["y0"] == deletion["scores"][0]
    assert got.metadata["timings"]["check_s"] > 0


def test_a_network_with_instance_normalisation_is_checked_on_the_whole_input():
    """A small box scores very differently in such a network: the check's deletion runs on the whole input, from
    the explain run's score, and records the box it scored and did not use."""
    model = SegModel(network=toy_models.instance_normed(), name="normed", output="logits")
    image, mask, geometry = toy_models.uneven_volume(56, 12, slice(30, 34))
    got = explain_image(model, image, geometry, [TargetSpec(1, mask=mask)], layers="2", device="cpu", check="quick")
    deletion = got.metadata["check"]["deletion"]
    assert deletion["box"] is None and deletion["box_rejected"]["box"] is not None
    assert deletion["y0"] == deletion["box_rejected"]["y0"] == deletion["scores"][0]
    assert abs(deletion["box_rejected"]["y0_stand_in"] - deletion["y0"]) > 0.01 * abs(deletion["y0"])
    assert deletion["precision"] == "float32" and deletion["precision_rejected"] is None


def test_the_check_runs_its_deletion_in_bfloat16_on_a_cpu_with_amx(monkeypatch):
    """Where ``auto`` picks bfloat16, the deletion's passes run in it, from the unperturbed input's bfloat16 score
    (one more pass: the curve shares one arithmetic), and the verdict is still the same kind of line."""
    from SegHiResCAMLib.engine import cam

    model, image, geometry, mask = _case()
    spec = [TargetSpec(1, mask=mask)]
    single = explain_image(model, image, geometry, spec, layers="dec", device="cpu", check="quick")
    monkeypatch.setattr(cam, "cpu_bfloat16", lambda: True)
    half = explain_image(model, image, geometry, spec, layers="dec", device="cpu", check="quick")
    one, other = single.metadata["check"]["deletion"], half.metadata["check"]["deletion"]
    assert one["precision"] == "float32" and other["precision"] == "bfloat16" and VERDICT.match(
        half.metadata["verdict"])
    assert other["y0"] == other["scores"][0] != one["y0"] and other["y0"] == pytest.approx(one["y0"], rel=1e-2)
    assert other["scores"][1] == pytest.approx(one["scores"][1], rel=0.02)


def test_agreement_is_appended_and_bad_names_fail_clearly():
    line = {"verdict": "passes model randomisation (rho 0.10); deletion AUC 0.20 vs random 0.50: better than random"}
    assert with_agreement(dict(line), {"agreement": 0.861})["verdict"].endswith("; fold agreement 0.86")
    assert with_agreement(dict(line), {"agreement": {"score": 0.5}})["verdict"].endswith("fold agreement 0.50")
    assert with_agreement(dict(line), {})["verdict"] == line["verdict"]
    assert check_name("none") is None and check_name("quick") == "quick"
    with pytest.raises(InputError, match="check must be one of quick"):
        check_name("thorough")
    summary = resultSummary({"method": "m", "layer": "l", "target": "t", "model": "x", "checkVerdict": line["verdict"]})
    assert summary.endswith(" | check: " + line["verdict"])


def test_cli_prints_and_stores_the_verdict(tmp_path, capsys):
    model, image, geometry, mask = _case()
    weights = str(tmp_path / "w.pt")
    torch.save(model.network.state_dict(), weights)
    path, seg = str(tmp_path / "img.nrrd"), str(tmp_path / "seg.nrrd")
    io.write_image(path, image, geometry)
    io.write_image(seg, mask, geometry)
    code = main(["explain", "--model", "toy_models:unet3d", "--weights", weights, "--image", path, "--segment", seg,
                 "--layer", "dec", "--quiet", "--out", str(tmp_path / "h.nrrd"), "--json", str(tmp_path / "m.json"),
                 "--check", "quick", "--card-divisible-by", "2", "--card-output", "logits"])
    err = capsys.readouterr().err
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("seghirescam: check: ")]
    meta = json.load(open(str(tmp_path / "m.json")))
    assert len(lines) == 1 and lines[0] == "seghirescam: check: " + meta["verdict"]
    assert VERDICT.match(meta["verdict"]) and meta["check"]["deletion"]["auc_random"] == pytest.approx(
        meta["check"]["deletion"]["auc_random"])


def test_ensemble_verdict_carries_the_fold_agreement_and_checks_one_member():
    from SegHiResCAMLib.analysis.ensemble import explain_ensemble
    model, image, geometry, mask = _case()
    got = explain_ensemble(model, image, geometry, [TargetSpec(1, mask=mask)], tta=[0], layers="dec", device="cpu",
                           check="quick")
    agreement = got.metadata["agreement"]
    assert agreement is not None and got.metadata["verdict"].endswith("; fold agreement %.2f" % agreement)
    assert VERDICT.match(got.metadata["verdict"].rsplit("; fold agreement", 1)[0])
    timings = got.metadata["ensemble"]["timings"]
    assert len(timings) == 2 and "check_s" in timings[0] and "check_s" not in timings[1]


def test_quick_check_scores_the_partial_curve_with_three_forward_inputs_at_most():
    """Issue 18 part 4: the check's deletion curve is [0, r] (no fully replaced input), the modules' order comes
    from those passes (no probe of its own), so the check adds at most 3 inputs through the network: the map's and
    the random ranking's perturbed inputs and the randomised model's CAM pass (before: 5)."""
    model, image, geometry, mask = _case()
    seen = []
    handle = model.network.register_forward_hook(lambda m, i, o: seen.append(int(i[0].shape[0])))
    try:  # the deep copy of the randomisation check keeps the hook: its pass is counted too
        explain_image(model, image, geometry, [TargetSpec(1, mask=mask)], layers="dec", device="cpu")
        plain = sum(seen)
        got = explain_image(model, image, geometry, [TargetSpec(1, mask=mask)], layers="dec", device="cpu",
                            check="quick")
    finally:
        handle.remove()
    assert sum(seen) - 2 * plain <= 3, seen
    deletion = got.metadata["check"]["deletion"]
    r = placed_fractions(float(mask.mean()))[-2]
    assert r == pytest.approx(min(0.5, max(0.04, float(mask.mean()))), abs=1e-6)
    assert deletion["fractions"] == [0.0, r]
    y0, yr, yr_random = deletion["scores"][0], deletion["scores"][1], deletion["scores_random"][1]
    assert deletion["normalized"] and deletion["scores_random"][0] == y0
    assert deletion["auc"] == pytest.approx((1 + yr / y0) / 2) and deletion["auc_random"] == pytest.approx(
        (1 + yr_random / y0) / 2)
    assert deletion["better_than_random"] == (yr < yr_random)
    randomization = got.metadata["check"]["model_randomization"]
    assert "spearman" not in randomization  # the in-segment rho only
    assert randomization["reused_upstream_modules"] == 3  # enc, down, up: the explain pass's outputs


def test_partial_deletion_curve_ranks_maps_as_the_full_one_without_the_replaced_input():
    """A deletion curve over [0, r] scores r like an interior point and skips the fully replaced input; the end
    point it drops is shared by every map, so map-vs-map comparisons of the AUC keep their order."""
    torch.manual_seed(0)
    net = toy_models.unet3d().eval()
    x = torch.randn(1, 1, 16, 16, 16)
    region = torch.zeros(1, 16, 16, 16, dtype=torch.bool)
    region[:, 4:10, 5:11, 6:12] = True
    target = SegmentTarget(1)
    maps = [torch.rand(16, 16, 16, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    maps.append(region[0].float())
    calls = []
    handle = net.register_forward_hook(lambda m, i, o: calls.append(int(i[0].shape[0])))
    try:
        kw = dict(modes=("deletion",), region=region, reference_score=1.0, batch_size=8)
        partial = perturbation_curves(net, x, target, maps, steps=[0.0, 0.2], **kw)
        inputs = sum(calls)
        full = perturbation_curves(net, x, target, maps, steps=[0.0, 0.2, 1.0], **kw)
    finally:
        handle.remove()
    assert inputs == len(maps)  # one perturbed input per map, no fully replaced one
    aucs_partial = [c["deletion"].auc for c in partial]
    aucs_full = [c["deletion"].auc for c in full]
    for p, f in zip(partial, full):
        assert p["deletion"].fractions == [0.0, 0.2] and p["deletion"].scores == f["deletion"].scores[:2]
    assert np.argsort(aucs_partial).tolist() == np.argsort(aucs_full).tolist()
    with pytest.raises(InputError, match="at most 1"):
        perturbation_curves(net, x, target, maps, steps=[0.0, 0.5, 1.5], **kw)


def test_recorded_order_is_the_probe_order():
    torch.manual_seed(0)
    net = toy_models.unet3d().eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with recording_parameter_layers(net) as order, torch.no_grad():
        net(x)
    assert order and order == parameter_layers(net, x)
    assert not net._forward_pre_hooks and all(not m._forward_pre_hooks for m in net.modules())


def test_randomised_copy_reuses_what_ran_before_the_layer_and_gives_the_same_map():
    """The randomised copy returns the explain pass's outputs of the modules before the layer (``enc``, ``down``,
    ``up`` of the toy U-Net) instead of running them again; the correlation is the one of the full copy."""
    torch.manual_seed(0)
    net = toy_models.unet3d().eval()
    x = torch.randn(1, 1, 16, 16, 16)
    target = SegmentTarget(1)
    with UpstreamRecorder(net, "dec") as recorder:
        reference = compute_cams(net, x, [target], ["dec"], "seg-hires-grad-cam")
    kept = recorder.reusable("dec", x)
    assert kept is not None and set(kept) == {"enc", "down", "up"}
    calls = []
    segment = torch.ones(16, 16, 16, dtype=torch.bool)
    kw = dict(stages=["dec"], reference=reference, segment=segment, whole=False, order=parameter_layers(net, x))
    handle = net.enc[0].register_forward_pre_hook(lambda m, i: calls.append(1))  # the deep copy keeps the hook
    try:
        fast = model_randomization(net, x, target, ["dec"], ["seg-hires-grad-cam"], upstream=kept, **kw)[0]
        reused = len(calls)
        full = model_randomization(net, x, target, ["dec"], ["seg-hires-grad-cam"], **kw)[0]
    finally:
        handle.remove()
    assert reused == 0 and len(calls) == 1
    key = ("dec", "seg-hires-grad-cam")
    assert fast.correlations_in_segment[key] == full.correlations_in_segment[key]
    assert fast.randomized == full.randomized and not fast.correlations


def test_upstream_reuse_is_refused_where_it_could_be_wrong():
    torch.manual_seed(0)
    net = toy_models.unet3d().eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with UpstreamRecorder(net, "dec") as recorder, torch.no_grad():
        net(x)
    assert recorder.reusable("dec", x) is not None
    assert recorder.reusable("head", x) is None  # another layer
    assert recorder.reusable("dec", x.clone()) is None  # another input
    assert recorder.entries[0][0] == "enc"
    recorder.entries[0][2].add_(0.0)  # a kept output changed in place after it was kept: its module runs again
    assert set(recorder.reusable("dec", x)) == {"down", "up"}
    with UpstreamRecorder(net, "auto") as never, torch.no_grad():  # the layer never ran: nothing is reusable
        net(x)
    assert never.reusable("auto", x) is None and not net.enc._forward_hooks
