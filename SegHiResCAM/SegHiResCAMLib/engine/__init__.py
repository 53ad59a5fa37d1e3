"""The CAM engine: torch + numpy + standard library only (never Slicer, Qt or VTK).

Main entry points: :func:`explain` (one target, one layer) and :func:`compute_cams` (several targets and
layers from one forward pass); targets in :mod:`.targets` and :mod:`.regions`; methods in :mod:`.methods`.
"""

from .cam import CAMResult, CAMSession, compute_cams, explain
from .hooks import LayerCapture, count_hooks, model_guard, named_layers, resolve_layer
from .layers import LayerInfo, auto_layer, trace_layers
from .methods import DEFAULT_METHOD, METHODS, get_method
from .outputs import main_output
from .postprocess import normalize, upsample  # postprocess(): engine.postprocess.postprocess (the module's name)
from .regions import (ComponentRegion, EmptyRegion, MaskRegion, PredictedRegion, VoxelRegion, WholeRegion,
                      connected_components)
from .targets import (SegmentTarget, class_maps, empty_target, predicted_mask, threshold_target,
                      whole_image_target)
# the ProtoSeg map itself is engine.protoseg.protoseg: re-exported here it would hide the package of that name
from .protoseg import LayerSA, SAReport, Scorer, prototypes, sa_scores, segmentation_ability, unit_maps
from .faithfulness import (Curve, SanityStage, energy_in_region, model_randomization, perturbation_curves,
                      random_target, spearman, target_randomization)

__all__ = [
    "CAMResult", "CAMSession", "compute_cams", "explain", "LayerCapture", "count_hooks", "model_guard", "named_layers",
    "resolve_layer", "LayerInfo", "auto_layer", "trace_layers", "DEFAULT_METHOD", "METHODS", "get_method",
    "main_output", "normalize", "upsample", "ComponentRegion", "EmptyRegion", "MaskRegion",
    "PredictedRegion", "VoxelRegion", "WholeRegion", "connected_components", "SegmentTarget", "class_maps",
    "empty_target", "predicted_mask", "threshold_target", "whole_image_target", "Curve", "SanityStage",
    "energy_in_region", "model_randomization", "perturbation_curves", "random_target", "spearman",
    "target_randomization", "LayerSA", "SAReport", "Scorer", "prototypes", "sa_scores",
    "segmentation_ability", "unit_maps",
]
