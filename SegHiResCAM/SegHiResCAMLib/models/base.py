"""A model as SegHiResCAM sees it: the network plus how it wants its input (torch only, no file formats).

Everything the engine needs to run a network *in model space* and map results back to the user's grid is
declared here, explicitly, instead of being guessed per call.
"""

import itertools
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

from torch import nn

from ..errors import InputError

NORMALIZATIONS = ("none", "zscore", "zscore-nonzero", "minmax", "ct", "range", "clip-zscore")
#: what a network returns: logits, probabilities of a final sigmoid/softmax, or ``auto`` (detected)
OUTPUTS = ("auto", "logits", "sigmoid", "softmax")


def _orientation_codes() -> Tuple[str, ...]:
    """Every code ``DICOMOrient`` accepts: one letter of R/L, A/P, S/I per axis, in any axis order (48)."""
    codes = []
    for order in itertools.permutations((("R", "L"), ("A", "P"), ("S", "I"))):
        codes.extend("".join(letters) for letters in itertools.product(*order))
    return tuple(sorted(codes))


#: ``None``/``keep`` (no reorientation), the common codes first, then every other valid 3-letter code (e.g.
#: ``SAR``, which MONAI's ``Orientationd(axcodes="RAS")`` needs, see ``models/monai_models.py``)
ORIENTATIONS = (None, "keep", "RAS", "LPS", "LAS", "RAI") + tuple(
    c for c in _orientation_codes() if c not in ("RAS", "LPS", "LAS", "RAI"))


