"""The synthetic set on disk: seeds, stable ids, the prompt table, its folder's address, image files, manifest.

Layout of one set, `<root>/<dataset>-<backend>-<16 hex>/` (the hex addresses everything that determines the images):
  set.json          what the address covers (generator fingerprint, prompts' inputs, counts, group size, and for
                    image-to-image the strength and the shots' digest)
  prompts.parquet   the prompt table, written first: one row per image (SYNTHETIC_COLUMNS + `group`)
  <class>/<i>.png   the images, each tagged with its sample id
  manifest.parquet  written last, once every image is present and readable
  samples.png       a grid of the first images of every class, to look at
A backend generates one `group` of rows per call (a fixed slice of one class), so an image is made in the same
company whether the run is fresh, resumed or spread over several actors.
`source_id` is the real shot an image-to-image row starts from ("" for text-to-image): image i of class c uses
shot i mod n_c of that class's n_c shots sorted by sample id. Sets written before the column existed read as "".
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pandas as pd
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from fsynth.cache import atomic_write, atomic_write_json, content_key
from fsynth.data.fewshot import folder_name, load_manifest
from fsynth.data.records import Sample, load_image
from fsynth.errors import ConfigError, DataError, FsynthError
from fsynth.prompts import generation_prompt

SYNTHETIC_COLUMNS = ("sample_id", "path", "index", "label", "class_name", "domain", "prompt", "seed", "generator",
                     "source_id")
PROMPT_COLUMNS = (*SYNTHETIC_COLUMNS, "group")
MANIFEST_NAME = "manifest.parquet"
PROMPTS_NAME = "prompts.parquet"
SET_NAME = "set.json"
GRID_NAME = "samples.png"
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
              fingerprint: str, group_size: int = 8, sources: Mapping[int, Sequence[str]] | None = None
              ) -> pd.DataFrame:
    """The prompt table: one row per image, class by class, `path` still empty (PROMPT_COLUMNS).

    `group` numbers consecutive slices of `group_size` images of one class: the unit of one generator call.
    `sources` ({label: shot ids in order}, see `shot_sources`): image i of a class starts from shot i mod n of its
    class (`source_id`); None leaves `source_id` empty (text-to-image).
    """
    if images_per_class <= 0:
        raise FsynthError(f"images_per_class must be at least 1, got {images_per_class}; "
                          "set generator.images_per_class to a positive number")
    if group_size <= 0:
        raise FsynthError(f"group size must be at least 1, got {group_size}; set generator.batch_size")
    rows = [
        (sample_id(dataset, name, i, fingerprint), "", -1, label, name, "synthetic",
         generation_prompt(name, domain), image_seed(dataset, name, i, base_seed), fingerprint,
         sources[label][i % len(sources[label])] if sources is not None else "")
        for label, name in enumerate(classnames)
        for i in range(images_per_class)
    ]
    frame = pd.DataFrame(rows, columns=list(SYNTHETIC_COLUMNS))
    per_class = -(-images_per_class // group_size)
    within = frame.groupby("label").cumcount()
    frame["group"] = frame["label"] * per_class + within // group_size
    return frame.astype({"index": "int64", "label": "int64", "seed": "int64", "group": "int64"})


def _atomic_png(image: Image.Image, path: Path, sid: str) -> None:
    info = PngInfo()
    info.add_text(ID_KEY, sid)
    atomic_write(path, lambda f: image.save(f, format="PNG", pnginfo=info))


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
    frame = rows[list(SYNTHETIC_COLUMNS)].reset_index(drop=True)
    return atomic_write(Path(out_dir).resolve() / MANIFEST_NAME, lambda f: frame.to_parquet(f, index=False))


def load_synthetic_manifest(path: str | Path) -> pd.DataFrame:
    """Read a synthetic manifest written by `write_synthetic_manifest`, checking its columns."""
    fix = "generate the synthetic set again"
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DataError(f"cannot read synthetic manifest {path} ({reason}); {fix}") from None
    frame = with_source_column(frame)
    missing = [c for c in SYNTHETIC_COLUMNS if c not in frame.columns]
    if missing:
        raise DataError(f"synthetic manifest {path} lacks columns {missing}; {fix}")
    return frame


def with_source_column(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with `source_id` after `generator`, "" when it lacks the column (written before it existed)."""
    if "source_id" in frame.columns:
        return frame
    at = list(frame.columns).index("generator") + 1 if "generator" in frame.columns else len(frame.columns)
    out = frame.copy()
    out.insert(at, "source_id", "")
    return out


