"""The prediction goes back to the image grid as nnU-Net takes it back: logits resampled, then the arg-max.

An arg-max on the model grid followed by nearest-neighbour label resampling (what the project did before) moves
class boundaries by up to half a model voxel; the tests below build cases where the two disagree and check the
new labels and probabilities against an independent computation (``scipy.ndimage.map_coordinates`` on the
continuous model index of every image voxel centre).
"""

import numpy as np
import pytest
import torch
from scipy import ndimage

from SegHiResCAMLib.analysis.explain import labels_on_image, predict_image
from SegHiResCAMLib.geometry import Geometry
from SegHiResCAMLib.imaging.model_space import ModelSpace, prepare
from SegHiResCAMLib.models.base import Preprocessing, SegModel


def _oblique(angle: float) -> tuple:
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([1.0, -1.0, -1.0])  # flipped y and z
    return tuple(rot.ravel())


def _space(shape=(7, 10, 13), spacing=(0.8, 0.7, 2.5), model_spacing=(1.9, 1.3, 3.3), divisible=4) -> ModelSpace:
    image = Geometry(size=shape[::-1], spacing=spacing, origin=(3.0, -7.0, 11.0), direction=_oblique(0.4))
    _, space = prepare(np.zeros(image.array_shape, np.float32), image,
                       Preprocessing(spacing=model_spacing, divisible_by=divisible, pad_side="both"), 3)
    return space


def _interpolated(space: ModelSpace, channel: np.ndarray) -> np.ndarray:
    """Independent: each image voxel centre -> continuous index of the unpadded model grid -> linear value with the
    edge value beyond the outermost centres."""
    shape = space.image.array_shape
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape[::-1]], indexing="ij"), 0).reshape(3, -1)
    points = space.image.ijk_to_lps() @ np.vstack([ijk, np.ones((1, ijk.shape[1]))])
    model = np.linalg.solve(space.grid.ijk_to_lps(), points)[:3]  # (i, j, k) of the padded model grid
    before = np.array([b for b, _ in space.pad][::-1], dtype=float)[:, None]
    inner = np.array([s - b - a for s, (b, a) in zip(space.grid.array_shape, space.pad)][::-1], dtype=float)[:, None]
    model = np.clip(model - before, 0, inner - 1) + before  # clamp to the unpadded grid's voxel centres
    values = ndimage.map_coordinates(channel.astype(np.float64), model[::-1], order=1, mode="nearest")
    # ijk grid was built (i, j, k) = (x, y, z); the array is (z, y, x)
    return values.reshape(shape[::-1]).transpose(2, 1, 0)


def _old_labels(space: ModelSpace, logits: np.ndarray) -> np.ndarray:
    return space.to_image(logits.argmax(0).astype(np.uint8), "nearest")


def test_softmax_labels_and_probabilities_match_an_independent_interpolation():
    space = _space()
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2, (3,) + space.grid.array_shape).astype(np.float32)
    expected = np.stack([_interpolated(space, logits[c]) for c in range(3)])
    labels = labels_on_image(torch.from_numpy(logits[None]), _model(3, "softmax"), space)
    np.testing.assert_array_equal(labels, expected.argmax(0))
    old = _old_labels(space, logits)
    assert (old != labels).mean() > 0.05  # the old mapping is a different (wrong) label map here
    probs = space.scores_to_image(lambda c: logits[c], 3, "softmax")
    want = np.exp(expected - expected.max(0)) / np.exp(expected - expected.max(0)).sum(0)
    assert np.abs(probs - want).max() < 1e-5
    np.testing.assert_array_equal(probs.argmax(0), labels)


def test_one_sigmoid_channel_thresholds_the_interpolated_logit():
    space = _space(model_spacing=(2.3, 2.1, 4.0))
    # a smooth field crossing 0 between model voxels: nearest labels and interpolated logits disagree at the edge
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in space.grid.array_shape], indexing="ij")
    logit = (xx - space.grid.array_shape[2] / 2.0 + 0.3 * yy - 0.4 * zz).astype(np.float32) * 3.0
    labels = labels_on_image(torch.from_numpy(logit[None, None]), _model(1, "sigmoid"), space)
    np.testing.assert_array_equal(labels, (_interpolated(space, logit) > 0).astype(np.uint8))
    assert (space.to_image((logit > 0).astype(np.uint8), "nearest") != labels).any()