@dataclass
class Preprocessing:
    """How a network wants its input, in the order the steps are applied.

    Attributes:
        orientation: reorient the voxel axes to this anatomical code before anything else (e.g. ``"RAS"``:
            first axis towards Right... as SimpleITK's DICOMOrient uses it), or ``None`` to keep the image's axes.
        spacing: target voxel size in mm, ITK order ``(x, y, z)``; ``None`` keeps the image spacing.
        normalization: ``none``; ``zscore`` (all voxels); ``zscore-nonzero`` (statistics over non-zero voxels,
            zero voxels stay 0, as brain MRI models expect); ``minmax`` to [0, 1]; ``ct`` (clip to
            ``ct_window`` then scale to [0, 1]).
        ct_window: ``(low, high)`` HU window for ``ct``.
        divisible_by: pad every spatial axis to a multiple of this; ``"auto"``: the smallest multiple the network
            accepts, found by a cheap probe before the first run (:func:`SegHiResCAMLib.models.output.probe_divisible_by`).
        pad_side: ``end`` (pad after the last voxel of each axis, as HD-BET does) or ``both`` (split the
            padding between both ends, as nnU-Net and MONAI do).
        pad_value: value of padded voxels, in normalised units.
        min_size: pad every spatial axis to at least this many voxels (array order).
        intensity_range: ``(a_min, a_max)``: the input window of ``range`` (MONAI ``ScaleIntensityRanged``) and
            the clipping bounds of ``clip-zscore`` (nnU-Net ``CTNormalization``: its 0.5 and 99.5 percentiles).
        output_range: ``(b_min, b_max)`` of ``range``: ``a_min -> b_min``, ``a_max -> b_max``, linear between.
        clip: ``range`` clips its output to ``output_range`` (else the line is extended).
        mean_std: ``(mean, std)`` of ``clip-zscore``: ``(clip(x, *intensity_range) - mean) / std``, fixed
            statistics of the training set (not of the image).
        channels: one :class:`Preprocessing` per input channel whose intensity fields (``normalization`` and
            the fields above) normalise that channel alone (nnU-Net normalises every channel by its own scheme);
            ``None``: ``normalization`` applies to all channels together.
        resize_to: resample onto a fixed grid of this many voxels (ITK order ``(x, y, z)``, like ``spacing``),
            same field of view, after ``spacing``; undone by resampling back onto the image grid.
        resize_mode: ``linear`` or ``nearest``: the interpolation of ``resize_to``.
        clip_percentiles: ``(low, high)`` percentiles (0-100) of the image the intensities are clipped to before
            ``normalization``.
        then: further normalisations (names of :data:`NORMALIZATIONS`) applied in order after ``normalization``.
        scale, shift: ``x * scale + shift`` after every normalisation.
    """

    orientation: Optional[str] = None
    spacing: Optional[Tuple[float, ...]] = None
    normalization: str = "none"
    ct_window: Tuple[float, float] = (-1000.0, 1000.0)
    divisible_by: Union[int, str] = 1
    pad_side: str = "end"
    pad_value: float = 0.0
    min_size: Optional[Tuple[int, ...]] = None
    intensity_range: Optional[Tuple[float, float]] = None
    output_range: Tuple[float, float] = (0.0, 1.0)
    clip: bool = True
    mean_std: Optional[Tuple[float, float]] = None
    channels: Optional[Tuple["Preprocessing", ...]] = None
    resize_to: Optional[Tuple[int, ...]] = None
    resize_mode: str = "linear"
    clip_percentiles: Optional[Tuple[float, float]] = None
    then: Tuple[str, ...] = ()
    scale: float = 1.0
    shift: float = 0.0

    def __post_init__(self):
        if self.normalization not in NORMALIZATIONS:
            raise InputError("normalization must be one of %s, got %r" % (", ".join(NORMALIZATIONS), self.normalization))
        if self.orientation not in ORIENTATIONS:
            raise InputError("orientation must be None, 'keep' or a 3-letter code with one of R/L, A/P, S/I per "
                             "axis (e.g. RAS, LPS, SAR), got %r" % (self.orientation,))
        if self.normalization in ("range", "clip-zscore"):
            if self.intensity_range is None or len(self.intensity_range) != 2:
                raise InputError("normalization %r needs intensity_range=(low, high), got %r"
                                 % (self.normalization, self.intensity_range))
        if self.intensity_range is not None:
            self.intensity_range = (float(self.intensity_range[0]), float(self.intensity_range[1]))
            if self.normalization == "range" and self.intensity_range[0] == self.intensity_range[1]:
                raise InputError("intensity_range of 'range' must have two different values, got %s"
                                 % (self.intensity_range,))
        self.output_range = (float(self.output_range[0]), float(self.output_range[1]))
        if self.normalization == "clip-zscore" and (self.mean_std is None or len(self.mean_std) != 2):
            raise InputError("normalization 'clip-zscore' needs mean_std=(mean, std), got %r" % (self.mean_std,))
        if self.mean_std is not None:
            self.mean_std = (float(self.mean_std[0]), float(self.mean_std[1]))
        if self.channels is not None:
            self.channels = tuple(self.channels)
            if not self.channels or not all(isinstance(c, Preprocessing) for c in self.channels):
                raise InputError("channels must be a non-empty sequence of Preprocessing (one per input channel)")
        if self.spacing is not None:
            self.spacing = tuple(float(s) for s in self.spacing)
            if any(s <= 0 for s in self.spacing):
                raise InputError("spacing must be positive, got %s" % (self.spacing,))
        if self.pad_side not in ("end", "both"):
            raise InputError("pad_side must be 'end' or 'both', got %r" % (self.pad_side,))
        if self.divisible_by != "auto":
            if isinstance(self.divisible_by, bool) or not isinstance(self.divisible_by, (int, float)) \
                    or int(self.divisible_by) != self.divisible_by or int(self.divisible_by) < 1:
                raise InputError("divisible_by must be an integer >= 1 or 'auto', got %r" % (self.divisible_by,))
            self.divisible_by = int(self.divisible_by)
        if self.resize_to is not None:
            self.resize_to = tuple(int(s) for s in self.resize_to)
            if any(s < 1 for s in self.resize_to):
                raise InputError("resize_to must be positive voxel counts, got %s" % (self.resize_to,))
        if self.resize_mode not in ("linear", "nearest"):
            raise InputError("resize_mode must be 'linear' or 'nearest', got %r" % (self.resize_mode,))
        if self.clip_percentiles is not None:
            low, high = (float(v) for v in self.clip_percentiles)
            if not 0.0 <= low < high <= 100.0:
                raise InputError("clip_percentiles must be (low, high) with 0 <= low < high <= 100, got %r"
                                 % (self.clip_percentiles,))
            self.clip_percentiles = (low, high)
        self.then = tuple(self.then)
        for name in self.then:
            if name not in NORMALIZATIONS or name in ("range", "clip-zscore", "ct"):
                raise InputError("a further normalisation must be one of none, zscore, zscore-nonzero, minmax, "
                                 "got %r" % (name,))
        self.scale, self.shift = float(self.scale), float(self.shift)

    def describe(self) -> dict:
        return {"orientation": self.orientation, "spacing": list(self.spacing) if self.spacing else None,
                "normalization": self.normalization, "ct_window": list(self.ct_window),
                "divisible_by": self.divisible_by, "pad_side": self.pad_side, "pad_value": self.pad_value,
                "min_size": list(self.min_size) if self.min_size else None, **self._describe_intensity(),
                **self._describe_card_steps()}

    def _describe_card_steps(self) -> dict:
        """The model-card steps, only where they are used (older descriptions unchanged)."""
        extra = {}
        if self.resize_to is not None:
            extra.update(resize_to=list(self.resize_to), resize_mode=self.resize_mode)
        if self.clip_percentiles is not None:
            extra["clip_percentiles"] = list(self.clip_percentiles)
        if self.then:
            extra["then"] = list(self.then)
        if (self.scale, self.shift) != (1.0, 0.0):
            extra.update(scale=self.scale, shift=self.shift)
        return extra

    def _describe_intensity(self) -> dict:
        """The intensity fields beyond ``ct_window``, only where they are used (older descriptions unchanged)."""
        extra = {}
        if self.normalization in ("range", "clip-zscore"):
            extra["intensity_range"] = list(self.intensity_range)
        if self.normalization == "range":
            extra.update(output_range=list(self.output_range), clip=self.clip)
        if self.normalization == "clip-zscore":
            extra["mean_std"] = list(self.mean_std)
        if self.channels is not None:
            extra["channels"] = [dict(normalization=c.normalization, **c._describe_intensity(),
                                      **({"ct_window": list(c.ct_window)} if c.normalization == "ct" else {}))
                                 for c in self.channels]
        return extra


