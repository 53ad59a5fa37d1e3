"""Error-aware targets with known truth: a net whose false positive is caused by a planted bright blob, and whose
false negatives are caused by a planted dark (inhibiting) blob (Testing/nets.py ``ErrorToyNet``). The reference is
the net's own prediction on the scan without the planted blob, so the errors are exactly what the blob caused."""

import json

import numpy as np
import pytest

from SegHiResCAMLib.analysis.explain import TargetSpec, explain_image, predict_image
from SegHiResCAMLib.cli import main
from SegHiResCAMLib.errors import TargetError
from SegHiResCAMLib.geometry import Geometry
from SegHiResCAMLib.imaging import files as io
from SegHiResCAMLib.models.base import SegModel

from nets import ErrorToyNet

SHAPE = (24, 24, 24)


@pytest.fixture(scope="module")
def scene():
    model = SegModel(network=ErrorToyNet().eval(), name="error-toy")
    geometry = Geometry.identity(SHAPE)
    clean = np.zeros(SHAPE, np.float32)
    clean[4:12, 4:12, 4:12] = 1.0  # the true object
    reference, _ = predict_image(model, clean, geometry, device="cpu")
    big = np.zeros(SHAPE, bool)
    big[15:21, 15:21, 15:21] = True  # planted bright blobs: segmented although absent from the reference
    small = np.zeros(SHAPE, bool)
    small[2:7, 16:21, 16:21] = True
    bright = clean.copy()
    bright[big | small] = 1.0
    inhibitor = np.zeros(SHAPE, bool)
    inhibitor[4:12, 4:12, 13:15] = True  # planted dark blob next to the object: suppresses its near side
    dark = clean.copy()
    dark[inhibitor] = -1.0
    return dict(model=model, geometry=geometry, clean=clean, reference=reference, big=big, small=small,
                bright=bright, inhibitor=inhibitor, dark=dark)


def share(heat, where):
    return float(heat[where].sum() / heat.sum())


def explain(s, image, **spec):
    result = explain_image(s["model"], image, s["geometry"], [TargetSpec(1, **spec)], layers="detect", device="cpu")
    return result.heatmaps[0]


def test_false_positive_map_points_at_the_planted_blobs(scene):
    heat = explain(scene, scene["bright"], error="fp", reference=scene["reference"])
    assert share(heat.array, scene["big"] | scene["small"]) > 0.99
    # the prediction target spreads over the true object as well: the error target is what isolates the blobs
    whole = explain(scene, scene["bright"]).array
    assert share(whole, scene["big"] | scene["small"]) < 0.6
    table = heat.info["components"]
    assert table["error"] == "fp" and table["components_total"] == 2
    first, second = table["components"]
    assert first["index"] == 0 and first["voxels"] > second["voxels"] > 0  # ranked by volume
    assert scene["big"][tuple(int(round(c)) for c in first["centroid_index"])]
    assert scene["small"][tuple(int(round(c)) for c in second["centroid_index"])]
    assert first["volume_mm3"] == first["voxels"] * 1.0 and 0.5 < first["mean_probability"] <= 1.0
    assert first["explained"] and second["explained"]
    assert 0 < first["mass_inside"] < 1 and abs(first["mass_inside"] + first["mass_outside"] - 1) < 1e-9


@pytest.mark.parametrize("rank,blob,other", [(0, "big", "small"), (1, "small", "big")])
def test_component_selects_one_false_positive(scene, rank, blob, other):
    heat = explain(scene, scene["bright"], error="fp", reference=scene["reference"], component=rank)
    assert share(heat.array, scene[blob]) > 0.99 and share(heat.array, scene[other]) < 0.01
    rows = heat.info["components"]["components"]
    assert [row["explained"] for row in rows] == [i == rank for i in range(2)]
    assert rows[rank]["mass_inside"] > 0.5


def test_false_negative_map_points_at_the_suppressing_blob(scene):
    heat = explain(scene, scene["dark"], error="fn", reference=scene["reference"])
    assert share(heat.array, scene["inhibitor"]) > 0.99
    assert heat.info["target"]["sign"] == -1
    row = heat.info["components"]["components"][0]
    assert row["mean_probability"] < 0.5 and row["voxels"] > 0
    # the missed voxels are the object's side next to the inhibitor
    assert row["centroid_index"][2] > 9  # object: 4..11, inhibitor from 13, reach 3


def test_no_false_positives_is_one_clear_error(scene):
    with pytest.raises(TargetError, match="no false positives of class 1"):
        explain(scene, scene["clean"], error="fp", reference=scene["reference"])
    with pytest.raises(TargetError, match="no false negatives"):
        explain(scene, scene["clean"], error="fn", reference=scene["reference"])


