"""The `sd` backend: a diffusers Stable Diffusion pipeline, optionally with DataDream LoRA weights.

Shapes: a call turns N rows into latents [N, 4, R/8, R/8] (R = resolution), each row's drawn from its own CPU
`torch.Generator` seeded with the row's seed (so an image depends neither on its batch nor on the device), and
decodes them to N RGB PIL images of R x R. Text conditioning is [N, 77, D] (D = the text encoder's width).

`model` is a local diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
scheduler/) or a hub id. A cached hub model is read from the cache first, so a cached model never waits for an
unreachable hub; an uncached one fails at once with HF_HUB_OFFLINE=1 and with a one-line FsynthError after the
hub times out without it.

LoRA weights (`lora_path`) are one of
- a `.safetensors` file, or a folder holding `pytorch_lora_weights.safetensors` (diffusers' `save_lora_weights`);
- a folder written by fsynth.generators.sd_finetune with `finetune.json` {"scope": "per_class", ...} and one
  subfolder per class (`fsynth.data.fewshot.folder_name(class_name)`) holding that file: every class adapter is
  loaded once and each row uses its class's adapter; scope "per_dataset" keeps the weights in the folder itself.
A LoRA file none or only part of whose tensors land in the pipeline is an error, never a silent no-op.

diffusers is imported inside the functions that use it: it takes seconds to import.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fsynth.cache import content_key
from fsynth.errors import FsynthError
from fsynth.hub import hub_offline

if TYPE_CHECKING:
    import pandas as pd
    from diffusers import StableDiffusionPipeline
    from PIL import Image


DEFAULT_MODEL = "stabilityai/stable-diffusion-2-1-base"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SCHEDULERS = {
    "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler", "ddpm": "DDPMScheduler",
}
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
FINETUNE_FILE = "finetune.json"
SHARED = ""  # key of the one adapter every row uses (a single file or scope per_dataset)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CHUNK = 1 << 20
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


# ---------------------------------------------------------------------------------------------- content digests
def file_digest(path: str | Path) -> str:
    """sha256 hex of a file's bytes, read in 1 MB chunks; cached per (absolute path, size, mtime)."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _FILE_DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                digest.update(chunk)
        _FILE_DIGESTS[key] = digest.hexdigest()
    return _FILE_DIGESTS[key]


def folder_digest(directory: str | Path) -> str:
    """sha256 hex over (relative path, file digest) of every file in sorted relative-path order.

    Hidden files and folders (a leading '.', e.g. the `.cache/` that `hf download --local-dir` writes) are
    skipped: they hold download metadata, not weights. Symlinks (a hub snapshot's files) are followed.
    """
    root = Path(directory).resolve()
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [Path(folder, n) for n in names if not n.startswith(".") and os.path.isfile(Path(folder, n))]
    digest = hashlib.sha256()
    for rel, path in sorted((p.relative_to(root).as_posix(), p) for p in files):
        digest.update(f"{rel}\0{file_digest(path)}\n".encode())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- pipeline loading
