"""MONAI networks by name, MONAI bundles and nnU-Net v2 folders: built, weighted, preprocessed and explained as
the eager networks they describe (tiny networks, real MONAI / dynamic_network_architectures classes)."""

import fractions
import json
import os

import numpy as np
import pytest
import SimpleITK as sitk
import torch

# installed by `make test` (monai; dynamic-network-architectures with --no-deps, as its timm would pull torchvision):
# a missing one is an error here, not a silent skip of the module
import dynamic_network_architectures.architectures.unet as dna_unet
import monai.networks.nets as monai_nets
from monai import transforms

from SegHiResCAMLib.engine import SegmentTarget, WholeRegion, explain
from SegHiResCAMLib.errors import ModelError
from SegHiResCAMLib.geometry import Geometry
from SegHiResCAMLib.imaging.conversion import to_sitk
from SegHiResCAMLib.models import load_model
from SegHiResCAMLib.models.monai import bundle as monai_bundle
from SegHiResCAMLib.models.nnunet import loader as nnunet
from SegHiResCAMLib.models.base import Preprocessing
from SegHiResCAMLib.analysis.explain import TargetSpec, explain_image, predict_image
from SegHiResCAMLib.imaging.model_space import normalize_intensities, prepare

WHOLE1 = SegmentTarget(1, WholeRegion())


def _same_network(a, b, x):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.allclose(a(x), b(x), atol=1e-6, rtol=0)


def _same_explanation(a, b, x, layer, target=WHOLE1):
    ra, rb = explain(a, x, target, layer=layer), explain(b, x, target, layer=layer)
    assert ra.layer == rb.layer
    assert not bool(ra.flat[0])
    assert float(ra.map.max()) == pytest.approx(1.0)
    assert torch.allclose(ra.map, rb.map, atol=1e-6, rtol=0)
    assert torch.allclose(ra.raw, rb.raw, atol=1e-6, rtol=0)
    return ra


# ------------------------------------------------------------------------------------------- MONAI bundle

def _bundle_unet():
    torch.manual_seed(1)
    return monai_nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,),
                           num_res_units=0).eval()


