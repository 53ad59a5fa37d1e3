"""The bad-input matrix (docs/bad_inputs.md): one clear error with a remedy, exit 2, nothing written — or it works."""

import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from SegHiResCAMLib.imaging import files as io
from SegHiResCAMLib.cli import main
from SegHiResCAMLib.errors import CancelledError
from SegHiResCAMLib.geometry import Geometry

import toy_models


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    weights = str(folder / "w.pt")
    torch.save(toy_models.unet3d().state_dict(), weights)
    geometry = Geometry(size=(12, 10, 8), spacing=(1.0, 1.2, 2.0), origin=(0.0, 0.0, 0.0),
                        direction=tuple(np.eye(3).flatten()))
    image = np.random.RandomState(0).randn(*geometry.array_shape).astype(np.float32)
    path = str(folder / "img.nrrd")
    io.write_image(path, image, geometry)
    return {"folder": folder, "weights": weights, "geometry": geometry, "image": image, "path": path}


def explain_args(env, image, out="out.nrrd", extra=()):
    return ["explain", "--model", "toy_models:unet3d", "--weights", env["weights"], "--image", image,
            "--out", str(env["folder"] / out), "--quiet", "--whole"] + list(extra)


def one_line_error(capsys, args, code=2):
    assert main(args) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_corrupt_image(env, capsys):
    bad = str(env["folder"] / "corrupt.nii.gz")
    open(bad, "wb").write(b"\x1f\x8b not really gzip")
    assert "corrupt.nii.gz" in one_line_error(capsys, explain_args(env, bad))


def test_2d_image_for_3d_model_and_4d_image(env, capsys):
    flat = str(env["folder"] / "flat2d.nrrd")
    io.write_image(flat, np.zeros((10, 12), np.float32), Geometry.identity((10, 12)))
    assert "model is 3D but the image is 2D" in one_line_error(capsys, explain_args(env, flat))
    four = str(env["folder"] / "four.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 4, 5, 6), np.float32), isVector=False), four)
    # a 4D file holds input channels along its 4th axis (issue 16): two channels for a one-channel model
    assert "expects 1 input channel(s) but the image has 2" in one_line_error(capsys, explain_args(env, four))


def test_rgb_image_for_one_channel_model(env, capsys):
    rgb = str(env["folder"] / "rgb.nrrd")
    io.write_image(rgb, np.zeros(env["geometry"].array_shape + (3,), np.uint8), env["geometry"])
    assert "expects 1 input channel(s) but the image has 3" in one_line_error(capsys, explain_args(env, rgb))


def test_nan_voxels(env, capsys):
    image = env["image"].copy()
    image[2, 3, 4] = np.nan
    path = str(env["folder"] / "nan.nrrd")
    io.write_image(path, image, env["geometry"])
    assert "NaN or infinite" in one_line_error(capsys, explain_args(env, path))


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32])
def test_integer_images_work(env, capsys, dtype):
    path = str(env["folder"] / ("int-%s.nrrd" % np.dtype(dtype).name))
    io.write_image(path, (np.abs(env["image"]) * 50).astype(dtype), env["geometry"])
    out = "heat-%s.nrrd" % np.dtype(dtype).name
    assert main(explain_args(env, path, out)) == 0, capsys.readouterr().err
    heat, geometry = io.read_image(str(env["folder"] / out))
    assert heat.dtype == np.float32 and geometry.same_grid(env["geometry"]) and np.isfinite(heat).all()


def test_one_voxel_thick_volume_gets_a_clear_model_error(env, capsys):
    path = str(env["folder"] / "thin.nrrd")
    thin = Geometry(size=(12, 10, 1), spacing=(1, 1, 1), origin=(0, 0, 0), direction=tuple(np.eye(3).flatten()))
    io.write_image(path, np.ones(thin.array_shape, np.float32), thin)
    # divisible_by "auto" (the default for a factory model) pads the one slice to the 2 the model needs ...
    assert main(explain_args(env, path, "thin-heat.nrrd")) == 0, capsys.readouterr().err
    # ... and a card that declares no padding gets the model's failure in one line
    line = one_line_error(capsys, explain_args(env, path) + ["--card-divisible-by", "1"])
    assert "the model failed on an input of shape (1, 1, 1, 10, 12)" in line


def test_layer_with_zero_gradient_is_flat_not_nan(env, capsys, tmp_path):
    # a layer the target does not depend on: zero gradient everywhere -> a flat (all-zero) map and a warning
    out = str(tmp_path / "flat.nrrd")
    weights = str(tmp_path / "aux.pt")
    torch.save(toy_models.unet3d_aux().state_dict(), weights)
    code = main(["explain", "--model", "toy_models:unet3d_aux", "--weights", weights, "--image", env["path"],
                 "--out", out, "--quiet", "--whole", "--layer", "aux_branch"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "flat" in err
    heat, _ = io.read_image(out)
    assert np.isfinite(heat).all() and heat.max() == 0


def test_out_of_memory_is_reported_with_a_remedy(env, capsys, monkeypatch):
    import toy_models as tm

    def oom(self, x):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(tm.TinyUNetOOM, "forward", oom)
    line = one_line_error(capsys, explain_args(env, env["path"])[:2] + ["toy_models:unet3d_oom"] +
                          explain_args(env, env["path"])[3:], code=1)
    assert "out of memory" in line and "--roi-size" in line and "--device" in line


def test_cancellation_writes_nothing(env, monkeypatch, capsys):
    from SegHiResCAMLib.cli import common

    class Cancelling:
        def __init__(self, quiet):
            pass

        def __call__(self, fraction, message):
            if fraction > 0.2:
                raise CancelledError("cancelled by the user")

        def close(self):
            pass

    monkeypatch.setattr(common, "Progress", Cancelling)
    out = env["folder"] / "cancelled.nrrd"
    assert main(explain_args(env, env["path"], "cancelled.nrrd", ["--json", str(env["folder"] / "c.json")])) == 130
    assert "cancelled" in capsys.readouterr().err
    assert not out.exists() and not (env["folder"] / "c.json").exists()
    assert not [f for f in os.listdir(env["folder"]) if f.startswith(".tmp")]


def test_input_never_overwritten_and_unchanged(env, capsys):
    before = open(env["path"], "rb").read()
    line = one_line_error(capsys, ["explain", "--model", "toy_models:unet3d", "--weights", env["weights"],
                                   "--image", env["path"], "--out", env["path"], "--quiet"])
    assert "Refusing to overwrite" in line
    assert main(explain_args(env, env["path"], "ok.nrrd")) == 0
    assert open(env["path"], "rb").read() == before


def test_amp_on_a_cpu_without_bfloat16_and_bad_threads(env, capsys, monkeypatch):
    import SegHiResCAMLib.engine.cam as cam
    monkeypatch.setattr(cam, "cpu_bfloat16", lambda: False)  # what a CPU without AVX512-BF16/AMX reports
    cpu = ["--device", "cpu", "--amp"]
    assert "needs native bfloat16" in one_line_error(capsys, explain_args(env, env["path"], extra=cpu))
    assert "needs native bfloat16" in one_line_error(capsys, explain_args(env, env["path"],
                                                                           extra=cpu + ["--roi-size", "8"]))
    assert "--threads must be >= 1" in one_line_error(capsys, explain_args(env, env["path"], extra=["--threads", "0"]))
