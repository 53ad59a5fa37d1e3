"""``evaluate`` of a 2D model on a 3D scan: the maps are evaluated on the target's slices, each as a 2D image, and
the rows are the mean over those slices (docs/slice_models.md)."""

import numpy as np
import pytest
import torch

import nets
from slice_cases import SIZE, SPACING, plane, random_image
from SegHiResCAMLib.analysis.evaluate import evaluate_image
from SegHiResCAMLib.analysis.explain import TargetSpec, labels_on_image, predict_image
from SegHiResCAMLib.analysis.slice_evaluate import evaluate_slices
from SegHiResCAMLib.errors import InputError
from SegHiResCAMLib.geometry import Geometry
from SegHiResCAMLib.models.base import SegModel

GEOMETRY = Geometry(size=SIZE, spacing=SPACING, origin=(3.0, -2.0, 7.5), direction=tuple(np.eye(3).flatten()))
OPTIONS = dict(methods=["seg-grad-cam", "seg-hires-grad-cam"], layers=["dec"], steps=4, sanity_stages=1,
               random_targets=("shift",), device="cpu")




@pytest.fixture(scope="module")
def image():
    return random_image()


def unet2d(seed=7):
    torch.manual_seed(seed)
    return SegModel(nets.TinyUNet(nd=2).eval(), "tiny-2d", spatial_dims=2)


def assert_rows_are_the_mean(rows, singles):
    assert [(r["method"], r["layer"]) for r in rows] == [(r["method"], r["layer"]) for r in singles[0].rows]
    for i, row in enumerate(rows):
        for key, value in row.items():
            values = [s.rows[i][key] for s in singles]
            if isinstance(value, float):
                finite = [v for v in values if not np.isnan(v)]
                expected = np.mean(finite) if finite else float("nan")
                np.testing.assert_allclose(value, expected, rtol=1e-6, equal_nan=True, err_msg=key)


def test_a_segment_is_evaluated_on_its_largest_slices_and_the_rows_are_their_mean(image):
    model = unet2d()
    segment = np.zeros(image.shape, np.uint8)
    segment[1:5, 3:6, 2:7] = 1  # coronal slices 3, 4, 5 with 20 voxels each ...
    segment[2, 3, 2:4] = 0  # ... but slice 3 with 18
    got = evaluate_slices(model, image, GEOMETRY, TargetSpec(1, mask=segment), evaluate_image, labels_on_image,
                          slice_axis="coronal", slice_count=2, **OPTIONS)
    assert got.metadata["slices"]["evaluated"] == [4, 5] and got.metadata["slices"]["target_voxels"] == [20, 20]
    singles = [evaluate_image(model, np.ascontiguousarray(image[:, k]), plane(1), TargetSpec(1, mask=segment[:, k]),
                              **OPTIONS) for k in (4, 5)]
    assert_rows_are_the_mean(got.rows, singles)
    assert got.rows[0]["deletion_auc"] != singles[0].rows[0]["deletion_auc"]  # two different slices averaged
    assert got.curves.keys() == singles[0].curves.keys()
    assert got.metadata["slices"]["curves_of"] == 4 and got.metadata["slices"]["axis"] == "coronal"


def test_the_prediction_target_takes_the_slices_where_the_class_is_predicted_most(image):
    model = unet2d(seed=10)  # class 1 on every axial slice, 7 to 14 voxels
    labels = predict_image(model, image, GEOMETRY, device="cpu")[0]
    sizes = [int((labels[k] == 1).sum()) for k in range(image.shape[0])]
    top = sorted(sorted(range(len(sizes)), key=lambda k: (-sizes[k], k))[:2])
    got = evaluate_slices(model, image, GEOMETRY, TargetSpec(1), evaluate_image, labels_on_image, slice_count=2,
                          **OPTIONS)
    assert got.metadata["slices"]["evaluated"] == top and len(set(sizes)) > 1
    singles = [evaluate_image(model, image[k], plane(0), TargetSpec(1), **OPTIONS) for k in top]
    assert_rows_are_the_mean(got.rows, singles)
    with pytest.raises(InputError, match="takes a segment .* or the model's prediction"):
        evaluate_slices(model, image, GEOMETRY, TargetSpec(1, whole=True), evaluate_image, labels_on_image,
                        **OPTIONS)


def test_evaluate_image_and_the_command_line_dispatch_a_2d_model_on_a_volume(image, tmp_path, capsys):
    import json
    from SegHiResCAMLib.cli import main
    from SegHiResCAMLib.imaging import files as io
    from SegHiResCAMLib.models import load_model
    segment = np.zeros(image.shape, np.uint8)
    segment[1:5, 3:6, 2:7] = 1
    segment[2, 3, 2:4] = 0
    path, seg, weights, out = (str(tmp_path / n) for n in ("scan.nrrd", "seg.nrrd", "w.pt", "eval.json"))
    io.write_image(path, image, GEOMETRY)
    io.write_image(seg, segment, GEOMETRY)
    torch.manual_seed(7)
    torch.save(nets.TinyUNet(nd=2).state_dict(), weights)
    code = main(["evaluate", "--model", "toy_models:unet2d", "--weights", weights, "--image", path, "--segment", seg,
                 "--methods", "seg-grad-cam", "seg-hires-grad-cam", "--layers", "dec", "--steps", "4",
                 "--sanity-stages", "1", "--random-targets", "shift", "--slice-axis", "coronal", "--slice-count",
                 "2", "--device", "cpu", "--out-json", out, "--quiet"])
    assert code == 0, capsys.readouterr().err
    model = load_model("toy_models:unet2d", weights=weights)
    got = evaluate_image(model, image, GEOMETRY, TargetSpec(1, mask=segment), slice_axis="coronal", slice_count=2,
                         **OPTIONS)
    direct = evaluate_slices(model, image, GEOMETRY, TargetSpec(1, mask=segment), evaluate_image, labels_on_image,
                             slice_axis="coronal", slice_count=2, **OPTIONS)
    assert json.dumps(got.rows) == json.dumps(direct.rows) and got.metadata["slices"]["evaluated"] == [4, 5]
    record = json.load(open(out))
    assert record["metadata"]["slices"]["evaluated"] == [4, 5]
    for row, expected in zip(record["rows"], got.rows):
        assert row["method"] == expected["method"]
        np.testing.assert_allclose(row["deletion_auc"], expected["deletion_auc"], rtol=1e-9)
