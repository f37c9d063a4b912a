"""Writes scikit-learn's handwritten digits as a `folder` dataset: one sub-folder per class, one PNG per image.

The 1,797 digits (UCI, 8 x 8 pixels, 16 grey levels, ~180 per class) ship inside scikit-learn, so this works
offline. Each is scaled to 0..255 and enlarged to `--side` pixels (bilinear) so the encoder and the DDPM see
a smooth image rather than 8 x 8 blocks. Idempotent: an existing complete folder is left as it is.

    python scripts/make_digits_folder.py --out runs/data/digits
    python -m fsynth.tune --dataset folder --root runs/data/digits --space ablation
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from fsynth.cache import atomic_write

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def digit_images(side: int) -> list[tuple[str, Image.Image]]:
    """(class name, side x side greyscale image) for every digit scikit-learn ships, in its order."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)  # [1797, 8, 8], 0..16 grey levels
    return [(NAMES[int(label)], Image.fromarray(img, mode="L").resize((side, side), Image.BILINEAR))
            for img, label in zip(pixels, digits.target, strict=True)]


def write_folder(out: Path, side: int) -> int:
    """Writes out/<class>/<index>.png (atomically, per file); returns how many images the folder holds."""
    images = digit_images(side)
    for index, (name, image) in enumerate(images):
        path = out / name / f"{index:04d}.png"
        if path.is_file():
            continue
        atomic_write(path, lambda f, image=image: image.save(f, format="PNG"))  # never a half-written PNG
    return len(images)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/data/digits", help="folder to write (default runs/data/digits)")
    parser.add_argument("--side", type=int, default=32, help="image side in pixels (default 32)")
    args = parser.parse_args(argv)
    if args.side < 8:
        print(f"error: --side must be at least 8 (the digits are 8 x 8), got {args.side}", file=sys.stderr)
        return 2
    n = write_folder(Path(args.out), args.side)
    print(f"{n} images in {len(NAMES)} classes under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