def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device`, or cuda when there is one and cpu otherwise."""
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The torch dtype for `dtype`; float16 on CPU becomes float32 with a `warnings.warn` (CPU half is slow).

    A warning, not a log callback: the backend has no logger of its own, and callers that care can turn it into
    an error or record it with the `warnings` machinery.
    """
    if dtype not in DTYPES:
        raise FsynthError(f"unknown generator dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    if dtype == "float16" and device.type == "cpu":
        warnings.warn("generator.dtype float16 on CPU is slow and some ops lack half kernels; using float32",
                      stacklevel=3)
        return torch.float32
    return DTYPES[dtype]


def _looks_like_path(model: str) -> bool:
    """True for an absolute or ./ ../ ~ path, or one with a separator that is not of the form org/name."""
    if os.path.isabs(model) or model in (".", "..") or model.startswith(("./", "../", "~", ".\\", "..\\")):
        return True
    has_sep = os.sep in model or "/" in model or (os.altsep is not None and os.altsep in model)
    return has_sep and not _HUB_ID.match(model)


def local_model_folder(model: str) -> Path | None:
    """The local folder `model` names, None for a hub id; FsynthError for a path that does not exist."""
    path = Path(os.path.expanduser(model))
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise FsynthError(f"generator model {path} is not a diffusers pipeline folder (no model_index.json); "
                              "pass a folder written by save_pretrained or a hub id")
        return path.resolve()
    if _looks_like_path(model):
        raise FsynthError(f"generator model path {model} does not exist; pass a diffusers pipeline folder or a "
                          "hub id")
    return None


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message, with the next one when the first only introduces it (':')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    return " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def _not_cached_error(model: str) -> FsynthError:
    return FsynthError(f"generator model {model} is not in the local Hugging Face cache and the hub is offline or "
                       f"unreachable; download it where there is network (hf download {model}) or pass a local "
                       "pipeline folder")


def check_model(model: str) -> None:
    """Fail in a second, without importing diffusers, on a model that cannot load here: a path that does not exist
    or is no pipeline folder, or (HF_HUB_OFFLINE set) a hub id whose pipeline is not in the cache."""
    if local_model_folder(model) is not None or not hub_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(model, "model_index.json"), str):
        raise _not_cached_error(model)


def _hub_error(model: str, exc: Exception) -> FsynthError:
    """One-line error for a failed hub load: not cached and offline/unreachable, or another hub problem."""
    chain, cur = [], exc
    while cur is not None and len(chain) < 8:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    names = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain).lower()
    offline = (hub_offline()
               or bool(names & {"ConnectError", "ConnectTimeout", "ConnectionError", "OfflineModeIsEnabled",
                                "LocalEntryNotFoundError", "TimeoutException", "ReadTimeout"})
               or "cached" in text or "connect" in text)
    if offline:
        return _not_cached_error(model)
    return FsynthError(f"cannot load generator model {model} from the hub ({_first_line(exc)}); check the hub id "
                       "or pass a local pipeline folder")


def _from_pretrained(source: str | Path, torch_dtype: torch.dtype, hub: bool) -> StableDiffusionPipeline:
    """StableDiffusionPipeline.from_pretrained without a safety checker; a cached hub id is read offline first."""
    kwargs = dict(safety_checker=None, requires_safety_checker=False, dtype=torch_dtype)
    with _no_progress_bars():
        return _load(source, kwargs, hub)


@contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Loading bars of diffusers and transformers off: a failed load then leaves exactly one line on stderr."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.enable_progress_bar()
        tlog.enable_progress_bar()


def _load(source: str | Path, kwargs: dict, hub: bool) -> StableDiffusionPipeline:
    from diffusers import StableDiffusionPipeline
    from huggingface_hub import try_to_load_from_cache

    if hub and isinstance(try_to_load_from_cache(str(source), "model_index.json"), str):
        try:  # fully cached: no hub round trip (which hangs ~46 s when the hub is unreachable)
            return StableDiffusionPipeline.from_pretrained(source, local_files_only=True, **kwargs)
        except (OSError, ValueError):
            pass  # partly cached: let the normal path download what is missing
    try:
        with _quiet() if hub else nullcontext():  # the hub client logs its failures; ours is the one line
            return StableDiffusionPipeline.from_pretrained(source, **kwargs)
    except Exception as exc:  # noqa: BLE001 - hub and loader errors have no common base; all become one line
        if hub:
            raise _hub_error(str(source), exc) from None
        raise FsynthError(f"cannot load the Stable Diffusion pipeline in {source} ({_first_line(exc)}); pass a "
                          "folder written by StableDiffusionPipeline.save_pretrained") from None


def set_scheduler(pipe: StableDiffusionPipeline, scheduler: str) -> None:
    """Replace the pipeline's scheduler by the named one (same noise schedule config); "" keeps it."""
    if not scheduler:
        return
    import diffusers

    cls = getattr(diffusers, _scheduler_class(scheduler))
    pipe.scheduler = cls.from_config(pipe.scheduler.config)


def _scheduler_class(scheduler: str) -> str:
    if scheduler not in SCHEDULERS:
        raise FsynthError(f"unknown generator scheduler '{scheduler}'; use one of {', '.join(SCHEDULERS)} "
                          "(or '' for the pipeline's own)")
    return SCHEDULERS[scheduler]


def load_sd_pipeline(model: str = DEFAULT_MODEL, dtype: str = "float32", scheduler: str = "",
                     device: str | torch.device | None = None) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline from a local folder or hub id, on `device`, without safety checker or progress bar.

    dtype: float32 / float16 / bfloat16 (float16 on CPU falls back to float32 with a warning, see resolve_dtype);
    scheduler: "" keeps the pipeline's own, else one of SCHEDULERS. Every failure is a one-line FsynthError.
    """
    if scheduler:
        _scheduler_class(scheduler)  # a bad name fails before the slow load
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    folder = local_model_folder(model)
    pipe = _from_pretrained(folder if folder is not None else model, torch_dtype, hub=folder is None)
    set_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(dev)


def model_folder(model: str) -> Path:
    """The folder a loaded `model` came from: the local folder, or the hub id's cached snapshot."""
    folder = local_model_folder(model)
    if folder is not None:
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model, local_files_only=True))
    except Exception as exc:  # noqa: BLE001
        raise _hub_error(model, exc) from None


# ---------------------------------------------------------------------------------------------- LoRA
def _lora_fix(path: Path) -> str:
    return (f"LoRA file {path} does not fit the generator model; was it trained for this base model? Pass the "
            "LoRA fine-tuned for generator.model or leave generator.lora_path empty")


def find_lora_files(lora_path: str | Path) -> dict[str, Path]:
    """The LoRA weight files under `lora_path`: {SHARED: file} for one adapter, {class folder: file} per class."""
    path = Path(os.path.expanduser(str(lora_path))).resolve()
    if path.is_file():
        return {SHARED: path}
    if not path.is_dir():
        raise FsynthError(f"generator LoRA path {path} does not exist; pass a .safetensors file, a folder with "
                          f"{LORA_WEIGHTS}, or a fine-tuning output folder")
    scope = "per_dataset"
    if (path / FINETUNE_FILE).is_file():
        try:
            scope = json.loads((path / FINETUNE_FILE).read_text()).get("scope", "per_dataset")
        except (OSError, ValueError, AttributeError) as exc:
            raise FsynthError(f"cannot read {path / FINETUNE_FILE} ({_first_line(exc)}); fine-tune the generator "
                              "again") from None
    if scope == "per_class":
        files = {d.name: d / LORA_WEIGHTS for d in sorted(path.iterdir()) if (d / LORA_WEIGHTS).is_file()}
        if not files:
            raise FsynthError(f"per-class LoRA folder {path} has no <class>/{LORA_WEIGHTS}; fine-tune the "
                              "generator again")
        return files
    if scope != "per_dataset":
        raise FsynthError(f"{path / FINETUNE_FILE} has unknown scope '{scope}'; use per_class or per_dataset")
    if not (path / LORA_WEIGHTS).is_file():
        raise FsynthError(f"generator LoRA folder {path} has no {LORA_WEIGHTS}; pass the folder that "
                          "save_lora_weights wrote or the .safetensors file itself")
    return {SHARED: path / LORA_WEIGHTS}


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence diffusers/transformers logging and peft's multi-adapter warning; failures are raised instead.

    (transformers prints a 'LOAD REPORT' calling every base weight of the text encoder MISSING when a LoRA is
    loaded; the base weights are in fact untouched.)
    """
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    before = (dlog.get_verbosity(), tlog.get_verbosity())
    dlog.set_verbosity(logging.CRITICAL)
    tlog.set_verbosity(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*peft_config.*multiple adapters")
            yield
    finally:
        dlog.set_verbosity(before[0])
        tlog.set_verbosity(before[1])


def _adapter_tensors(pipe: StableDiffusionPipeline, adapter: str) -> int:
    """How many LoRA tensors of `adapter` sit in the UNet and the text encoder."""
    from peft.utils import get_peft_model_state_dict

    count = 0
    for module in (pipe.unet, pipe.text_encoder):
        if adapter in (getattr(module, "peft_config", None) or {}):
            count += len(get_peft_model_state_dict(module, adapter_name=adapter))
    return count


def load_lora(pipe: StableDiffusionPipeline, file: Path, adapter: str) -> None:
    """Load one LoRA file as `adapter`; FsynthError unless every tensor in it landed in the UNet/text encoder.

    diffusers only logs a warning for LoRA keys that match no module, so a file for another model could load
    as a partial or empty adapter; the count of tensors the pipeline now holds for `adapter` is checked against
    the file's.
    """
    if any(adapter in names for names in pipe.get_list_adapters().values()):
        raise FsynthError(f"the generator pipeline already holds a LoRA adapter named {adapter}; load a fresh "
                          "pipeline for each LoRA generator")
    try:
        with _quiet():
            state_dict, _ = pipe.lora_state_dict(str(file))
            wanted = len(state_dict)
            pipe.load_lora_weights(str(file), adapter_name=adapter)
    except Exception as exc:  # noqa: BLE001 - safetensors, peft and torch raise different types for a bad file
        _drop_adapter(pipe, adapter)
        raise FsynthError(f"{_lora_fix(file)} ({_first_line(exc)[:200]})") from None
    loaded = _adapter_tensors(pipe, adapter)
    if wanted == 0 or loaded < wanted:
        _drop_adapter(pipe, adapter)
        raise FsynthError(f"{_lora_fix(file)} (only {loaded} of its {wanted} LoRA tensors match the model)")


def _drop_adapter(pipe: StableDiffusionPipeline, adapter: str) -> None:
    try:
        with _quiet():
            pipe.delete_adapters(adapter)
    except Exception:  # noqa: BLE001 - nothing (or only part) was loaded; the pipeline stays usable either way
        pass


# ---------------------------------------------------------------------------------------------- the generator
class SDGenerator:
    """A loaded pipeline plus sampling settings; `generate(rows)` gives one RGB R x R image per row.

    lora_files: {} for none, {SHARED: file} for one adapter, or {class folder name: file} per class (rows pick
    their adapter by `folder_name(class_name)`); each adapter is loaded once, here, and scaled by lora_scale.
    model_digest: a content digest of the pipeline's weights (`folder_digest(model_folder(model))`).
    """

    def __init__(self, pipe: StableDiffusionPipeline, model_digest: str, *, guidance_scale: float = 2.0,
                 steps: int = 50, resolution: int = 512, negative_prompt: str = "",
                 lora_files: Mapping[str, Path] | None = None, lora_scale: float = 1.0) -> None:
        if resolution % 8 or resolution < 8 or steps < 1:
            raise FsynthError(f"the sd generator needs a resolution divisible by 8 and steps >= 1 (got "
                              f"resolution {resolution}, steps {steps}); fix generator.resolution / steps")
        self.pipe, self.model_digest = pipe, model_digest
        self.guidance_scale, self.steps, self.resolution = float(guidance_scale), int(steps), int(resolution)
        self.negative_prompt, self.lora_scale = negative_prompt, float(lora_scale)
        self.lora_files = {k: Path(v) for k, v in (lora_files or {}).items()}
        self.adapters = {key: ("fsynth" if key == SHARED else f"fsynth_class{i}")
                         for i, key in enumerate(sorted(self.lora_files))}
        for key, name in self.adapters.items():
            load_lora(pipe, self.lora_files[key], name)
        self.fingerprint = self._fingerprint()

    def _fingerprint(self) -> str:
        """First 16 hex of sha256 over the model digest, LoRA digests + scale, scheduler, settings and dtype."""
        sched = self.pipe.scheduler
        payload: dict[str, Any] = {
            "model": self.model_digest,
            "scheduler": [type(sched).__name__, {k: v for k, v in sched.config.items() if not k.startswith("_")}],
            "steps": self.steps, "guidance_scale": self.guidance_scale, "resolution": self.resolution,
            "negative_prompt": self.negative_prompt, "dtype": str(self.pipe.unet.dtype),
        }
        if self.lora_files:
            payload["lora"] = sorted((k, file_digest(f)) for k, f in self.lora_files.items())
            payload["lora_scale"] = self.lora_scale
        return content_key(payload)

    def _adapter_for(self, class_name: str) -> str | None:
        """The adapter a row of `class_name` uses (None without LoRA)."""
        if not self.adapters:
            return None
        if SHARED in self.adapters:
            return self.adapters[SHARED]
        from fsynth.data.fewshot import folder_name

        key = folder_name(str(class_name))
        if key not in self.adapters:
            raise FsynthError(f"no per-class LoRA for class '{class_name}' (folder {key}) among "
                              f"{', '.join(sorted(self.adapters))}; fine-tune the generator on this dataset's classes")
        return self.adapters[key]

    def generate(self, rows: pd.DataFrame) -> list[Image.Image]:
        """One RGB resolution x resolution image per row (columns label, class_name, prompt, seed), in row order.

        Rows are grouped by LoRA adapter (one group without per-class LoRA); each group is one pipeline call.
        """
        from fsynth.generators.base import ROW_COLUMNS

        missing = [c for c in ROW_COLUMNS if c not in rows.columns]
        if missing:
            raise FsynthError(f"generator rows lack columns {', '.join(missing)}; pass rows of the prompt table")
        groups: dict[str | None, list[int]] = {}
        for i, class_name in enumerate(rows["class_name"]):
            groups.setdefault(self._adapter_for(class_name), []).append(i)
        images: list[Image.Image | None] = [None] * len(rows)
        for adapter, idx in groups.items():
            for i, img in zip(idx, self._call(adapter, rows.iloc[idx]), strict=True):
                images[i] = img
        return images  # type: ignore[return-value]

    def _call(self, adapter: str | None, rows: pd.DataFrame) -> list[Image.Image]:
        """One pipeline call for N rows: latents [N, 4, R/8, R/8] from N CPU generators -> N RGB images R x R."""
        self._use_adapter(adapter)
        out = self.pipe(**self._common(rows), height=self.resolution, width=self.resolution)
        return self._rgb(out.images)

    def _use_adapter(self, adapter: str | None) -> None:
        if adapter is not None:
            self.pipe.set_adapters([adapter], adapter_weights=[self.lora_scale])

    def _common(self, rows: pd.DataFrame) -> dict[str, Any]:
        """The pipeline arguments text-to-image and image-to-image share: prompts, one seeded CPU generator per
        row, the negative prompt, steps and guidance."""
        prompts = [str(p) for p in rows["prompt"]]
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in rows["seed"]]
        return {"prompt": prompts, "generator": generators,
                "negative_prompt": [self.negative_prompt] * len(prompts) if self.negative_prompt else None,
                "num_inference_steps": self.steps, "guidance_scale": self.guidance_scale, "output_type": "pil"}

    def _rgb(self, images: list[Image.Image]) -> list[Image.Image]:
        size = (self.resolution, self.resolution)
        return [img if img.size == size else img.resize(size) for img in (i.convert("RGB") for i in images)]