def _write_bundle(folder, net, in_channels=1, scale=None):
    scale = scale or {"a_min": -57, "a_max": 164, "b_min": 0.0, "b_max": 1.0, "clip": True}
    config = {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "in_channels": in_channels,
        "network_def": {"_target_": "UNet", "spatial_dims": 3, "in_channels": "@in_channels", "out_channels": 2,
                        "channels": [4, 8], "strides": [2], "num_res_units": 0},
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.0, 2.0], "mode": "bilinear"},
            dict({"_target_": "ScaleIntensityRanged", "keys": "image"}, **scale),
            {"_target_": "EnsureTyped", "keys": "image"}]},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16], "sw_batch_size": 4, "overlap": 0.5},
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True}]},
    }
    metadata = {"version": "0.1.0", "network_data_format": {
        "inputs": {"image": {"type": "image", "num_channels": 1, "spatial_shape": [16, 16, 16]}},
        "outputs": {"pred": {"type": "image", "num_channels": 2, "channel_def": {"0": "background", "1": "spleen"}}}}}
    os.makedirs(os.path.join(folder, "configs"))
    os.makedirs(os.path.join(folder, "models"))
    with open(os.path.join(folder, "configs", "inference.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(folder, "configs", "metadata.json"), "w") as f:
        json.dump(metadata, f)
    torch.save(net.state_dict(), os.path.join(folder, "models", "model.pt"))
    return config


def test_bundle_loads_maps_preprocessing_and_explains_like_the_eager_network(tmp_path):
    net = _bundle_unet()
    folder = str(tmp_path / "spleen_bundle")
    _write_bundle(folder, net)
    model = load_model(folder)
    prep = model.preprocessing
    # MONAI (x, y, z) arrays oriented RAS == SimpleITK images oriented SAR read as (z, y, x) arrays
    assert prep.orientation == "SAR"
    assert prep.spacing == (2.0, 1.0, 1.5)  # pixdim (MONAI axis order) reversed into ITK order
    assert prep.normalization == "ct" and prep.ct_window == (-57.0, 164.0)
    assert prep.divisible_by == 2 and prep.min_size == (16, 16, 16)
    assert model.patch_size == (16, 16, 16)
    assert model.class_names == ["background", "spleen"] and model.activation == "softmax"
    assert model.in_channels == 1 and model.spatial_dims == 3
    assert os.path.join(folder, "models", "model.pt") in model.file_hashes
    x = torch.randn(1, 1, 16, 12, 8)
    _same_network(model.network, net, x)
    _same_explanation(model.network, net, x, "model.1.submodule")


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own notice about Orientationd's labels default
def test_bundle_orientation_and_spacing_match_monai_transforms(tmp_path):
    """The mapped preprocessing gives MONAI's own array (exactly without resampling) and MONAI's voxel axes."""
    rng = np.random.default_rng(0)
    image = (rng.random((12, 10, 8)) * 400 - 100).astype(np.float32)
    direction = np.array([[0, 0, 1], [1, 0, 0], [0, -1, 0]], float)  # an oblique-free but permuted orientation
    geom = Geometry(size=(8, 10, 12), spacing=(1.0, 2.0, 3.0), origin=(1.0, 2.0, 3.0),
                    direction=tuple(direction.ravel()))
    path = str(tmp_path / "scan.nii.gz")
    sitk.WriteImage(to_sitk(image, geom), path)
    steps = [("LoadImaged", {"keys": "image"}), ("EnsureChannelFirstd", {"keys": "image"}),
             ("Orientationd", {"keys": "image", "axcodes": "RAS"}),
             ("ScaleIntensityRanged", {"keys": "image", "a_min": -57, "a_max": 164, "b_min": -1.0, "b_max": 2.0,
                                       "clip": False})]
    fields, _ = monai_bundle.map_preprocessing(steps, 3, 1)
    assert fields.pop("_oriented") is True
    assert fields["normalization"] == "range" and fields["output_range"] == (-1.0, 2.0) and fields["clip"] is False
    ours, space = prepare(image, geom, Preprocessing(**fields), 3)
    pipeline = transforms.Compose([
        transforms.LoadImaged("image", reader="NibabelReader"), transforms.EnsureChannelFirstd("image"),
        transforms.Orientationd("image", axcodes="RAS"),
        transforms.ScaleIntensityRanged("image", a_min=-57, a_max=164, b_min=-1.0, b_max=2.0, clip=False)])
    theirs = pipeline({"image": path})["image"]
    assert tuple(theirs.shape) == ours.shape
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5, rtol=0)
    # with resampling: the same physical axes and voxel sizes (MONAI axis m = our ITK axis 2 - m)
    steps.insert(3, ("Spacingd", {"keys": "image", "pixdim": [1.5, 2.5, 1.25]}))
    fields, _ = monai_bundle.map_preprocessing(steps, 3, 1)
    fields.pop("_oriented")
    assert fields["spacing"] == (1.25, 2.5, 1.5)
    ours, space = prepare(image, geom, Preprocessing(**fields), 3)
    pipeline = transforms.Compose([
        transforms.LoadImaged("image", reader="NibabelReader"), transforms.EnsureChannelFirstd("image"),
        transforms.Orientationd("image", axcodes="RAS"), transforms.Spacingd("image", pixdim=[1.5, 2.5, 1.25])])
    theirs = pipeline({"image": path})["image"]
    affine = theirs.affine.numpy()
    ras = space.grid.ijk_to_ras()
    for m in range(3):
        np.testing.assert_allclose(affine[:3, m], ras[:3, 2 - m], atol=1e-6)
    assert all(abs(a - b) <= 1 for a, b in zip(theirs.shape[1:], ours.shape[1:]))


def test_range_normalization_equals_monai_scale_intensity_range():
    values = np.linspace(-300, 400, 71, dtype=np.float32).reshape(71, 1, 1)
    for clip in (True, False):
        prep = Preprocessing(normalization="range", intensity_range=(-57, 164), output_range=(-1.0, 2.0), clip=clip)
        theirs = transforms.ScaleIntensityRange(-57, 164, -1.0, 2.0, clip=clip)(values)
        np.testing.assert_allclose(normalize_intensities(values, prep), np.asarray(theirs), atol=1e-5)


def test_bundle_with_code_is_refused_without_trust_and_built_by_monai_with_trust(tmp_path):
    net = _bundle_unet()
    folder = str(tmp_path / "code_bundle")
    config = _write_bundle(folder, net)
    marker = tmp_path / "code_ran"
    config["network_def"]["out_channels"] = "$__import__('pathlib').Path(%r).touch() or 2" % str(marker)
    with open(os.path.join(folder, "configs", "inference.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ModelError, match="would execute code.*--trust-model"):
        load_model(folder)
    assert not marker.exists()
    model = load_model(folder, trust_model=True)
    assert marker.exists()  # MONAI's ConfigParser evaluated the expression: exactly why it needs trust
    x = torch.randn(1, 1, 8, 8, 8)
    _same_network(model.network, net, x)
    assert model.preprocessing.orientation == "SAR" and model.class_names == ["background", "spleen"]


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own notice about Orientationd's labels default
def test_bundle_macros_and_trusted_preprocessing(tmp_path):
    net = _bundle_unet()
    folder = str(tmp_path / "macro_bundle")
    config = _write_bundle(folder, net)
    with open(os.path.join(folder, "configs", "common.json"), "w") as f:
        json.dump({"net": {"channels": [4, 8], "strides": [2]}, "window": [-57, 164]}, f)
    config["network_def"]["channels"] = "%configs/common.json#net#channels"
    config["network_def"]["strides"] = "%configs/common.json::net::strides"
    scale = config["preprocessing"]["transforms"][4]
    scale["a_min"] = "%configs/common.json#window#0"
    with open(os.path.join(folder, "configs", "inference.json"), "w") as f:
        json.dump(config, f)
    model = load_model(folder)
    _same_network(model.network, net, torch.randn(1, 1, 8, 8, 8))
    assert model.preprocessing.ct_window == (-57.0, 164.0)
    # a $ expression in the preprocessing: refused, or evaluated by MONAI and mapped from the built transforms
    scale["a_min"] = "$-50 - 7"
    config["preprocessing"]["transforms"][3]["pixdim"] = "$[1.5, 1.0, 2.0]"
    with open(os.path.join(folder, "configs", "inference.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ModelError, match="would execute code.*preprocessing"):
        load_model(folder)
    trusted = load_model(folder, trust_model=True)
    assert trusted.preprocessing.orientation == "SAR" and trusted.preprocessing.spacing == (2.0, 1.0, 1.5)
    assert trusted.preprocessing.normalization == "ct" and trusted.preprocessing.ct_window == (-57.0, 164.0)
    assert trusted.preprocessing.divisible_by == 2


def test_bundle_refusals(tmp_path):
    net = _bundle_unet()
    folder = str(tmp_path / "b")
    config = _write_bundle(folder, net)
    config["network_def"]["_target_"] = "torch.nn.Conv3d"
    with open(os.path.join(folder, "configs", "inference.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ModelError, match="not a network of monai.networks.nets"):
        load_model(folder)
    config["network_def"]["_target_"] = "monai.networks.nets.UNet"
    config["preprocessing"]["transforms"].append({"_target_": "Resized", "keys": "image", "spatial_size": [8, 8, 8]})
    with open(os.path.join(folder, "configs", "inference.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ModelError, match="Resized cannot be reproduced"):
        load_model(folder)
    os.remove(os.path.join(folder, "models", "model.pt"))
    with pytest.raises(ModelError, match="no weights"):
        load_model(folder)


# ----------------------------------------------------------------------------------------- MONAI by name

NAMED = [
    ("UNet", {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2],
              "num_res_units": 1}, 2, "model.1.submodule"),
    ("SegResNet", {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_filters": 4, "blocks_down": [1, 1],
                   "blocks_up": [1], "norm": ["GROUP", {"num_groups": 2}]}, 2, "up_layers.0"),
    ("DynUNet", {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "kernel_size": [3, 3, 3],
                 "strides": [1, 2, [2, 2, 1]], "upsample_kernel_size": [2, [2, 2, 1]], "filters": [4, 8, 16]},
     4, "upsamples.1"),
    ("SwinUNETR", {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "feature_size": 12, "depths": [1, 1, 1, 1],
                   "num_heads": [1, 1, 1, 1], "window_size": 2}, 32, "decoder1"),
]


@pytest.mark.parametrize("name,args,multiple,layer", NAMED, ids=[n[0] for n in NAMED])
def test_monai_network_by_name_loads_and_explains(tmp_path, name, args, multiple, layer):
    torch.manual_seed(2)
    eager = getattr(monai_nets, name)(**args).eval()
    with torch.no_grad():  # move every parameter off its initial value so that loading is visible
        for p in eager.parameters():
            p.add_(0.05 * torch.randn_like(p))
    weights = str(tmp_path / ("%s.pt" % name))
    torch.save(eager.state_dict(), weights)
    model = load_model("monai:" + name, weights=weights, model_args=json.dumps(args))
    assert model.preprocessing.divisible_by == multiple
    assert model.num_classes == args["out_channels"] and model.in_channels == 1 and model.spatial_dims == 3
    assert os.path.abspath(weights) in model.file_hashes
    # SwinUNETR: its bottleneck (1/32) instance norm needs more than one voxel, hence 64 along one axis
    x = torch.randn(1, 1, 64, 32, 32) if multiple == 32 else torch.randn(1, 1, 8, 12, 8)
    _same_network(model.network, eager, x)
    _same_explanation(model.network, eager, x, layer)
    # the whole path on an image whose size is no multiple: padded by the model's divisible_by
    shape = (40, 20, 12) if multiple == 32 else (9, 7, 6)
    image = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    result = explain_image(model, image, Geometry.identity(shape), [TargetSpec(class_index=1, whole=True)],
                           layers=layer, device="cpu")
    heat = result.heatmaps[0].array
    assert heat.shape == shape and heat.dtype == np.float32 and np.isfinite(heat).all()
    assert 0.0 <= heat.min() and heat.max() <= 1.0 + 1e-6 and heat.max() > 0.0
    assert result.space.grid.array_shape == tuple(int(np.ceil(s / multiple) * multiple) for s in shape)


def test_monai_network_errors():
    with pytest.raises(ModelError, match="did you mean UNet"):
        load_model("monai:UNte", model_args={})
    with pytest.raises(ModelError, match="missing .* required"):
        load_model("monai:UNet", model_args={"spatial_dims": 3})
    with pytest.raises(ModelError, match="JSON object"):
        load_model("monai:UNet", model_args="[1, 2]")


# ----------------------------------------------------------------------------------------------- nnU-Net

ARCH_KWARGS = {
    "n_stages": 3, "features_per_stage": [4, 8, 16], "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2]],
    "n_conv_per_stage": [1, 1, 1], "n_conv_per_stage_decoder": [1, 1], "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
}
CT_PROPS = {"max": 1500.0, "mean": 99.5, "median": 101.0, "min": -1024.0, "percentile_00_5": -958.0,
            "percentile_99_5": 327.0, "std": 137.1}
LABELS = {"background": 0, "liver": 1, "tumor": 2}


def _plans(transpose=(0, 1, 2), schemes=("CTNormalization",), masks=(False,), old_format=False):
    fullres = {
        "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor", "batch_size": 2,
        "patch_size": [8, 16, 16], "median_image_size_in_voxels": [60.0, 120.0, 120.0], "spacing": [2.0, 1.0, 1.5],
        "normalization_schemes": list(schemes), "use_mask_for_norm": list(masks),
        "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
        "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                         "arch_kwargs": ARCH_KWARGS,
                         "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]},
        "batch_dice": False,
    }
    if old_format:
        del fullres["architecture"]
        fullres.update(UNet_class_name="PlainConvUNet", UNet_base_num_features=4, unet_max_num_features=16,
                       n_conv_per_stage_encoder=[1, 1, 1], n_conv_per_stage_decoder=[1, 1],
                       num_pool_per_axis=[1, 2, 2], pool_op_kernel_sizes=ARCH_KWARGS["strides"],
                       conv_kernel_sizes=ARCH_KWARGS["kernel_sizes"])
    backward = [list(transpose).index(i) for i in range(3)]
    return {
        "dataset_name": "Dataset042_Tiny", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [2.0, 1.0, 1.5], "original_median_shape_after_transp": [60, 120, 120],
        "image_reader_writer": "SimpleITKIO", "transpose_forward": list(transpose), "transpose_backward": backward,
        "configurations": {
            "3d_fullres": fullres,
            "3d_lowres": {"inherits_from": "3d_fullres", "spacing": [4.0, 2.0, 3.0],
                          "next_stage": "3d_cascade_fullres"},
            "3d_cascade_fullres": {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"},
        },
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {str(c): dict(CT_PROPS, mean=CT_PROPS["mean"] + c)
                                                        for c in range(len(schemes))},
    }


def _nnunet_network(in_channels=1, classes=3, deep_supervision=True, kwargs=None):
    kwargs = dict(kwargs or ARCH_KWARGS)
    for key in ("conv_op", "norm_op", "nonlin"):
        kwargs[key] = {"torch.nn.modules.conv.Conv3d": torch.nn.Conv3d, "torch.nn.LeakyReLU": torch.nn.LeakyReLU,
                       "torch.nn.modules.instancenorm.InstanceNorm3d": torch.nn.InstanceNorm3d}[kwargs[key]]
    return dna_unet.PlainConvUNet(input_channels=in_channels, num_classes=classes, deep_supervision=deep_supervision,
                                  **kwargs)


def _write_nnunet(root, plans, labels=None, channels=None, extra=None, folder_name=None):
    """A trained-model folder laid out, and a checkpoint saved, the way nnUNetTrainer does it."""
    labels = labels or LABELS
    channels = channels or {"0": "CT"}
    dataset = {"channel_names": channels, "labels": labels, "numTraining": 4, "file_ending": ".nii.gz"}
    heads = len(labels) if not any(isinstance(v, list) for v in labels.values()) else len(labels) - 1
    torch.manual_seed(4)
    net = _nnunet_network(len(channels), heads)  # trained with deep supervision, as nnU-Net trains
    net.apply(net.initialize)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = os.path.join(str(root), folder_name or "nnUNetTrainer__nnUNetPlans__3d_fullres")
    os.makedirs(os.path.join(folder, "fold_0"))
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dataset, f)
    with open(os.path.join(folder, "plans.json"), "w") as f:
        json.dump(plans, f)
    checkpoint = {
        "network_weights": net.state_dict(),
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.99, "nesterov": True,
                                                           "weight_decay": 3e-05, "params": [0, 1]}]},
        "grad_scaler_state": None,
        "logging": {"mean_fg_dice": [np.float64(0.41)], "ema_fg_dice": [np.float64(0.41)],
                    "dice_per_class_or_region": [[np.float32(0.3), np.float32(0.5)]],
                    "train_losses": [np.float64(-0.2)], "val_losses": [np.float64(-0.1)], "lrs": [0.01],
                    "epoch_start_timestamps": [1.7e9], "epoch_end_timestamps": [1.7e9 + 60]},
        "_best_ema": np.float64(0.41), "current_epoch": 1000,
        "init_args": {"plans": plans, "configuration": "3d_fullres", "fold": 0, "dataset_json": dataset,
                      "device": torch.device("cpu")},
        "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2),
    }
    checkpoint.update(extra or {})
    torch.save(checkpoint, os.path.join(folder, "fold_0", "checkpoint_final.pth"))
    return folder, net


def _eager(net, classes=3, in_channels=1):
    eager = _nnunet_network(in_channels, classes, deep_supervision=False)
    eager.load_state_dict(net.state_dict())
    return eager.eval()


def test_nnunet_folder_builds_the_network_and_explains_like_it(tmp_path):
    folder, net = _write_nnunet(tmp_path, _plans())
    with pytest.raises(Exception, match="(?i)weights only load failed"):  # why the numpy allow-list is needed
        torch.load(os.path.join(folder, "fold_0", "checkpoint_final.pth"), weights_only=True)
    model = load_model(folder)
    assert type(model.network).__name__ == "PlainConvUNet"
    assert model.network.decoder.deep_supervision is False  # one full-resolution output
    eager = _eager(net)
    x = torch.randn(1, 1, 8, 16, 16)
    _same_network(model.network, eager, x)
    with torch.no_grad():
        assert torch.is_tensor(model.network(x)) and model.network(x).shape == (1, 3, 8, 16, 16)
    _same_explanation(model.network, eager, x, "decoder.stages.0", SegmentTarget(2, WholeRegion()))
    _same_explanation(model.network, eager, x, "encoder.stages.2")
    assert model.class_names == ["background", "liver", "tumor"] and model.activation == "softmax"
    assert "nnUNetTrainer" in model.source and "epoch 1000" in model.source and "fold_0" in model.source


def test_nnunet_preprocessing_follows_the_plans(tmp_path):
    folder, _ = _write_nnunet(tmp_path, _plans())
    model = load_model(folder)
    prep = model.preprocessing
    assert prep.spacing == (1.5, 1.0, 2.0)  # plans spacing [2.0, 1.0, 1.5] is (z, y, x): ITK order is (x, y, z)
    assert model.patch_size == (8, 16, 16) and prep.min_size == (8, 16, 16)  # array order, as nnU-Net's
    assert prep.divisible_by == 4  # strides: z 1*1*2 = 2, y and x 1*2*2 = 4
    assert prep.orientation is None
    assert prep.normalization == "clip-zscore"
    assert prep.intensity_range == (-958.0, 327.0) and prep.mean_std == (99.5, 137.1)
    values = np.array([-2000.0, -958.0, 0.0, 99.5, 500.0], dtype=np.float32)
    np.testing.assert_allclose(normalize_intensities(values, prep), (np.clip(values, -958.0, 327.0) - 99.5) / 137.1, rtol=1e-6)


def test_nnunet_per_channel_normalization(tmp_path):
    plans = _plans(schemes=("CTNormalization", "ZScoreNormalization"), masks=(False, True))
    folder, net = _write_nnunet(tmp_path, plans, channels={"0": "CT", "1": "PET"})
    model = load_model(folder)
    assert model.in_channels == 2
    ct, pet = model.preprocessing.channels
    assert ct.normalization == "clip-zscore" and ct.mean_std == (99.5, 137.1)
    assert pet.normalization == "zscore-nonzero"
    rng = np.random.default_rng(5)
    image = np.stack([rng.normal(0, 500, (4, 5, 6)), np.where(rng.random((4, 5, 6)) > 0.3, rng.normal(3, 2, (4, 5, 6)),
                                                              0.0)], axis=-1).astype(np.float32)
    out = normalize_intensities(image, model.preprocessing)
    np.testing.assert_allclose(out[..., 0], (np.clip(image[..., 0], -958.0, 327.0) - 99.5) / 137.1, rtol=1e-5)
    inside = image[..., 1] != 0
    expect = (image[..., 1] - image[..., 1][inside].mean()) / image[..., 1][inside].std()
    np.testing.assert_allclose(out[..., 1][inside], expect[inside], rtol=1e-4, atol=1e-5)
    assert (out[..., 1][~inside] == 0).all()
    x = torch.randn(1, 2, 8, 16, 16)
    _same_network(model.network, _eager(net, in_channels=2), x)


def test_nnunet_predict_image_on_a_small_image(tmp_path):
    folder, net = _write_nnunet(tmp_path, _plans())
    model = load_model(folder)
    shape = (10, 20, 18)  # z, y, x: smaller than the patch along no axis, not a multiple of 4
    rng = np.random.default_rng(6)
    image = rng.normal(50, 200, shape).astype(np.float32)
    geom = Geometry(size=shape[::-1], spacing=(1.5, 1.0, 2.0), origin=(-10.0, 5.0, 2.0),
                    direction=(1, 0, 0, 0, 1, 0, 0, 0, 1))
    labels, meta = predict_image(model, image, geom, device="cpu")
    assert labels.shape == shape and set(np.unique(labels)) <= {0, 1, 2}
    # nnU-Net itself on the same input: its CT normalisation (the spacing is the plans'), then its Gaussian sliding
    # window (patch 8 x 16 x 16, step 0.5: 8 windows), arg-max
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    plans = PlansManager(_plans())
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    with open(os.path.join(folder, "dataset.json")) as handle:
        dataset = json.load(handle)
    predictor.manual_initialization(_eager(net), plans, plans.get_configuration("3d_fullres"), None, dataset,
                                    "nnUNetTrainer", None)
    x = (np.clip(image, -958.0, 327.0) - 99.5) / 137.1
    logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(x.astype(np.float32))[None])
    expect = logits.float().argmax(0).numpy()
    assert meta["inference"]["windows"] == 8
    np.testing.assert_array_equal(labels, expect)
    assert len(np.unique(labels)) > 1
    assert meta["model"]["preprocessing"]["spacing"] == [1.5, 1.0, 2.0]


@pytest.mark.parametrize("transpose", [(2, 0, 1), (1, 2, 0)])
def test_nnunet_transpose_forward_equals_nnunets_transpose(tmp_path, transpose):
    plans = _plans(transpose=transpose)
    folder, net = _write_nnunet(tmp_path, plans)
    model = load_model(folder)
    x = torch.randn(1, 1, 8, 12, 16)  # our array order; nnU-Net transposes it before its network
    x_t = x.permute(0, 1, *[2 + a for a in transpose])
    with torch.no_grad():
        logits_t = _eager(net)(x_t.contiguous())
        expect = logits_t.permute(0, 1, *[2 + a for a in plans["transpose_backward"]])
        assert torch.allclose(model.network(x), expect, atol=1e-5, rtol=0)
    # spacing/patch of the plans are in transposed order: array axis transpose[i] has plans entry i
    spacing_array = [None] * 3
    patch = [None] * 3
    for i, axis in enumerate(transpose):
        spacing_array[axis] = [2.0, 1.0, 1.5][i]
        patch[axis] = [8, 16, 16][i]
    assert model.preprocessing.spacing == tuple(spacing_array[::-1])
    assert model.patch_size == tuple(patch)
    res = explain(model.network, x, SegmentTarget(1, WholeRegion()), layer="decoder.stages.1")
    assert res.map.shape == (1, 8, 12, 16) and not bool(res.flat[0])


def test_nnunet_2d_configuration_runs_on_2d_images(tmp_path):
    plans = _plans(transpose=(0, 2, 1))
    kwargs2d = dict(ARCH_KWARGS, conv_op="torch.nn.modules.conv.Conv2d", kernel_sizes=[[3, 3], [3, 3], [3, 3]],
                    strides=[[1, 1], [2, 2], [2, 1]], norm_op="torch.nn.modules.instancenorm.InstanceNorm2d")
    plans["configurations"]["2d"] = dict(plans["configurations"]["3d_fullres"], patch_size=[16, 12],
                                         spacing=[1.0, 1.5], data_identifier="nnUNetPlans_2d")
    plans["configurations"]["2d"]["architecture"] = dict(plans["configurations"]["3d_fullres"]["architecture"],
                                                         arch_kwargs=kwargs2d)
    folder, _ = _write_nnunet(tmp_path, plans, folder_name="nnUNetTrainer__nnUNetPlans__2d")
    torch.manual_seed(7)
    net2d = dna_unet.PlainConvUNet(input_channels=1, num_classes=3, deep_supervision=False, **dict(
        kwargs2d, conv_op=torch.nn.Conv2d, norm_op=torch.nn.InstanceNorm2d, nonlin=torch.nn.LeakyReLU)).eval()
    path = os.path.join(folder, "fold_0", "checkpoint_final.pth")
    checkpoint = torch.load(path, weights_only=False)
    checkpoint.update(network_weights=net2d.state_dict(), init_args=dict(checkpoint["init_args"], configuration="2d"))
    torch.save(checkpoint, path)
    model = load_model(folder)
    assert model.spatial_dims == 2 and type(model.network.encoder.stages[0][0].convs[0].conv).__name__ == "Conv2d"
    # 2D axes are the last two of nnU-Net's (z, y, x) after transpose_forward (0, 2, 1): they are swapped
    assert model.patch_size == (12, 16) and model.preprocessing.spacing == (1.0, 1.5)
    x = torch.randn(1, 1, 8, 12)
    with torch.no_grad():
        expect = net2d(x.transpose(2, 3).contiguous()).transpose(2, 3)
        assert torch.allclose(model.network(x), expect, atol=1e-5, rtol=0)
    labels, _ = predict_image(model, np.random.default_rng(8).normal(size=(9, 13)).astype(np.float32),
                              Geometry.identity((9, 13)), device="cpu")
    assert labels.shape == (9, 13)


def test_nnunet_old_plans_format_builds_the_same_network(tmp_path):
    folder, net = _write_nnunet(tmp_path, _plans(old_format=True))
    model = load_model(folder)
    _same_network(model.network, _eager(net), torch.randn(1, 1, 8, 16, 16))


def test_nnunet_regions_use_sigmoid(tmp_path):
    labels = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": 3}
    plans = _plans(schemes=("ZScoreNormalization",), masks=(True,))
    folder, net = _write_nnunet(tmp_path, plans, labels=labels)
    with open(os.path.join(folder, "dataset.json")) as f:
        dataset = json.load(f)
    dataset["regions_class_order"] = [1, 2, 3]
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dataset, f)
    model = load_model(folder)
    assert model.activation == "sigmoid"
    assert model.class_names == ["whole tumor", "tumor core", "enhancing tumor"]
    assert model.preprocessing.normalization == "zscore-nonzero"
    _same_network(model.network, _eager(net, classes=3), torch.randn(1, 1, 8, 16, 16))


def test_nnunet_options_and_refusals(tmp_path):
    folder, net = _write_nnunet(tmp_path, _plans(), folder_name="nnUNetTrainer__nnUNetPlans__3d_lowres")
    # the checkpoint says 3d_fullres; the configuration option wins; the cascade's second stage is refused
    assert load_model(folder).preprocessing.spacing == (1.5, 1.0, 2.0)
    assert load_model(folder, model_args={"configuration": "3d_lowres"}).preprocessing.spacing == (3.0, 2.0, 4.0)
    with pytest.raises(ModelError, match="cascade"):
        load_model(folder, configuration="3d_cascade_fullres")
    with pytest.raises(ModelError, match="fold 3 not found.*folds present: 0"):
        load_model(folder, fold=3)
    with pytest.raises(ModelError, match="checkpoint_best.pth does not exist; present: checkpoint_final.pth"):
        load_model(folder, checkpoint="checkpoint_best.pth")
    with pytest.raises(ModelError, match="only the options"):
        load_model(folder, model_args={"folds": 1})


def test_nnunet_checkpoint_with_other_objects_needs_trust(tmp_path):
    folder, net = _write_nnunet(tmp_path, _plans(), extra={"note": fractions.Fraction(1, 3)})
    with pytest.raises(ModelError, match="fractions.Fraction.*--trust-model"):
        load_model(folder)
    model = load_model(folder, trust_model=True)
    _same_network(model.network, _eager(net), torch.randn(1, 1, 8, 16, 16))


def test_nnunet_checkpoint_written_under_numpy_1(tmp_path):
    """numpy 1 pickles scalars as numpy.core.multiarray.scalar (numpy 2: numpy._core...): both are allowed."""
    import zipfile
    path, old = str(tmp_path / "np2.pth"), str(tmp_path / "np1.pth")
    torch.save({"network_weights": {"w": torch.ones(2)}, "_best_ema": np.float64(0.5), "dt": np.dtype("float32")}, path)
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(old, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(item, data)
    assert "numpy.core.multiarray.scalar" in torch.serialization.get_unsafe_globals_in_checkpoint(old)
    checkpoint = nnunet.load_nnunet_checkpoint(old)
    assert checkpoint["_best_ema"] == 0.5 and checkpoint["dt"] == np.dtype("float32")
    assert torch.equal(checkpoint["network_weights"]["w"], torch.ones(2))
    with open(path, "r+b") as f:  # truncated: a clear error, not a traceback from torch
        f.truncate(200)
    with pytest.raises(ModelError, match="corrupt, truncated or not a PyTorch file"):
        nnunet.load_nnunet_checkpoint(path)


def test_nnunet_plans_cannot_import_arbitrary_objects(tmp_path):
    plans = _plans()
    plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"] = dict(ARCH_KWARGS, nonlin="os.system")
    folder, _ = _write_nnunet(tmp_path, plans)
    with pytest.raises(ModelError, match="'os.system'.*torch.nn or dynamic_network_architectures"):
        load_model(folder)
    plans["configurations"]["3d_fullres"]["architecture"]["network_class_name"] = "subprocess.Popen"
    with open(os.path.join(folder, "plans.json"), "w") as f:
        json.dump(plans, f)
    with pytest.raises(ModelError, match="subprocess.Popen"):
        load_model(folder)
