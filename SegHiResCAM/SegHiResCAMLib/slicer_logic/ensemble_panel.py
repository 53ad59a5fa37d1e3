"""The module panel's ensembles (issue 18, section 3): weights files and the folds of an nnU-Net model folder.

The parameter node is the only source of truth: ``weightsPaths`` (the weights files of the chosen model, joined
by ``;``; "" for the model's own weights) and ``allFolds`` (an nnU-Net folder: every ``fold_N``, one member each).
One weights file is the model's weights; two or more make an ensemble, one member per file, as
``seghirescam explain --weights A --weights B`` does; ``allFolds`` is the CLI's ``--model-args '{"fold": "auto"}'``
and ``folds`` (text, e.g. ``0,2``) chooses the folds instead (``--model-args '{"fold": "0,2"}'``: one fold is that
fold's model, two or more an ensemble; empty: every fold when ``allFolds`` is ticked, else fold 0). The slice axis
``all`` (``sliceAxis``) explains a 2D model along every slice axis, as ``--slice-axes all`` (:func:`sliceAxes`).
An ensemble's heatmap is the mean of the members' maps, its spread map a second volume and its agreement in the
summary line, as for mirroring TTA (:mod:`.spread_node`, :func:`~SegHiResCAMLib.analysis.ensemble.explain_ensemble`).

The list is edited with a path field and Add / Clear buttons, and ``folds`` with a text field, bound here by hand.
No torch, no dialogs: the checks (:func:`checkedWeights`) look at files and folders only; the engine step loads
the models.
"""

import os
import re
from typing import Callable, List, Optional

from ..catalog import SLICE_AXES
from ..errors import InputError

#: joins the weights files in the parameter node's ``weightsPaths``
SEPARATOR = ";"
#: the fold folders of an nnU-Net model folder that ``fold="auto"`` takes (``fold_all`` is not one of them)
_FOLD = re.compile(r"fold_\d+")


def weightsFiles(parameters) -> List[str]:
    """The weights files that the parameter node lists (``[]``: the model's own weights)."""
    text = str(getattr(parameters, "weightsPaths", "") or "")
    return [path.strip() for path in text.split(SEPARATOR) if path.strip()]


#: the slice-axis choice of the panel that explains along every slice axis (the CLI's ``--slice-axes all``)
ALL_AXES = "all"


def folds(parameters) -> Optional[str]:
    """The folds the parameter node asks for: its ``folds`` text (``"0,2"``), else ``"auto"`` (every fold of an
    nnU-Net folder) when ``allFolds`` is ticked, else ``None`` (the model's default fold)."""
    text = str(getattr(parameters, "folds", "") or "").strip()
    return text or ("auto" if getattr(parameters, "allFolds", False) else None)


def isFoldEnsemble(folds: Optional[str]) -> bool:
    """Whether ``folds`` makes an ensemble (``"auto"`` or two or more fold numbers)."""
    return bool(folds) and (str(folds).strip() == "auto" or "," in str(folds))


def sliceAxes(parameters) -> Optional[List[str]]:
    """Every slice axis when the parameter node's ``sliceAxis`` is ``all`` (an ensemble of slice axes), else
    ``None``."""
    return list(SLICE_AXES) if getattr(parameters, "sliceAxis", None) == ALL_AXES else None


def checkedFolds(folds: str, folder: str) -> None:
    """``folds`` (``"auto"`` or fold numbers such as ``"0,2"``) against the ``fold_N`` folders of ``folder``;
    else one :class:`InputError`."""
    present = foldFolders(folder)
    if folds == "auto":
        if len(present) < 2:
            raise InputError("the nnU-Net folder %r has %d fold folder(s) (%s); an ensemble of folds needs two or "
                             "more: untick All folds" % (folder, len(present), ", ".join(present) or "none"))
        return
    parts = [part.strip() for part in folds.split(",")]
    if not all(re.fullmatch(r"\d+", part) for part in parts):
        raise InputError("folds must be fold numbers separated by commas such as '0,2', got %r: write the numbers "
                         "of the fold_N folders, or leave the field empty" % folds)
    numbers = [int(part) for part in parts]
    if len(set(numbers)) < len(numbers):
        raise InputError("folds %r names a fold twice; name each fold once" % folds)
    missing = [n for n in numbers if "fold_%d" % n not in present]
    if missing:
        raise InputError("fold %s does not exist in the nnU-Net folder %r (folds present: %s); choose among those"
                         % (", ".join(map(str, missing)), folder, ", ".join(p[5:] for p in present) or "none"))


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
                             "is not one: untick All folds and empty the folds field" % (spec,))
        if paths:
            raise InputError("all folds loads each fold's own checkpoint; a weights file replaces one checkpoint: "
                             "clear the weights files or untick All folds")
        checkedFolds(folds.strip(), spec)
    return paths


def checkedSliceAxes(sliceAxes, sliceAxis: Optional[str]) -> List[str]:
    """``sliceAxes`` (``None``, ``"all"``, ``"axial,coronal"`` or a list) as two or more distinct slice axes (``[]``:
    none), checked against ``sliceAxis`` (one axis: not both); else one :class:`InputError`. Whether the model runs
    in slices is checked when it is loaded (:func:`~SegHiResCAMLib.analysis.ensemble.check_slice_axes`)."""
    if sliceAxes is None or (isinstance(sliceAxes, str) and not sliceAxes.strip()):
        return []
    if isinstance(sliceAxes, str):
        given = list(SLICE_AXES) if sliceAxes.strip() == ALL_AXES else sliceAxes.split(",")
    elif isinstance(sliceAxes, (list, tuple)):
        given = list(sliceAxes)
    else:
        raise InputError("sliceAxes must be 'all', axis names such as 'axial,coronal' or a list of them, got %s"
                         % type(sliceAxes).__name__)
    axes = list(dict.fromkeys(str(axis).strip() for axis in given))
    if len(axes) < 2 or not set(axes) <= set(SLICE_AXES):
        raise InputError("sliceAxes must be 'all' or two or more of %s, got %r" % (", ".join(SLICE_AXES), sliceAxes))
    if sliceAxis not in (None, "", "auto"):
        raise InputError("give either sliceAxis (one axis, %r) or sliceAxes (an ensemble of axes), not both"
                         % sliceAxis)
    return axes


def membersName(request) -> str:
    """What the models of a request's ensemble are: ``folds``, ``weights files`` or ``models``."""
    if isFoldEnsemble(getattr(request, "folds", None)):
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
    """Binds the weights list (path field, Add, Clear, the list's line) to ``weightsPaths`` and the folds field to
    ``folds`` by hand; ``allFolds`` is bound by its ``SlicerParameterName``.

    Args:
        ui: the panel's widgets.
        parameterNode: returns the current parameter node (or ``None``).
    """

    def __init__(self, ui, parameterNode: Callable[[], object]):
        self.ui, self.parameterNode = ui, parameterNode
        ui.addWeightsButton.connect("clicked(bool)", self.onAdd)
        ui.clearWeightsButton.connect("clicked(bool)", self.onClear)
        ui.foldsLineEdit.connect("textChanged(QString)", self.onFoldsChanged)

    def onFoldsChanged(self, text: str) -> None:
        parameters = self.parameterNode()
        if parameters is not None and parameters.folds != str(text):
            parameters.folds = str(text)

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
        if self.ui.foldsLineEdit.text != parameters.folds:
            self.ui.foldsLineEdit.text = parameters.folds
