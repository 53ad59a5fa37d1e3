"""The module panel's "Cohort results" section (issue 19): open a finished cohort (``seghirescam cohort ... --out
DIR``), list its cases (flagged first) and show one case's scan, reference, prediction and heatmap; Previous/Next
step through the flagged cases, each step removing the previous case's nodes (:class:`.cohort.CohortBrowser`).

The parameter node is the only source of truth: ``cohortFolder`` (the cohort's output folder, "" for none) and
``cohortCase`` (the selected case id). Both are bound here by hand: the folder's ``ctkPathLineEdit`` (the Path
connector would show "." for no path) and the case list, whose items are case ids with their status, not values
of a fixed choice. The panel opens no dialog: an action's error goes through ``errorScope()``, a context manager
the module passes (``slicer.util.tryWithErrorDisplay`` there, which shows it and raises it on).
"""

import os
from typing import Callable, List, Optional

from ..errors import SegHiResCAMError
from .cohort import CohortBrowser


def caseOrder(browser: CohortBrowser) -> List[str]:
    """The case ids as the list shows them: the flagged cases (likeliest failures first), then the others in
    manifest order."""
    flagged = browser.flagged_ids()
    return flagged + [row["case_id"] for row in browser.rows if row["case_id"] not in flagged]


def caseLabel(row) -> str:
    """One item of the case list: ``"degraded: flagged, Dice 0.41, mean SA 0.12"`` (``failed`` for a failed case)."""
    parts = ["flagged" if row.get("flagged") == "True" else "not flagged"] if row.get("status") == "done" \
        else [row.get("status") or "?"]
    for column, name in (("dice", "Dice"), ("mean_sa", "mean SA")):
        try:
            parts.append("%s %.2f" % (name, float(row.get(column))))
        except (TypeError, ValueError):
            pass
    return "%s: %s" % (row["case_id"], ", ".join(parts))


class CohortPanel:
    """Binds the cohort section's widgets to ``cohortFolder``/``cohortCase`` and runs Show, Previous, Next.

    Args:
        ui: the panel's widgets (``cohortFolderLineEdit``, ``cohortCaseComboBox``, the three buttons and
            ``cohortStatusLabel``).
        parameterNode: returns the current parameter node (or ``None``).
        errorScope: returns a context manager that reports an action's error (the module: an error dialog).
    """

    def __init__(self, ui, parameterNode: Callable[[], object], errorScope: Callable[[], object]):
        self.ui, self.parameterNode, self.errorScope = ui, parameterNode, errorScope
        self.browser: Optional[CohortBrowser] = None
        self.reason: Optional[str] = "Choose the output folder of a finished cohort run."
        self.ids: List[str] = []
        self.folder: Optional[str] = None  # the folder the list was read from
        self.filling = False
        ui.cohortFolderLineEdit.connect("currentPathChanged(QString)", self.onFolderChanged)
        ui.cohortCaseComboBox.connect("currentIndexChanged(int)", self.onCaseChanged)
        ui.cohortShowButton.connect("clicked(bool)", self.onShow)
        ui.cohortPreviousButton.connect("clicked(bool)", lambda: self.onStep(-1))
        ui.cohortNextButton.connect("clicked(bool)", lambda: self.onStep(1))

    def onFolderChanged(self, path) -> None:
        parameters = self.parameterNode()
        if parameters is not None and parameters.cohortFolder != (path or ""):
            parameters.cohortFolder = path or ""

    def onCaseChanged(self, index) -> None:
        parameters = self.parameterNode()
        if not self.filling and parameters is not None and 0 <= index < len(self.ids):
            if parameters.cohortCase != self.ids[index]:
                parameters.cohortCase = self.ids[index]

    def _open(self, folder: str) -> None:
        """Read the cohort in ``folder`` (again) and fill the case list."""
        if self.browser is not None:
            self.browser.clear()
        self.browser, self.ids = None, []
        if not folder:
            self.reason = "Choose the output folder of a finished cohort run."
        elif not os.path.isdir(folder):
            self.reason = "The cohort folder %s does not exist." % folder
        else:
            try:
                self.browser = CohortBrowser(folder)
                self.ids, self.reason = caseOrder(self.browser), None
            except SegHiResCAMError as error:
                self.reason = str(error)
        self.folder, self.filling = folder, True  # filling the list selects its first item: not a choice
        try:
            self.ui.cohortCaseComboBox.clear()
            self.ui.cohortCaseComboBox.addItems([caseLabel(self.browser.row(i)) for i in self.ids])
        finally:
            self.filling = False

    def update(self, parameters) -> None:
        """The widgets from the parameter node (called whenever it changes)."""
        folder = str(parameters.cohortFolder or "").strip()
        folder = "" if folder == "." else folder
        if self.ui.cohortFolderLineEdit.currentPath != folder:
            self.ui.cohortFolderLineEdit.currentPath = folder
        if folder != self.folder:
            self._open(folder)
        case = parameters.cohortCase
        index = self.ids.index(case) if case in self.ids else -1
        if self.ui.cohortCaseComboBox.currentIndex != index:
            self.ui.cohortCaseComboBox.currentIndex = index
        flagged = self.browser.flagged_ids() if self.browser is not None else []
        self.ui.cohortShowButton.enabled = index >= 0
        self.ui.cohortPreviousButton.enabled = self.ui.cohortNextButton.enabled = bool(flagged)
        self.ui.cohortShowButton.toolTip = self.reason or ("Show the selected case" if index >= 0
                                                           else "Select a case in the list.")
        for button, word in ((self.ui.cohortPreviousButton, "previous"), (self.ui.cohortNextButton, "next")):
            button.toolTip = self.reason or ("Show the %s flagged case" % word if flagged
                                             else "The cohort has no flagged case.")
        shown = self.browser.current if self.browser is not None else None
        self.ui.cohortStatusLabel.text = self.reason or (
            "%d cases, %d flagged%s" % (len(self.ids), len(flagged), "; showing %s" % shown if shown else ""))

    def onShow(self) -> None:
        parameters = self.parameterNode()
        if self.browser is not None and parameters is not None and parameters.cohortCase:
            try:
                with self.errorScope():
                    self.browser.show(parameters.cohortCase)
            finally:
                self.update(parameters)

    def onStep(self, step: int) -> None:
        """Select and show the flagged case ``step`` places after the selected one (the first flagged case when
        none is selected); a case that cannot be shown stays selected, so the next step moves past it."""
        parameters = self.parameterNode()
        flagged = self.browser.flagged_ids() if self.browser is not None and parameters is not None else []
        if not flagged:
            return
        case = parameters.cohortCase
        position = flagged.index(case) + step if case in flagged else (0 if step > 0 else -1)
        parameters.cohortCase = flagged[position % len(flagged)]
        try:
            with self.errorScope():
                self.browser.show(parameters.cohortCase)
        finally:
            self.update(parameters)
