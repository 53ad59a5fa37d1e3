"""ProtoSeg segmentation ability of the real HD-BET model on the ROBEX atlas, through ``seghirescam sa-score``."""

import os

import pytest

from SegHiResCAMLib import cli

pytestmark = pytest.mark.real


def sa_main(argv):
    return cli.main(argv)


@pytest.fixture(scope="module")
def hdbet_atlas(tmp_path_factory):
    """``sa-score`` with HD-BET fold 0 on the ROBEX atlas and its mask, feature layers only: ONE forward pass
    (about 20 s and 4 GiB on 2 cores)."""
    import json
    from SegHiResCAMLib.imaging.sample_data import robex_atlas
    image_path, mask_path = robex_atlas()
    out = tmp_path_factory.mktemp("sa-hdbet")
    code = sa_main(["sa-score", "--model", "hd-bet", "--image", image_path, "--reference", mask_path, "--layers",
                    "features", "--out-csv", str(out / "sa.csv"), "--plot", str(out / "sa.png"), "--out-map",
                    str(out / "map.nii.gz"), "--json", str(out / "sa.json"), "--quiet"])
    assert code == 0
    return out, json.load(open(out / "sa.json")), image_path, mask_path


@pytest.mark.real
def test_hdbet_last_feature_layer_sa_tracks_dice_on_the_atlas(hdbet_atlas):
    out, meta, _, _ = hdbet_atlas
    assert meta["protoseg"]["passes"] == 1
    assert meta["feature_layers"] == ["end_conv_1", "end_conv_2"]
    assert meta["dice_prediction_vs_reference"] > 0.95
    assert abs(meta["last_feature_layer_sa"] - meta["dice_prediction_vs_reference"]) <= 0.05
    assert 0.0 <= meta["mean_sa"] <= 1.0
    rows = {row["layer"]: row for row in meta["layers"]}
    assert 0.5 < float(rows["input"]["sa_score"]) < meta["dice_prediction_vs_reference"]  # intensity alone: worse


@pytest.mark.real
def test_hdbet_sa_map_lies_on_the_brain(hdbet_atlas):
    from SegHiResCAMLib.imaging import files as io
    from SegHiResCAMLib.analysis.measures import dice
    out, meta, image_path, mask_path = hdbet_atlas
    sa_map, geometry = io.read_image(str(out / "map.nii.gz"))
    mask, mask_geometry = io.read_image(mask_path)
    assert geometry.same_grid(mask_geometry) and meta["map_layer"] == "end_conv_2"
    assert dice(sa_map, mask) > 0.9
    assert os.path.getsize(out / "sa.png") > 10000
