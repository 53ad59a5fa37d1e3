"""The bad inputs of the slice paths (a 2D model on a 3D scan: analysis/slices.py, slice_sa.py, slice_evaluate.py,
nnunet_slices.py): every error they raise is a row of docs/bad_inputs.md, and each one below is one clear
InputError/TargetError with its message; tiny 2D networks on the shared 8 x 10 x 6 case only."""

import ast
import os
import re

import numpy as np
import pytest
import torch

import nets
from slice_cases import ORIGIN, SIZE, SPACING, random_image
from SegHiResCAMLib.analysis import nnunet_slices, slices
from SegHiResCAMLib.analysis.evaluate import evaluate_image
from SegHiResCAMLib.analysis.explain import TargetSpec, explain_image
from SegHiResCAMLib.errors import InputError, TargetError
from SegHiResCAMLib.geometry import Geometry
from SegHiResCAMLib.models.base import SegModel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ANALYSIS = os.path.join(ROOT, "SegHiResCAM", "SegHiResCAMLib", "analysis")
MODULES = ("slices.py", "slice_sa.py", "slice_evaluate.py", "nnunet_slices.py")
GEOMETRY = Geometry(size=SIZE, spacing=SPACING, origin=ORIGIN, direction=tuple(np.eye(3).flatten()))


def raised_messages(path):
    """The message template (the string literal) of every ``raise InputError/TargetError(...)`` in a module."""
    found = []
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and \
                getattr(node.exc.func, "id", None) in ("InputError", "TargetError") and node.exc.args:
            text = node.exc.args[0]
            text = text.left if isinstance(text, ast.BinOp) else text
            if isinstance(text, ast.Constant) and isinstance(text.value, str):
                found.append(text.value)
    return found


def test_every_error_of_the_slice_paths_is_a_row_of_bad_inputs_md():
    doc = open(os.path.join(ROOT, "docs", "bad_inputs.md")).read()
    missing = []
    for module in MODULES:
        messages = raised_messages(os.path.join(ANALYSIS, module))
        assert messages, module
        for message in messages:
            # the longest literal part between the %-fields is quoted in the row (with example values around it)
            part = max((p.strip(" ;,") for p in re.split(r"%[-0-9.]*[rsdgf]", message)), key=len)
            if part not in doc:
                missing.append("%s: %r" % (module, part))
    assert not missing, "not in docs/bad_inputs.md:\n" + "\n".join(missing)


def tiny(classes_bias=None):
    """The tiny 2D U-Net (seeded); ``classes_bias``: its head's bias, e.g. class 1 everywhere or nowhere."""
    torch.manual_seed(0)
    model = SegModel(nets.TinyUNet(nd=2).eval(), "tiny-2d", spatial_dims=2)
    if classes_bias is not None:
        with torch.no_grad():
            model.network.head.bias.copy_(torch.tensor(classes_bias))
    return model


NOWHERE, EVERYWHERE = [1e6, -1e6], [-1e6, 1e6]


def segment(value=1):
    mask = np.zeros(SIZE[::-1], np.uint8)
    mask[2:4, 3:7, 2:6] = value
    return mask


EXPLAIN_CASES = [
    ("context", {}, dict(slice_context=-1), InputError, "slice context must be an integer >= 0"),
    ("batch", {}, dict(slice_batch=0), InputError, "slice batch must be an integer >= 1"),
    ("normalisation", {}, dict(normalization="loudest"), InputError, "normalisation must be one of"),
    ("voxel-outside", dict(voxel=(9, 0, 0), mask=None), {}, TargetError,
     r"voxel \(9, 0, 0\) lies outside the image \(shape \(6, 10, 8\)"),
    ("label-absent", dict(label=9), {}, TargetError, "label 9 does not occur in the mask; its values are: 0, 1"),
    ("empty-segment", dict(mask=np.zeros(SIZE[::-1], np.uint8)), {}, TargetError, "the target segment is empty"),
    ("threshold-error", dict(mask=None, error="fp", reference=segment(), threshold=0.5), {}, InputError,
     "error targets of a thresholded prediction are not available for a 2D model on a 3D scan"),
    ("threshold-component", dict(mask=None, component="largest", threshold=0.5), {}, InputError,
     "a connected component of a thresholded prediction is not available for a 2D model"),
]


@pytest.mark.parametrize("name, target, options, error, message", EXPLAIN_CASES, ids=[c[0] for c in EXPLAIN_CASES])
def test_explain_slice_errors(name, target, options, error, message):
    spec = TargetSpec(**dict(dict(class_index=1, mask=segment()), **target))
    with pytest.raises(error, match=message):
        explain_image(tiny(), random_image(), GEOMETRY, [spec], layers="dec", device="cpu", **options)


def test_prediction_targets_that_are_empty_on_every_slice():
    image = random_image()
    with pytest.raises(TargetError, match="the model predicts no voxel of class 1 on any axial slice"):
        explain_image(tiny(NOWHERE), image, GEOMETRY, [TargetSpec(1)], layers="dec", device="cpu")
    with pytest.raises(TargetError, match="the target region is empty; choose another class"):
        explain_image(tiny(NOWHERE), image, GEOMETRY, [TargetSpec(1, component="largest")], layers="dec",
                      device="cpu")
    with pytest.raises(TargetError, match="component rank 3 requested but the region has 1 components"):
        explain_image(tiny(EVERYWHERE), image, GEOMETRY, [TargetSpec(1, component=3)], layers="dec", device="cpu")


def test_evaluate_slice_errors():
    image = random_image()
    with pytest.raises(InputError, match="the number of evaluated slices must be an integer >= 1, got 0"):
        evaluate_image(tiny(), image, GEOMETRY, TargetSpec(1, mask=segment()), layers="dec", steps=2, slice_count=0)
    with pytest.raises(TargetError, match="the target segment is empty"):
        evaluate_image(tiny(), image, GEOMETRY, TargetSpec(1, mask=np.zeros(SIZE[::-1], np.uint8)), layers="dec",
                       steps=2)
    with pytest.raises(TargetError, match="the target has no voxel on any coronal slice"):
        evaluate_image(tiny(NOWHERE), image, GEOMETRY, TargetSpec(1), layers="dec", steps=2, slice_axis="coronal")


def test_slice_helpers_refuse_what_they_cannot_slice():
    with pytest.raises(InputError, match="slices are taken of 3D images; this image is 2D"):
        slices.slice_array_axis(Geometry.identity((10, 12)), "axial")
    with pytest.raises(InputError, match=r"image shape \(3, 10, 8\) does not match its geometry \(6, 10, 8\)"):
        slices.slice_setup(tiny(), random_image()[:3], GEOMETRY, torch.device("cpu"), None, 0, None)
    with pytest.raises(InputError, match="per-channel maps are not available for a 2D model on a 3D scan yet"):
        nnunet_slices.check_nnunet_slice_options(None, True, None, 0)
