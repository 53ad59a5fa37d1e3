"""``seghirescam demo`` prints what the demo found, its warnings included (the HD-BET run itself is in
Testing/real/test_real_hdbet.py)."""

from SegHiResCAMLib.cli import main
from SegHiResCAMLib.reporting import demo as demo_report

WARNING = ("the spatial means of the gradients at layer context5 cancel (|mean G| / mean |G| = 2.3e-08), so "
           "seg-grad-cam's channel weights are rounding noise")


def test_demo_prints_the_heatmaps_warnings_on_stderr(monkeypatch, tmp_path, capsys):
    rows = [{"method": "seg-hires-grad-cam", "layer": "context5", "ratio": 3.13, "figure": "a.png", "warnings": []},
            {"method": "seg-grad-cam", "layer": "context5", "ratio": 29.79, "figure": "b.png",
             "warnings": [WARNING]}]
    seen = {}

    def fake_run_demo(out, device="auto", progress=None):
        seen["out"] = out
        return {"dice": 0.968, "heatmaps": rows}

    monkeypatch.setattr(demo_report, "run_demo", fake_run_demo)
    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert seen["out"] == str(tmp_path)
    assert "Dice vs atlas mask: 0.9680" in captured.out
    assert captured.err.splitlines() == ["seghirescam: warning: seg-grad-cam / context5: " + WARNING]