@pytest.mark.parametrize("spec,message", [
    (dict(error="fp"), "needs a reference"),
    (dict(error="xx", reference=np.ones(SHAPE)), "must be one of fp, fn"),
    (dict(reference=np.ones(SHAPE)), "without an error target"),
    (dict(error="fp", reference=np.ones(SHAPE), whole=True), "cannot be combined with whole"),
    (dict(error="fp", reference=np.ones(SHAPE), reference_label=7), "label 7 does not occur"),
])
def test_bad_error_specs(scene, spec, message):
    with pytest.raises(TargetError, match=message):
        explain(scene, scene["bright"], **spec)


def test_command_line_fp_with_reference_and_component(scene, tmp_path, capsys):
    image, reference = str(tmp_path / "img.nii.gz"), str(tmp_path / "ref.nii.gz")
    io.write_image(image, scene["bright"], scene["geometry"])
    io.write_image(reference, scene["reference"].astype(np.uint8) * 3, scene["geometry"])
    out, meta = str(tmp_path / "fp.nii.gz"), str(tmp_path / "fp.json")
    code = main(["explain", "--model", "toy_models:error_net", "--image", image, "--out", out, "--layer", "detect",
                 "--target", "fp", "--reference", reference, "--reference-label", "3", "--component", "1",
                 "--json", meta, "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    heat, _ = io.read_image(out)
    assert share(heat, scene["small"]) > 0.99
    record = json.load(open(meta))
    assert record["target_kind"] == "false positives" and record["components"]["components_total"] == 2
    assert [row["explained"] for row in record["components"]["components"]] == [False, True]
    assert "2 connected component(s) of false positives" in err
    # --target without --reference: one line, exit 2, nothing written
    bad = str(tmp_path / "bad.nii.gz")
    code = main(["explain", "--model", "toy_models:error_net", "--image", image, "--out", bad, "--target", "fn",
                 "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "needs --reference" in err and not (tmp_path / "bad.nii.gz").exists()


@pytest.mark.parametrize("shape,density", [((40, 37), 0.45), ((13, 17, 11), 0.06), ((13, 17, 11), 0.12),
                                           ((9, 8, 7), 0.0), ((6, 5, 4), 1.0)])
def test_simpleitk_components_equal_the_engines(shape, density):
    """The analysis layer's labeller (SimpleITK) gives exactly the engine's labels (same numbering)."""
    import torch
    from SegHiResCAMLib.analysis.errors import component_labels
    from SegHiResCAMLib.engine.regions import connected_components
    for seed in range(3):
        mask = torch.from_numpy(np.random.RandomState(seed).rand(*shape) < density)
        expected = connected_components(mask)
        assert torch.equal(component_labels(mask), expected)
        assert int(expected.max()) > 1 or density in (0.0, 1.0)


def test_components_of_a_thin_shell_take_one_scan():
    """A thin shell round a brain-sized grid: seconds with SimpleITK (the engine's propagation took 44 s)."""
    import time
    from SegHiResCAMLib.imaging.components import label_components
    z, y, x = np.ogrid[:181, :217, :181]
    shell = np.abs(np.sqrt((z - 90) ** 2 + (y - 108) ** 2 + (x - 90) ** 2) - 70) < 1.5
    start = time.perf_counter()
    labels = label_components(shell)
    assert time.perf_counter() - start < 10 and labels.max() == 1 and (labels > 0).sum() == shell.sum()


def test_error_targets_of_a_2d_model_on_a_3d_scan(scene):
    """A 2D model run slice by slice (analysis/slices.py): the same known truth, the table on the image grid."""
    model = SegModel(network=ErrorToyNet(nd=2).eval(), name="error-toy-2d", spatial_dims=2)
    geometry = scene["geometry"]
    reference, _ = predict_image(model, scene["clean"], geometry, device="cpu")
    spec = dict(layers="detect", device="cpu", slice_axis="axial")
    heat = explain_image(model, scene["bright"], geometry, [TargetSpec(1, error="fp", reference=reference)],
                         **spec).heatmaps[0]
    assert share(heat.array, scene["big"] | scene["small"]) > 0.99
    table = heat.info["components"]
    assert table["components_total"] == 2 and table["components"][0]["voxels"] > table["components"][1]["voxels"]
    assert scene["small"][tuple(int(round(c)) for c in table["components"][1]["centroid_index"])]
    small = explain_image(model, scene["bright"], geometry, [TargetSpec(1, error="fp", reference=reference,
                                                                        component=1)], **spec).heatmaps[0]
    assert share(small.array, scene["small"]) > 0.99
    heat = explain_image(model, scene["dark"], geometry, [TargetSpec(1, error="fn", reference=reference)],
                         **spec).heatmaps[0]
    assert share(heat.array, scene["inhibitor"]) > 0.99
    with pytest.raises(TargetError, match="no false positives of class 1"):
        explain_image(model, scene["clean"], geometry, [TargetSpec(1, error="fp", reference=reference)], **spec)
