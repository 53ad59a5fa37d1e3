"""Faithfulness and sanity metrics for heatmaps of segmentation models (docs/algorithms.md, "Faithfulness checks").

The public entry point of the checks, which live in one module per concern and are re-exported here:

- :mod:`.perturbation`: **deletion / insertion** curves (Petsiuk, Das, Saenko, *RISE*, BMVC 2018) with the
  original region M fixed along the curve, their AUCs normalised by the unperturbed score ``y0``
  (:func:`perturbation_curves`, :class:`Curve`, :func:`baseline_input`, :func:`gaussian_blur`,
  :func:`saliency_order`, :func:`saliency_sets`, :func:`auto_batch_size`), and their shortcuts for whole scans
  (:mod:`.shortcut`: the crop to the target and its receptive field, :func:`target_box`, and bfloat16 passes,
  :func:`resolve_precision`, each used where :func:`choose_stand_in` finds that the model scores the unperturbed
  input on it like the whole input in float32; fewer steps, :data:`DEFAULT_FRACTIONS`, and the quick check's
  point, :func:`placed_fractions`).
- :mod:`.energy`: **energy in the segment**, the fraction of the positive heat inside M (dilated by a max-pool of
  radius r voxels), against the fraction of voxels that M covers (:func:`energy_in_region`,
  :func:`region_fraction`, :func:`dilate`, :func:`region_on_grid`).
- :mod:`.sanity`: **sanity checks** (Adebayo et al., *Sanity checks for saliency maps*, NeurIPS 2018), the
  Spearman rank correlation between the original maps and those of a cascadingly re-initialised copy of the model
  or of a randomised target (:func:`model_randomization`, :func:`target_randomization`, :func:`random_target`,
  :func:`fixed_target`, :func:`spearman`, :func:`rankdata`, :func:`map_correlations`, :func:`parameter_layers`,
  :func:`recording_parameter_layers`, :func:`cascade_stages`, :func:`randomize_modules`, :class:`SanityStage`;
  :class:`UpstreamRecorder` keeps the outputs that a copy randomised from a layer would compute unchanged).

Everything is dimension-generic (1 to 3 spatial axes) and works on the explained target ``y^c_M`` itself.

>>> import torch
>>> spearman(torch.tensor([1., 2., 2., 3.]), torch.tensor([10., 20., 20., 30.]))
1.0
"""

from ..cam import ProgressCallback  # noqa: F401 - the callback type of perturbation_curves / model_randomization
from .energy import dilate, energy_in_region, region_fraction, region_on_grid
from .perturbation import (AUTO_BYTES_PER_VOXEL, BASELINES, BOX_TOLERANCE, MODES, PRECISIONS,  # noqa: F401
                           Curve, StandIn, auto_batch_size, baseline_input, choose_stand_in, gaussian_blur,
                           perturbation_curves, resolve_precision, saliency_order, saliency_sets)
from .shortcut import DEFAULT_FRACTIONS, DEFAULT_MARGIN, MEASURED_ERROR, box_share, placed_fractions, target_box
from .sanity import (RANDOM_TARGETS, SanityStage, UpstreamRecorder, cascade_stages, fixed_target, map_correlations,
                     model_randomization, parameter_layers, random_target, randomize_modules, rankdata,
                     recording_parameter_layers, spearman, target_randomization)

__all__ = [
    "BASELINES", "BOX_TOLERANCE", "Curve", "DEFAULT_FRACTIONS", "DEFAULT_MARGIN", "MEASURED_ERROR", "MODES",
    "PRECISIONS", "RANDOM_TARGETS", "SanityStage", "StandIn", "UpstreamRecorder", "auto_batch_size",
    "baseline_input", "box_share", "cascade_stages", "choose_stand_in", "dilate", "energy_in_region",
    "fixed_target", "gaussian_blur", "map_correlations", "model_randomization", "parameter_layers",
    "perturbation_curves", "placed_fractions", "random_target", "randomize_modules", "rankdata",
    "recording_parameter_layers", "region_fraction", "region_on_grid", "resolve_precision", "saliency_order",
    "saliency_sets", "spearman", "target_box", "target_randomization"
]
