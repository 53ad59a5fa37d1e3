"""Names the GUI, the command line and the engine share, without importing torch.

The Slicer module reads this file while torch may not be installed yet, and the command line builds its
choices from it. Adding a CAM method is one file in ``engine/methods/`` plus one :data:`METHODS` row here: the
engine builds its method table from these rows (:func:`SegHiResCAMLib.engine.methods.get_method`).

Example:
    >>> from SegHiResCAMLib import catalog
    >>> catalog.DEFAULT_METHOD in catalog.method_names()
    True
    >>> catalog.method("seg-xres-cam").options
    ('pool_size',)
"""

from typing import NamedTuple, Tuple


class MethodInfo(NamedTuple):
    """One CAM method: its name, where its class lives, and what the callers need to know about it."""

    name: str
    #: ``module:Class`` inside ``SegHiResCAMLib.engine.methods``
    implementation: str
    #: the map is a sum of per-voxel terms (no channel statistics over the layer grid), so windows add up
    elementwise: bool
    #: constructor options the method takes (the command line offers a flag for each)
    options: Tuple[str, ...]
    summary: str


#: every CAM method, the default first
METHODS: Tuple[MethodInfo, ...] = (
    MethodInfo("seg-hires-grad-cam", "seg_hires_grad_cam:SegHiResGradCAM", True, (),
               "sum_k G_k * A_k, element-wise gradient x activation (Rheude et al. 2024)"),
    MethodInfo("seg-grad-cam", "seg_grad_cam:SegGradCAM", False, (),
               "sum_k mean(G_k) A_k (Vinogradova et al. 2020)"),
    MethodInfo("seg-xres-cam", "seg_xres_cam:SegXResCAM", False, ("pool_size",),
               "gradient average-pooled in windows of pool_size (Hasany et al. 2023)"),
    MethodInfo("grad-cam++", "grad_cam_pp:GradCAMPlusPlus", False, (), "Grad-CAM++ (Chattopadhay et al. 2018)"),
    MethodInfo("layer-cam", "layer_cam:LayerCAM", True, (), "sum_k ReLU(G_k) * A_k (Jiang et al. 2021)"),
    MethodInfo("xgrad-cam", "xgrad_cam:XGradCAM", False, (), "XGrad-CAM (Fu et al. 2020)"),
)

#: Seg-HiRes-Grad CAM (Rheude et al. 2024), the method the faithfulness study supports
DEFAULT_METHOD = METHODS[0].name

#: what the explained score is computed from
SCORES = ("logits", "probabilities")
#: how the score is reduced over the explained region M
REDUCTIONS = ("sum", "mean")
#: map normalisation after upsampling
NORMALIZATIONS = ("max", "minmax", "none")
#: 2D models on 3D scans: each slice's map divided by its own maximum (docs/slice_models.md)
PER_SLICE = "per-slice"
#: the slice directions of a 2D model on a 3D scan, the default first
SLICE_AXES = ("axial", "coronal", "sagittal")
#: how windows of a large scan are blended
BLENDS = ("constant", "gaussian")
#: compute devices
DEVICES = ("auto", "cpu", "cuda")
#: what the Slicer module can explain ("errors": the prediction's errors against a reference segment)
TARGET_KINDS = ("prediction", "segment", "point", "errors")
#: the model's errors against a reference: false positives, false negatives (docs/algorithms.md, "Error targets")
ERROR_KINDS = ("fp", "fn")
#: the model's own choice of layer
AUTO_LAYER = "auto"


def method_names() -> Tuple[str, ...]:
    """Every method name, the default first."""
    return tuple(m.name for m in METHODS)


def method(name: str) -> MethodInfo:
    """The row of one method; ``KeyError`` for an unknown name (callers turn it into their own error)."""
    for info in METHODS:
        if info.name == name:
            return info
    raise KeyError(name)