def read_prompt_table(out_dir: str | Path) -> pd.DataFrame:
    """The prompt table of a set folder (prompts.parquet), with `source_id` as `with_source_column` gives it."""
    return with_source_column(pd.read_parquet(Path(out_dir) / PROMPTS_NAME))


def is_valid_png(path: str | Path, sid: str | None = None) -> bool:
    """True when the file decodes completely (a truncated write fails `load`) and, given `sid`, is that image."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.format == "PNG" and (sid is None or img.text.get(ID_KEY) == sid)
    except (OSError, ValueError, SyntaxError):
        return False




def _train_rows(fewshot_dir: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """(the shots' manifest rows sorted by sample id, class names in label order) of a few-shot folder."""
    manifest = load_manifest(Path(fewshot_dir) / "manifest.parquet")
    pairs = manifest[["label", "class_name"]].drop_duplicates().sort_values("label")
    if pairs["label"].duplicated().any() or list(pairs["label"]) != list(range(len(pairs))):
        raise DataError(f"manifest in {fewshot_dir} does not map labels 0..C-1 to one class name each; "
                        "run `python -m fsynth.data prepare` again")
    return manifest[manifest["split"] == "train"].sort_values("sample_id"), list(pairs["class_name"])


def _ids_digest(ids: Sequence[str]) -> str:
    return content_key("\n".join(ids))


def load_shots(fewshot_dir: str | Path) -> tuple[list[Image.Image], list[int], list[str], str]:
    """The real training shots of a few-shot folder: images, labels, class names in label order, ids digest."""
    train, classnames = _train_rows(fewshot_dir)
    if train.empty:
        raise DataError(f"manifest in {fewshot_dir} has no 'train' rows (the shots); run `python -m fsynth.data "
                        "prepare`")
    images = [load_image(Sample(r.sample_id, int(r.label), r.path, int(r.index))) for r in train.itertuples()]
    return images, [int(v) for v in train["label"]], classnames, _ids_digest(list(train["sample_id"]))


def shot_sources(fewshot_dir: str | Path | None) -> tuple[dict[int, list[str]], dict[str, Sample], str]:
    """What image-to-image starts from: ({label: its shots' ids, sorted}, {id: Sample}, the ids digest).

    Reads only the manifest (no image), so it can refuse a bad set before any work: a one-line ConfigError when
    no few-shot folder is given or a class has no shot.
    """
    fix = "prepare the shots again (python -m fsynth.data prepare, data.shots >= 1) or set generator.init_from=noise"
    if fewshot_dir is None:
        raise ConfigError("generator.init_from=shots starts every image from a real shot, but no few-shot set was "
                          "given; pass the few-shot folder, or set generator.init_from=noise")
    train, classnames = _train_rows(fewshot_dir)
    by_label = {c: list(train.loc[train["label"] == c, "sample_id"]) for c in range(len(classnames))}
    empty = [classnames[c] for c, ids in by_label.items() if not ids]
    if empty:
        raise ConfigError(f"generator.init_from=shots starts every image from a real shot of its class, but class "
                          f"'{empty[0]}' has none in {Path(fewshot_dir).resolve()} ({len(empty)} of "
                          f"{len(classnames)} classes without shots); {fix}")
    samples = {r.sample_id: Sample(r.sample_id, int(r.label), r.path, int(r.index)) for r in train.itertuples()}
    return by_label, samples, _ids_digest(list(train["sample_id"]))


def set_address(key: dict) -> str:
    """16 hex of sha256 over the canonical JSON of `key` (everything that determines a set's images)."""
    return content_key(key)


def prepare_synthetic_set(root: str | Path, key: dict, table: pd.DataFrame) -> Path:
    """Create (or reopen) the set folder `<root>/<dataset>-<backend>-<address>` with set.json and the prompt table.

    Reopening checks that the stored table is the same table: a folder is never reused for other images.
    """
    out = Path(root).resolve() / f"{key['dataset']}-{key['backend']}-{set_address(key)}"
    out.mkdir(parents=True, exist_ok=True)
    prompts = out / PROMPTS_NAME
    if prompts.is_file():
        stored = read_prompt_table(out)
        if not stored[list(PROMPT_COLUMNS)].equals(table[list(PROMPT_COLUMNS)].reset_index(drop=True)):
            raise FsynthError(f"{prompts} holds another prompt table than this config makes; delete {out} "
                              "(its images were made from other prompts or seeds) and run again")
        return out
    atomic_write_json(out / SET_NAME, key, indent=2, sort_keys=True, default=str)
    frame = table[list(PROMPT_COLUMNS)].reset_index(drop=True)
    atomic_write(prompts, lambda f: frame.to_parquet(f, index=False))
    return out


def missing_groups(table: pd.DataFrame, out_dir: str | Path) -> list[int]:
    """Groups with at least one image that is missing, unreadable (a partial write) or another image."""
    out = Path(out_dir)
    bad = [not is_valid_png(out / relative_png(s), s) for s in table["sample_id"]]
    return sorted(int(g) for g in table.loc[bad, "group"].unique())


def generate_group(generator, rows: pd.DataFrame, out_dir: str | Path) -> pd.DataFrame:
    """Make every image of one group with `generator` and write those not already valid on disk.

    Returns the rows with `path` set and `written` (bool): images already present are never overwritten.
    """
    out = Path(out_dir).resolve()
    images = generator.generate(rows)
    if len(images) != len(rows):
        raise FsynthError(f"the generator returned {len(images)} images for {len(rows)} rows; a backend must "
                          "return one image per row")
    todo = [not is_valid_png(out / relative_png(s), s) for s in rows["sample_id"]]
    keep = rows[todo]
    write_synthetic_images(keep, [img for img, t in zip(images, todo, strict=True) if t], out)
    return rows.assign(path=[str(out / relative_png(s)) for s in rows["sample_id"]], written=todo)


def run_groups_direct(generator, table: pd.DataFrame, out_dir: str | Path, groups: Sequence[int],
                      log: Callable[[str], None] | None = None) -> int:
    """Generate `groups` of the prompt table one after the other in this process; return the images written."""
    log = log or (lambda line: None)
    written, start, every = 0, time.perf_counter(), max(1, len(groups) // 20)
    for i, group in enumerate(groups, 1):
        done = generate_group(generator, table[table["group"] == group], out_dir)
        written += int(done["written"].sum())
        if i % every == 0 or i == len(groups):
            log(f"groups {i}/{len(groups)}: {written} images written, "
                f"{written / (time.perf_counter() - start):.2f} img/s")
    return written


def finish_synthetic_set(out_dir: str | Path, table: pd.DataFrame, grid_per_class: int = 8) -> Path:
    """Check every image of the table, write manifest.parquet and samples.png; return the manifest path.

    A set whose manifest already lists exactly these rows is left as it is (a cached stage is not rewritten).
    """
    out = Path(out_dir).resolve()
    left = missing_groups(table, out)
    if left:
        raise FsynthError(f"{out} still lacks images in {len(left)} groups; run the same command again to make "
                          "only the missing ones")
    rows = table.assign(path=[str(out / relative_png(s)) for s in table["sample_id"]])
    if _manifest_matches(out / MANIFEST_NAME, rows) and (out / GRID_NAME).is_file():
        return out / MANIFEST_NAME
    path = write_synthetic_manifest(rows, out)
    write_sample_grid(rows, out / GRID_NAME, grid_per_class)
    return path


def _manifest_matches(path: Path, rows: pd.DataFrame) -> bool:
    """Whether the manifest at `path` holds exactly `rows` (same columns' values, same order)."""
    if not path.is_file():
        return False
    try:
        stored = with_source_column(pd.read_parquet(path))  # a set from before `source_id` is not rewritten
    except (OSError, ValueError):  # unreadable: rewrite it
        return False
    wanted = rows[list(SYNTHETIC_COLUMNS)].reset_index(drop=True)
    return list(stored.columns) == list(wanted.columns) and stored.equals(wanted)


def write_sample_grid(rows: pd.DataFrame, path: str | Path, per_class: int = 8, cell: int = 64) -> Path:
    """One row of `per_class` images per class (cells of cell x cell px), written to `path` as PNG."""
    classes = sorted(rows["label"].unique())
    grid = Image.new("RGB", (per_class * cell, len(classes) * cell), "white")
    for r, label in enumerate(classes):
        for c, p in enumerate(rows[rows["label"] == label]["path"].iloc[:per_class]):
            with Image.open(p) as img:
                grid.paste(img.convert("RGB").resize((cell, cell), Image.Resampling.BICUBIC), (c * cell, r * cell))
    return atomic_write(path, lambda f: grid.save(f, format="PNG"))
