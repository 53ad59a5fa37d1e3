"""Set-up shared by the tests that run the Slicer module on a real slicer-core MRML scene with the tiny factory
model (the tests under Testing/slicer_module/): the model spec, its weights, an oblique anisotropic IJKToRAS, a
cleared scene, the list of its node IDs and the module's panel opened with its error dialogs collected.

Plain helpers, not fixtures: each test module keeps its own (thin) fixtures, so that what a test depends on stays
visible in that module. Importing this module sets up ``slicer`` (``slicer_standalone.setup()``, idempotent).
"""

import os

import numpy as np
import torch

import slicer_standalone
import toy_models

slicer = slicer_standalone.setup()

#: the tiny 3D U-Net of Testing/toy_models.py, as a model spec
SPEC = "toy_models:unet3d"
#: an oblique (rotated about all axes), anisotropic IJKToRAS with a flipped axis
IJK_TO_RAS = np.array([[0.62, -0.41, 0.95, 12.5],
                       [0.35, 0.88, 0.41, -31.0],
                       [-0.45, 0.05, 2.66, 7.25],
                       [0.0, 0.0, 0.0, 1.0]])


def save_toy_weights(folder) -> str:
    """Save the weights of ``toy_models.unet3d()`` drawn from seed 0 as ``folder/unet3d.pt``; return the path."""
    torch.manual_seed(0)
    path = os.path.join(str(folder), "unet3d.pt")
    torch.save(toy_models.unet3d().state_dict(), path)
    return path


def clear_scene():
    """Empty ``slicer.mrmlScene`` and give it a subject hierarchy node, as in the application; return the scene."""
    slicer.mrmlScene.Clear()
    slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
    return slicer.mrmlScene


def node_ids(scene=None):
    """The sorted IDs of every node in ``scene`` (default: ``slicer.mrmlScene``): to show that nothing was added."""
    scene = slicer.mrmlScene if scene is None else scene
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))


def open_panel(module, monkeypatch):
    """Load ``module`` (the scripted module's Python module) and select it as the application does, with its error
    dialogs (``slicer.util.errorDisplay``) collected instead of shown; returns ``(widget, errors)``. The caller quits
    ``slicer.app`` when done."""
    errors = []
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kwargs: errors.append(text))
    slicer.app.loadModule(module)
    return slicer.app.selectModule(module.__name__), errors
