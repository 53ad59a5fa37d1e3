"""A model as SegHiResCAM sees it: the network plus how it wants its input (torch only, no file formats).

Everything the engine needs to run a network *in model space* and map results back to the user's grid is
declared here, explicitly, instead of being guessed per call.
"""

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from torch import nn

from ..errors import InputError

NORMALIZATIONS = ("none", "zscore", "zscore-nonzero", "minmax", "ct")
ORIENTATIONS = (None, "keep", "RAS", "LPS", "LAS", "RAI")


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
        divisible_by: pad every spatial axis (at its end) to a multiple of this.
        pad_value: value of padded voxels, in normalised units.
        min_size: pad every spatial axis to at least this many voxels (array order).
    """

    orientation: Optional[str] = None
    spacing: Optional[Tuple[float, ...]] = None
    normalization: str = "none"
    ct_window: Tuple[float, float] = (-1000.0, 1000.0)
    divisible_by: int = 1
    pad_value: float = 0.0
    min_size: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        if self.normalization not in NORMALIZATIONS:
            raise InputError("normalization must be one of %s, got %r" % (", ".join(NORMALIZATIONS), self.normalization))
        if self.orientation not in ORIENTATIONS:
            raise InputError("orientation must be one of %s, got %r" % (ORIENTATIONS, self.orientation))
        if self.spacing is not None:
            self.spacing = tuple(float(s) for s in self.spacing)
            if any(s <= 0 for s in self.spacing):
                raise InputError("spacing must be positive, got %s" % (self.spacing,))
        if int(self.divisible_by) < 1:
            raise InputError("divisible_by must be >= 1, got %r" % (self.divisible_by,))
        self.divisible_by = int(self.divisible_by)

    def describe(self) -> dict:
        return {"orientation": self.orientation, "spacing": list(self.spacing) if self.spacing else None,
                "normalization": self.normalization, "ct_window": list(self.ct_window),
                "divisible_by": self.divisible_by, "pad_value": self.pad_value,
                "min_size": list(self.min_size) if self.min_size else None}


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

    def __post_init__(self):
        if self.spatial_dims not in (2, 3):
            raise InputError("spatial_dims must be 2 or 3, got %r" % (self.spatial_dims,))
        if self.activation not in ("softmax", "sigmoid"):
            raise InputError("activation must be 'softmax' or 'sigmoid', got %r" % (self.activation,))

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
                "default_layer": self.default_layer,
                "parameters": int(sum(p.numel() for p in self.network.parameters()))}


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
