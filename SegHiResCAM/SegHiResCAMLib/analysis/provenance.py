"""The project's one JSON encoder, for every provenance and results file (command line, demo, evaluation).

:func:`jsonable` turns a result into strict JSON data (NaN and infinities become ``null``, tuples lists, keys
text); :func:`json_default` is the ``default`` hook for what the standard encoder does not know (numpy scalars
and arrays, paths, anything else as its text); :func:`dumps` applies both, indented by 2 unless told otherwise.

Example:
    >>> import numpy as np
    >>> dumps({"y0": np.float32(0.5), "shape": (2, 3), "auc": float("nan")}, indent=None)
    '{"y0": 0.5, "shape": [2, 3], "auc": null}'
"""

import json
import math
import os

import numpy as np


def json_default(value):
    """``default`` hook of :func:`json.dumps`: numpy integers, floats (NaN as ``None``) and arrays, paths and
    tuples as JSON values; anything else as its text."""
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return jsonable(float(value))
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (tuple, set, frozenset)):
        return jsonable(list(value))
    return str(value)


def jsonable(value):
    """``value`` as strict JSON data: NaN and infinities replaced by ``None``, tuples as lists, keys as text
    (other values are left for :func:`json_default`)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def dumps(data, **kw) -> str:
    """``data`` as strict JSON text (see :func:`jsonable` and :func:`json_default`); ``indent`` defaults to 2."""
    kw.setdefault("indent", 2)
    kw.setdefault("default", json_default)
    return json.dumps(jsonable(data), **kw)
