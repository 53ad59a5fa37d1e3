"""The module panel's model card and further input channels (issue 16): what the parameter node holds, and the
hand-made binding of the card's path widget.

The parameter node is the only source of truth: ``modelCardPath`` (a card's JSON file, "" for none) and
``channel2Volume`` ... ``channel4Volume``, the volumes of the model's input channels 2 to 4 (``inputVolume`` is
channel 1; its grid is the heatmap's, the others are resampled onto it). The channel selectors of the .ui are
bound by their ``SlicerParameterName``; the card's ``ctkPathLineEdit`` is bound here by hand (the Path connector
would show "." for no path), and the channel labels take the card's channel names (``"channels"``).

No torch here: the card's names are read as plain JSON; the card is checked in the engine step.
"""

import json
import os
from typing import Callable, List, Optional

#: the parameter-node fields of input channels 2, 3, 4 (channel 1 is ``inputVolume``)
CHANNEL_PARAMETERS = ("channel2Volume", "channel3Volume", "channel4Volume")
#: the .ui labels of those selectors
CHANNEL_LABELS = ("channel2Label", "channel3Label", "channel4Label")


def modelCardPath(parameters) -> Optional[str]:
    """The card file the parameter node names, or ``None``."""
    path = str(getattr(parameters, "modelCardPath", "") or "").strip()
    return path if path not in ("", ".") else None


def channelVolumes(parameters) -> List[object]:
    """The volumes of input channels 2, 3, ... up to the last one chosen (``None`` where one is missing)."""
    volumes = [getattr(parameters, name) for name in CHANNEL_PARAMETERS]
    while volumes and volumes[-1] is None:
        volumes.pop()
    return volumes


def whyCannotUse(parameters) -> Optional[str]:
    """Why the card or the channel choices cannot be used (``None`` when they can)."""
    path = modelCardPath(parameters)
    if path is not None and not os.path.isfile(path):
        return "The model card %s does not exist; choose the card's JSON file or clear the field." % path
    volumes = channelVolumes(parameters)
    for number, volume in enumerate(volumes, start=2):
        if volume is None:
            return "Select the volume of input channel %d (or clear the channels after it)." % number
    chosen = [parameters.inputVolume] + volumes
    ids = [v.GetID() for v in chosen if v is not None]
    if len(set(ids)) < len(ids):
        return "Each input channel needs its own volume; the same volume is chosen twice."
    return None


def cardChannelNames(path: Optional[str]) -> List[str]:
    """The ``channels`` of a card file (for the labels); ``[]`` when there is no readable card or no names."""
    if not path or not os.path.isfile(path):
        return []
    try:
        with open(path, encoding="utf-8") as handle:
            names = json.load(handle).get("channels")
    except (OSError, ValueError, AttributeError):
        return []
    return [str(n) for n in names] if isinstance(names, list) else []


def channelLabels(path: Optional[str]) -> List[str]:
    """The labels of channels 2, 3, 4: ``Channel 2 (T1c):`` with the card's names, else ``Channel 2:``."""
    names = cardChannelNames(path)
    return ["Channel %d%s:" % (n, " (%s)" % names[n - 1] if n - 1 < len(names) else "")
            for n in range(2, 2 + len(CHANNEL_PARAMETERS))]


class ChannelPanel:
    """Binds the card's path widget to ``modelCardPath`` by hand and keeps the channel labels up to date.

    Args:
        ui: the panel's widgets (``modelCardPathLineEdit``, the channel labels).
        parameterNode: returns the current parameter node (or ``None``).
    """

    def __init__(self, ui, parameterNode: Callable[[], object]):
        self.ui, self.parameterNode = ui, parameterNode
        ui.modelCardPathLineEdit.connect("currentPathChanged(QString)", self.onPathChanged)

    def onPathChanged(self, path) -> None:
        parameters = self.parameterNode()
        if parameters is not None and parameters.modelCardPath != (path or ""):
            parameters.modelCardPath = path or ""

    def update(self, parameters) -> None:
        """The widgets from the parameter node (called whenever it changes)."""
        path = modelCardPath(parameters) or ""
        if self.ui.modelCardPathLineEdit.currentPath != path:
            self.ui.modelCardPathLineEdit.currentPath = path
        for name, text in zip(CHANNEL_LABELS, channelLabels(path)):
            getattr(self.ui, name).text = text
