"""The synthetic set: seeds, stable ids, the prompt table, image files and the manifest, shared by every backend.

A generator backend turns `plan_rows` (one row per image to make) into images; `write_synthetic_images` and
`write_synthetic_manifest` store them. `build_ddpm_synthetic_set` does all of it for the offline `ddpm` backend.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from fsynth.data.fewshot import folder_name, load_manifest
from fsynth.data.records import Sample, load_image
from fsynth.errors import DataError, FsynthError
from fsynth.generators.ddpm import DDPMGenerator, load_generator, sample_images, save_generator, train_ddpm
from fsynth.prompts import generation_prompt

SYNTHETIC_COLUMNS = ("sample_id", "path", "index", "label", "class_name", "domain", "prompt", "seed", "generator")
MANIFEST_NAME = "manifest.parquet"
GENERATOR_DIR = "generator"
ID_KEY = "fsynth:sample_id"  # PNG text chunk naming the image's sample id


def image_seed(dataset: str, class_name: str, index: int, base_seed: int) -> int:
    """A stable 63-bit seed from sha256 of (dataset, class, index, base seed): same on every machine and run."""
    key = json.dumps([dataset, class_name, int(index), int(base_seed)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1


def sample_id(dataset: str, class_name: str, index: int, fingerprint: str) -> str:
    """'synthetic/<dataset>/<fingerprint>/<class folder>/<index:05d>': unique per dataset, generator and image."""
    return f"synthetic/{dataset}/{fingerprint}/{folder_name(class_name)}/{int(index):05d}"


def relative_png(sid: str) -> str:
    """Where an image lives under the output folder: '<class folder>/<index:05d>.png' (the id's last two parts)."""
    return "/".join(sid.split("/")[-2:]) + ".png"


def plan_rows(dataset: str, classnames: Sequence[str], domain: str, images_per_class: int, base_seed: int,
              fingerprint: str) -> pd.DataFrame:
    """The prompt table: one row per image to generate, class by class, `path` still empty."""
    if images_per_class <= 0:
        raise FsynthError(f"images_per_class must be at least 1, got {images_per_class}; "
                          "set generator.images_per_class to a positive number")
    rows = [
        (sample_id(dataset, name, i, fingerprint), "", -1, label, name, "synthetic",
         generation_prompt(name, domain), image_seed(dataset, name, i, base_seed), fingerprint)
        for label, name in enumerate(classnames)
        for i in range(images_per_class)
    ]
    frame = pd.DataFrame(rows, columns=list(SYNTHETIC_COLUMNS))
    return frame.astype({"index": "int64", "label": "int64", "seed": "int64"})


def _atomic_png(image: Image.Image, path: Path, sid: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
    info = PngInfo()
    info.add_text(ID_KEY, sid)
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)


def write_synthetic_images(rows: pd.DataFrame, images: Sequence[Image.Image], out_dir: str | Path) -> pd.DataFrame:
    """Write images[i] for rows.iloc[i] to out_dir/<class folder>/<index:05d>.png; return rows with `path` set.

    Each PNG carries its sample id as a text chunk: the path alone does not say which generator made the image.
    """
    if len(rows) != len(images):
        raise FsynthError(f"{len(images)} images for {len(rows)} rows; pass one image per row of the prompt table")
    out = Path(out_dir).resolve()
    paths = [str(out / relative_png(sid)) for sid in rows["sample_id"]]
    for image, path, sid in zip(images, paths, rows["sample_id"], strict=True):
        _atomic_png(image, Path(path), sid)
    return rows.assign(path=paths)


def write_synthetic_manifest(rows: pd.DataFrame, out_dir: str | Path) -> Path:
    """Write rows (all SYNTHETIC_COLUMNS, in that order) to out_dir/manifest.parquet atomically; return the path."""
    missing = [c for c in SYNTHETIC_COLUMNS if c not in rows.columns]
    if missing:
        raise FsynthError(f"synthetic rows lack columns {missing}; build them with fsynth.synthetic.plan_rows")
    out = Path(out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    path = out / MANIFEST_NAME
    tmp = out / f".{MANIFEST_NAME}.{os.getpid()}.tmp"
    rows[list(SYNTHETIC_COLUMNS)].reset_index(drop=True).to_parquet(tmp, index=False)
    os.replace(tmp, path)
    return path


def load_synthetic_manifest(path: str | Path) -> pd.DataFrame:
    """Read a synthetic manifest written by `write_synthetic_manifest`, checking its columns."""
    fix = "generate the synthetic set again"
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DataError(f"cannot read synthetic manifest {path} ({reason}); {fix}") from None
    missing = [c for c in SYNTHETIC_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"synthetic manifest {path} lacks columns {missing}; {fix}")
    return frame


def is_valid_png(path: str | Path, sid: str | None = None) -> bool:
    """True when the file decodes completely (a truncated write fails `load`) and, given `sid`, is that image."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.format == "PNG" and (sid is None or img.text.get(ID_KEY) == sid)
    except (OSError, ValueError, SyntaxError):
        return False


def _classnames(manifest: pd.DataFrame, path: str | Path) -> list[str]:
    """Class names in label order, from every split of the real manifest."""
    pairs = manifest[["label", "class_name"]].drop_duplicates().sort_values("label")
    if pairs["label"].duplicated().any() or list(pairs["label"]) != list(range(len(pairs))):
        raise DataError(f"manifest {path} does not map labels 0..C-1 to one class name each; "
                        "run `python -m fsynth.data prepare` again")
    return list(pairs["class_name"])


def _shots(manifest: pd.DataFrame, path: str | Path) -> tuple[list[Image.Image], list[int], str]:
    """The real training shots: images, labels, and a digest of their ids (ties a saved generator to them)."""
    train = manifest[manifest["split"] == "train"].sort_values("sample_id")
    if train.empty:
        raise DataError(f"manifest {path} has no 'train' rows (the shots); run `python -m fsynth.data prepare`")
    images = [load_image(Sample(r.sample_id, int(r.label), r.path, int(r.index))) for r in train.itertuples()]
    digest = hashlib.sha256("\n".join(train["sample_id"]).encode()).hexdigest()[:16]
    return images, [int(v) for v in train["label"]], digest


def _generator(directory: Path, shots: tuple, num_classes: int, channels: int, train: dict,
               log: Callable[[str], None]) -> DDPMGenerator:
    """Load the saved generator when it was trained on these shots with these settings, else train and save it."""
    images, labels, digest = shots
    wanted = {**train, "shots": len(images), "shots_digest": digest}
    if directory.exists():
        gen = load_generator(directory)
        if gen.training == wanted and (gen.num_classes, gen.channels) == (num_classes, channels):
            log(f"loaded generator {gen.fingerprint} from {directory}")
            return gen
        raise FsynthError(f"the generator in {directory} was trained on other shots or settings ({gen.training}); "
                          "delete that folder or pick another output folder")
    start = time.perf_counter()
    gen = train_ddpm(images, labels, num_classes, channels=channels, **train)
    gen = dataclasses.replace(gen, training={**gen.training, "shots_digest": digest}, fingerprint="")
    log(f"trained generator {gen.fingerprint} ({train['steps']} steps) in {time.perf_counter() - start:.1f} s")
    save_generator(gen, directory)
    return gen


def _sample_missing(gen: DDPMGenerator, rows: pd.DataFrame, out: Path, steps: int, batch_size: int,
                    log: Callable[[str], None]) -> None:
    """Generate the rows whose PNG is missing, unreadable or another image; one batch at a time, so a crash
    loses at most one batch."""
    todo = rows[[not is_valid_png(out / relative_png(s), s) for s in rows["sample_id"]]]
    start = time.perf_counter()
    for lo in range(0, len(todo), batch_size):
        chunk = todo.iloc[lo:lo + batch_size]
        images = sample_images(gen, list(chunk["label"]), list(chunk["seed"]), steps=steps, batch_size=batch_size)
        write_synthetic_images(chunk, images, out)
    log(f"sampled {len(todo)} images ({len(rows) - len(todo)} already present) "
        f"with {steps} DDIM steps in {time.perf_counter() - start:.1f} s")


def build_ddpm_synthetic_set(
    fewshot_manifest: str | Path, out_dir: str | Path, *, images_per_class: int, train_steps: int, batch_size: int,
    lr: float, weight_decay: float, warmup_steps: int, sample_steps: int, seed: int, dataset: str,
    domain: str = "", log: Callable[[str], None] | None = None,
) -> Path:
    """Train the DDPM on the shots of a few-shot manifest, sample `images_per_class` per class, write the set.

    Layout: out_dir/generator (the saved DDPM), out_dir/<class folder>/<index:05d>.png, out_dir/manifest.parquet
    (returned). Resumable: a saved generator is reused, and only missing or corrupt PNGs are generated.
    `log` receives one line per phase (with its wall time).
    """
    log = log or (lambda line: None)
    manifest = load_manifest(fewshot_manifest)
    classnames = _classnames(manifest, fewshot_manifest)
    plan_rows(dataset, classnames, domain, images_per_class, seed, "check")  # fail on a bad count before training
    out = Path(out_dir).resolve()
    channels = 1 if dataset == "fashion-mnist" else 3
    train = {"steps": train_steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
             "warmup_steps": warmup_steps, "seed": seed}
    gen = _generator(out / GENERATOR_DIR, _shots(manifest, fewshot_manifest), len(classnames), channels, train, log)
    rows = plan_rows(dataset, classnames, domain, images_per_class, seed, gen.fingerprint)
    _sample_missing(gen, rows, out, sample_steps, batch_size, log)
    rows = rows.assign(path=[str(out / relative_png(s)) for s in rows["sample_id"]])
    return write_synthetic_manifest(rows, out)
