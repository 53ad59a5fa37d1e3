"""The module panel's ensembles (issue 18, section 3): weights files and the folds of an nnU-Net model folder.

The parameter node is the only source of truth: ``weightsPaths`` (the weights files of the chosen model, joined
by ``;``; "" for the model's own weights) and ``allFolds`` (an nnU-Net folder: every ``fold_N``, one member each).
One weights file is the model's weights; two or more make an ensemble, one member per file, as
``seghirescam explain --weights A --weights B`` does; ``allFolds`` is the CLI's ``--model-args '{"fold": "auto"}'``.
An ensemble's heatmap is the mean of the members' maps, its spread map a second volume and its agreement in the
summary line, as for mirroring TTA (:mod:`.spread_node`, :func:`~SegHiResCAMLib.analysis.ensemble.explain_ensemble`).

The list is edited with a path field and Add / Clear buttons, bound here by hand. No torch, no dialogs: the
checks (:func:`checkedWeights`) look at files and folders only; the engine step loads the models.
"""

import os
import re
from typing import Callable, List, Optional

from ..errors import InputError

#: joins the weights files in the parameter node's ``weightsPaths``
SEPARATOR = ";"
#: the fold folders of an nnU-Net model folder that ``fold="auto"`` takes (``fold_all`` is not one of them)
_FOLD = re.compile(r"fold_\d+")


def weightsFiles(parameters) -> List[str]:
    """The weights files that the parameter node lists (``[]``: the model's own weights)."""
    text = str(getattr(parameters, "weightsPaths", "") or "")
    return [path.strip() for path in text.split(SEPARATOR) if path.strip()]


def folds(parameters) -> Optional[str]:
    """``"auto"`` (every fold of an nnU-Net folder) when the parameter node asks for all folds, else ``None``."""
    return "auto" if getattr(parameters, "allFolds", False) else None


def foldFolders(folder: str) -> List[str]:
    """The ``fold_N`` folders of an nnU-Net model folder, sorted by N."""
    names = [n for n in os.listdir(folder) if _FOLD.fullmatch(n) and os.path.isdir(os.path.join(folder, n))]
    return sorted(names, key=lambda n: int(n[5:]))


def checkedWeights(weights, spec: Optional[str], kind: Optional[str], folds: Optional[str] = None) -> List[str]:
    """The weights files as absolute paths, checked against the model (``spec`` and its kind: ``hd-bet``,
    ``nnunet``, ``monai``, ``onnx`` or ``other``; ``None`` for a loaded model) and ``folds``; else one
    :class:`InputError` saying what is wrong and what to do.

    ``weights``: ``None``, one path or a list of paths (two or more: an ensemble). ``folds``: ``None``,
    ``"auto"`` (every ``fold_N`` of an nnU-Net folder: two or more needed) or ``"0,1,..."``.
    """
    if weights is None:
        given = []
    elif isinstance(weights, (str, os.PathLike)):
        given = [os.fspath(weights)]
    elif isinstance(weights, (list, tuple)):
        given = [os.fspath(w) for w in weights]
    else:
        raise InputError("weights must be a file path or a list of them, got %s" % type(weights).__name__)
    given = [path.strip() for path in given if path and path.strip()]
    for path in given:
        if not os.path.isfile(path):
            raise InputError("weights file %r does not exist; choose an existing state-dict or checkpoint file, or "
                             "remove it from the list" % path)
    paths = [os.path.abspath(path) for path in given]
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        raise InputError("weights file %r is listed twice; each member of an ensemble needs its own file" % twice[0])
    if paths and kind == "onnx":
        raise InputError("the ONNX model %r holds its own weights and takes no weights file; %d given: clear the "
                         "weights files" % (spec, len(paths)))
    if folds is not None:
        if not isinstance(folds, str) or not folds.strip():
            raise InputError("folds must be 'auto' (every fold) or fold numbers such as '0,1', got %r" % (folds,))
        if kind != "nnunet":
            raise InputError("all folds is for an nnU-Net model folder (dataset.json, plans.json, fold_N/); model %r "
                             "is not one: untick All folds" % (spec,))
        if paths:
            raise InputError("all folds loads each fold's own checkpoint; a weights file replaces one checkpoint: "
                             "clear the weights files or untick All folds")
        present = foldFolders(spec)
        if folds == "auto" and len(present) < 2:
            raise InputError("the nnU-Net folder %r has %d fold folder(s) (%s); an ensemble of folds needs two or "
                             "more: untick All folds" % (spec, len(present), ", ".join(present) or "none"))
    return paths


def membersName(request) -> str:
    """What the models of a request's ensemble are: ``folds``, ``weights files`` or ``models``."""
    if getattr(request, "folds", None):
        return "folds"
    return "weights files" if len(getattr(request, "memberWeights", None) or []) > 1 else "models"


def whyCannotUse(parameters, spec: str, kind: str) -> Optional[str]:
    """Why the weights files or the folds cannot be used with the model (``None`` when they can)."""
    try:
        checkedWeights(weightsFiles(parameters), spec, kind, folds(parameters))
    except InputError as error:
        text = str(error)
        return text[:1].upper() + text[1:] + "."
    return None


def listText(paths: List[str]) -> str:
    """The line under the weights field: what the list holds and what it does."""
    if not paths:
        return "No weights files: the model's own weights."
    names = ", ".join(os.path.basename(p) or p for p in paths)
    if len(paths) == 1:
        return "1 weights file: %s" % names
    return "%d weights files, an ensemble (one member each: mean map and spread map): %s" % (len(paths), names)


class EnsemblePanel:
    """Binds the weights list (path field, Add, Clear, the list's line) to ``weightsPaths`` by hand; ``allFolds``
    is bound by its ``SlicerParameterName``.

    Args:
        ui: the panel's widgets.
        parameterNode: returns the current parameter node (or ``None``).
    """

    def __init__(self, ui, parameterNode: Callable[[], object]):
        self.ui, self.parameterNode = ui, parameterNode
        ui.addWeightsButton.connect("clicked(bool)", self.onAdd)
        ui.clearWeightsButton.connect("clicked(bool)", self.onClear)

    def onAdd(self) -> None:
        """Put the path field's file on the list (once) and empty the field."""
        parameters = self.parameterNode()
        path = str(self.ui.weightsPathLineEdit.currentPath or "").strip()
        if parameters is None or path in ("", "."):
            return
        paths = weightsFiles(parameters)
        if path not in paths:
            parameters.weightsPaths = SEPARATOR.join(paths + [path])
        self.ui.weightsPathLineEdit.currentPath = ""

    def onClear(self) -> None:
        parameters = self.parameterNode()
        if parameters is not None:
            parameters.weightsPaths = ""

    def update(self, parameters) -> None:
        """The widgets from the parameter node (called whenever it changes)."""
        paths = weightsFiles(parameters)
        self.ui.weightsListLabel.text = listText(paths)
        self.ui.weightsListLabel.toolTip = "\n".join(paths)
        self.ui.clearWeightsButton.enabled = bool(paths)
