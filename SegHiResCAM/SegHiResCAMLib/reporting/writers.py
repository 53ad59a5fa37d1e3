"""Atomic text outputs: JSON (the one encoder, :mod:`SegHiResCAMLib.analysis.provenance`), CSV and Markdown/plain
text, each written under a temporary name beside the target and renamed onto it
(:func:`~SegHiResCAMLib.imaging.files.atomic_write`); ``protect`` paths (the inputs) are never overwritten."""

import csv
from typing import Dict, List, Sequence

from ..analysis.provenance import dumps
from ..imaging.files import atomic_write


def write_text(path: str, text: str, protect: Sequence[str] = ()) -> None:
    """Write ``text`` to ``path``, atomically."""
    def write(tmp):
        with open(tmp, "w") as handle:
            handle.write(text)
    atomic_write(path, write, protect)


def write_json(path: str, data: dict, protect: Sequence[str] = ()) -> None:
    """Write ``data`` as strict JSON, indented by 2 (:func:`~SegHiResCAMLib.analysis.provenance.dumps`)."""
    write_text(path, dumps(data), protect)


def write_csv(path: str, rows: List[Dict[str, object]], protect: Sequence[str] = ()) -> None:
    """Write ``rows`` (dicts with the same keys) as CSV with a header line, atomically."""
    def write(tmp):
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["layer"])
            writer.writeheader()
            writer.writerows(rows)
    atomic_write(path, write, protect)