def test_multilabel_sigmoid_is_the_best_class_above_zero_else_background():
    space = _space()
    rng = np.random.default_rng(4)
    logits = rng.normal(-0.5, 2, (2,) + space.grid.array_shape).astype(np.float32)
    inter = np.stack([_interpolated(space, logits[c]) for c in range(2)])
    expected = np.where(inter.max(0) > 0, inter.argmax(0) + 1, 0)
    labels = space.labels_to_image(lambda c: logits[c], 2, "sigmoid")
    np.testing.assert_array_equal(labels, expected)


def test_slabs_cover_the_image_exactly(monkeypatch):
    """Slab-wise resampling (bounded memory on a whole CT) gives what one resampling gives."""
    import SegHiResCAMLib.imaging.model_space as ms
    space = _space()
    logits = np.random.default_rng(5).normal(0, 1, (2,) + space.grid.array_shape).astype(np.float32)
    whole = space.scores_to_image(lambda c: logits[c], 2)
    assert len(list(space.channel_to_image(logits[0]))) == 1
    monkeypatch.setattr(ms, "SLAB_VOXELS", 1)  # one image slice per slab
    parts = list(space.channel_to_image(logits[0]))
    assert [p for p, _ in parts] == [slice(i, i + 1) for i in range(space.image.array_shape[0])]
    np.testing.assert_allclose(space.scores_to_image(lambda c: logits[c], 2), whole, atol=1e-6)
    np.testing.assert_array_equal(space.labels_to_image(lambda c: logits[c], 2), whole.argmax(0))


def test_same_grid_is_an_exact_argmax():
    image = Geometry(size=(6, 5, 4), spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=_oblique(0.2))
    _, space = prepare(np.zeros(image.array_shape, np.float32), image, Preprocessing(divisible_by=4), 3)
    logits = np.random.default_rng(6).normal(0, 1, (3,) + space.grid.array_shape).astype(np.float32)
    labels = space.labels_to_image(lambda c: logits[c], 3)
    inner = tuple(slice(b, s - a) for s, (b, a) in zip(space.grid.array_shape, space.pad))
    np.testing.assert_array_equal(labels, logits[(slice(None),) + inner].argmax(0))


def test_predict_image_uses_the_interpolated_logits():
    """End to end: ``predict_image`` of a resampling model equals the arg-max of the interpolated logits."""
    torch.manual_seed(0)
    net = torch.nn.Conv3d(1, 3, 1)
    image = np.random.default_rng(7).normal(0, 1, (9, 11, 12)).astype(np.float32)
    geometry = Geometry(size=(12, 11, 9), spacing=(0.9, 0.8, 2.0), origin=(1.0, 2.0, 3.0), direction=_oblique(0.3))
    model = SegModel(network=net, name="toy", spatial_dims=3, in_channels=1, activation="softmax",
                     class_names=["a", "b", "c"], preprocessing=Preprocessing(spacing=(1.7, 1.5, 2.9), divisible_by=1),
                     output="logits")
    labels, _ = predict_image(model, image, geometry, device="cpu")
    x, space = prepare(image, geometry, model.preprocessing, 3)
    with torch.no_grad():
        logits = net(torch.from_numpy(x)[None])[0].numpy()
    expected = np.stack([_interpolated(space, logits[c]) for c in range(3)]).argmax(0)
    np.testing.assert_array_equal(labels, expected)
    assert (_old_labels(space, logits) != labels).any()


def _model(channels: int, activation: str) -> SegModel:
    names = ["background", "fg"] if channels == 1 else ["c%d" % i for i in range(channels)]
    return SegModel(network=torch.nn.Identity(), name="toy", spatial_dims=3, in_channels=1, activation=activation,
                    class_names=names, preprocessing=Preprocessing(), output="logits")


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_label_dtype_holds_many_classes(activation):
    space = _space()
    labels = space.labels_to_image(lambda c: np.full(space.grid.array_shape, float(c == 299), np.float32), 300,
                                   activation)
    assert labels.dtype == np.uint16 and labels.max() == (299 if activation == "softmax" else 300)