@dataclass
class SegModel:
    """A segmentation network and everything needed to run it on a user's image.

    Attributes:
        network: the ``nn.Module`` (eager; hooks must work on it).
        name: short id (e.g. ``hd-bet``, or the spec the user gave).
        spatial_dims: 2 or 3.
        in_channels: input channels the network takes.
        activation: ``softmax`` or ``sigmoid`` (how logits become probabilities).
        class_names: one name per class (index = class).
        preprocessing: see :class:`Preprocessing`.
        default_layer: the layer used for ``layer="auto"`` when known to be good for this model, else ``auto``.
        output_key: dict key of the main output for models returning dicts.
        source: where the model came from (spec, files), for provenance.
        file_hashes: ``{path: sha256}`` of the files loaded.
        patch_size: the window the network was trained on (array order), if any; used by windowed inference.
        output: what the network returns: ``logits``, ``sigmoid`` or ``softmax`` (probabilities), or ``auto``
            (found before the first run, :func:`SegHiResCAMLib.models.output.resolve_output`).
        card: the model card applied to this model (its JSON form), for provenance.
        resolved: what ``auto`` settings were resolved to (``divisible_by``, ``output``), for provenance.
        roi_size: the default window of windowed inference (the card's ``patch_size``), array order.
        inference: a framework's own inference recipe, or ``None``; ``{"framework": "nnunet", ...}`` from the
            nnU-Net loader makes prediction follow nnU-Net (``imaging/nnunet_space.py``, ``engine/sliding.py``).
    """

    network: nn.Module
    name: str
    spatial_dims: int = 3
    in_channels: int = 1
    activation: str = "softmax"
    class_names: List[str] = field(default_factory=lambda: ["background", "foreground"])
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    default_layer: str = "auto"
    output_key: Optional[str] = None
    source: str = ""
    file_hashes: dict = field(default_factory=dict)
    patch_size: Optional[Tuple[int, ...]] = None
    output: str = "auto"
    card: Optional[dict] = None
    resolved: dict = field(default_factory=dict)
    roi_size: Optional[Tuple[int, ...]] = None
    inference: Optional[dict] = None

    def __post_init__(self):
        if self.spatial_dims not in (2, 3):
            raise InputError("spatial_dims must be 2 or 3, got %r" % (self.spatial_dims,))
        if self.activation not in ("softmax", "sigmoid"):
            raise InputError("activation must be 'softmax' or 'sigmoid', got %r" % (self.activation,))
        if self.output not in OUTPUTS:
            raise InputError("output must be one of %s, got %r" % (", ".join(OUTPUTS), self.output))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_index(self, name_or_index) -> int:
        """Resolve a class given by index or by name (case-insensitive)."""
        if isinstance(name_or_index, int):
            return name_or_index
        text = str(name_or_index)
        if text.lstrip("-").isdigit():
            return int(text)
        lowered = [c.lower() for c in self.class_names]
        if text.lower() in lowered:
            return lowered.index(text.lower())
        raise InputError("unknown class %r; this model's classes are: %s" % (
            text, ", ".join("%d=%s" % (i, c) for i, c in enumerate(self.class_names))))

    def describe(self) -> dict:
        """Provenance for metadata files and node attributes."""
        return {"name": self.name, "source": self.source, "file_hashes": dict(self.file_hashes),
                "spatial_dims": self.spatial_dims, "in_channels": self.in_channels, "activation": self.activation,
                "class_names": list(self.class_names), "preprocessing": self.preprocessing.describe(),
                "default_layer": self.default_layer, "output": self.output,
                "parameters": int(sum(p.numel() for p in self.network.parameters())),
                **({"card": self.card} if self.card is not None else {}),
                **({"resolved": dict(self.resolved)} if self.resolved else {})}


def default_class_names(count: int) -> List[str]:
    """``background, class1, class2, ...`` for a model that declares no names."""
    return ["background"] + ["class%d" % i for i in range(1, max(count, 2))]


def infer_spatial_dims(network: nn.Module) -> Optional[int]:
    """2 or 3 from the first convolution of the network, if any."""
    for module in network.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            return 2
        if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d)):
            return 3
    return None


def infer_in_channels(network: nn.Module) -> Optional[int]:
    for module in network.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.in_channels
    return None


def infer_out_channels(network: nn.Module) -> Optional[int]:
    last = None
    for module in network.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            last = module
    return None if last is None else last.out_channels


def as_tuple(values: Optional[Sequence], cast=float):
    return None if values is None else tuple(cast(v) for v in values)
