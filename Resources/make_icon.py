"""Draw the SegHiResCAM icon: an axial brain-like slice in grey with an inferno-coloured heat blob.

Writes a 128x128 RGBA PNG to the extension icon (Resources/Icons/SegHiResCAM.png) and the module icon
(SegHiResCAM/Resources/Icons/SegHiResCAM.png). Needs numpy and matplotlib.

    python Resources/make_icon.py [--size 128]
"""

import argparse
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.image import imsave

ROOT = Path(__file__).resolve().parent.parent
OUTPUTS = (
    ROOT / "Resources" / "Icons" / "SegHiResCAM.png",
    ROOT / "SegHiResCAM" / "Resources" / "Icons" / "SegHiResCAM.png",
)
SUPERSAMPLE = 4  # draw at 4x and average down, for smooth (anti-aliased) edges


def smoothstep(edge0, edge1, x):
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def draw(size):
    """Return an RGBA float image of shape (size, size, 4) with values in [0, 1]."""
    n = size * SUPERSAMPLE
    c = (np.arange(n) + 0.5) / n * 2.0 - 1.0  # pixel centres in [-1, 1]
    x, y = np.meshgrid(c, c)  # y grows downwards (image rows)

    # Brain outline: an ellipse whose radius is wrinkled a little (gyri), with a notch at front and back.
    theta = np.arctan2(y, x)
    r = np.hypot(x / 0.80, y / 0.93)
    wrinkle = 0.025 * np.sin(14 * theta) + 0.015 * np.sin(23 * theta + 1.0)
    notch = 0.08 * (np.exp(-((theta + np.pi / 2) / 0.12) ** 2) + np.exp(-((theta - np.pi / 2) / 0.10) ** 2))
    boundary = 1.0 + wrinkle - notch
    inside = (r < boundary).astype(float)

    # Tissue: bright cortex rim, mid-grey white matter, dark ventricles and midline fissure.
    depth = boundary - r
    grey = 0.55 + 0.25 * np.exp(-((depth - 0.06) / 0.05) ** 2)
    grey += 0.04 * np.sin(9 * x + 3 * np.sin(7 * y)) * smoothstep(0.1, 0.3, depth)  # faint sulci texture
    ventricles = np.exp(-(((np.abs(x) - 0.10 - 0.12 * np.abs(y + 0.05)) / 0.06) ** 2 + ((y + 0.05) / 0.25) ** 2))
    grey -= 0.40 * ventricles
    fissure = np.exp(-(x / 0.02) ** 2) * (np.abs(y) > 0.35)
    grey -= 0.35 * fissure
    grey -= 0.35 * (1.0 - smoothstep(0.0, 0.025, depth))  # thin dark edge: visible on light backgrounds too
    grey = np.clip(grey, 0.0, 1.0)

    # Heat: two Gaussian blobs in the right hemisphere, inferno coloured, faded in where the heat is weak.
    heat = np.exp(-(((x - 0.42) / 0.22) ** 2 + ((y - 0.18) / 0.28) ** 2))
    heat += 0.55 * np.exp(-(((x - 0.18) / 0.16) ** 2 + ((y + 0.45) / 0.14) ** 2))
    heat = np.clip(heat / heat.max(), 0.0, 1.0)
    heat_rgb = colormaps["inferno"](0.25 + 0.75 * heat)[..., :3]
    heat_alpha = 0.9 * smoothstep(0.15, 0.55, heat)[..., None]

    rgb = grey[..., None] * np.ones(3)
    rgb = rgb * (1.0 - heat_alpha) + heat_rgb * heat_alpha
    rgba = np.concatenate([rgb * inside[..., None], inside[..., None]], axis=-1)

    # Average SUPERSAMPLE x SUPERSAMPLE blocks, weighting colour by alpha so edges do not darken.
    blocks = rgba.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 4).mean(axis=(1, 3))
    alpha = blocks[..., 3:]
    colour = np.where(alpha > 0, blocks[..., :3] / np.maximum(alpha, 1e-12), 0.0)
    return np.concatenate([colour, alpha], axis=-1).clip(0.0, 1.0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="edge length in pixels (default 128)")
    args = parser.parse_args()
    image = draw(args.size)
    for path in OUTPUTS:
        path.parent.mkdir(parents=True, exist_ok=True)
        imsave(path, image)
        print(path)


if __name__ == "__main__":
    main()
