"""``explain --check quick`` (issue 18, part 3): a one-line verdict stored in the JSON, with its numbers."""

import json
import re

import numpy as np
import pytest
import torch

from SegHiResCAMLib.analysis.check import check_name, with_agreement
from SegHiResCAMLib.analysis.explain import TargetSpec, explain_image
from SegHiResCAMLib.cli import main
from SegHiResCAMLib.errors import InputError
from SegHiResCAMLib.geometry import Geometry
from SegHiResCAMLib.imaging import files as io
from SegHiResCAMLib.models.base import Preprocessing, SegModel
from SegHiResCAMLib.slicer_logic.panel_text import resultSummary

import toy_models

SHAPE = (32, 32, 32)
VERDICT = re.compile(r"^(passes|fails) model randomisation \(rho (-?\d\.\d\d|n/a)\); "
                     r"deletion AUC( \(raw\))? -?\d+\.\d\d vs random -?\d+\.\d\d$")


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
    assert len(deletion["fractions"]) == 3 and deletion["box"] is not None
    assert got.metadata["timings"]["check_s"] > 0


def test_agreement_is_appended_and_bad_names_fail_clearly():
    line = {"verdict": "passes model randomisation (rho 0.10); deletion AUC 0.20 vs random 0.50"}
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
