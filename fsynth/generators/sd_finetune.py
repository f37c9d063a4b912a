"""DataDream's generator fine-tuning: LoRA on Stable Diffusion's UNet and text encoder, trained on the real shots.

The recipe: rank-r LoRA (alpha = r, so scale 1) on the UNet attention projections (to_q, to_k, to_v, to_out.0)
and the text encoder's attention (q_proj, k_proj, v_proj, out_proj); the base weights and the VAE stay frozen.
Each shot is resized and centre-cropped to the generator resolution R, flipped horizontally at random, encoded to
VAE latents [B, 4, R/f, R/f] (f = the VAE's downsampling factor), noised at a random timestep and denoised by the
UNet conditioned on the text encoder's hidden states [B, 77, D] of its class prompt ("a {domain }photo of a
{class}"); the loss is the MSE to the true noise (to the velocity for v-prediction schedulers). AdamW, cosine
schedule with linear warm-up, gradients clipped at norm 1.

Scope `per_dataset` trains one LoRA on every class's shots; `per_class` one LoRA per class on that class's shots.
`ensure_sd_lora` is the cached artefact: a content-addressed folder `<out_root>/<dataset>-lora-<16 hex>`, built
in a staging folder (each LoRA written atomically, so an interrupted per-class job resumes) and renamed into
place. diffusers and peft are imported inside the functions that use them (they are slow to import).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from fsynth.cache import atomic_write, atomic_write_json, content_key, ensure_built, publish_dir, temp_sibling
from fsynth.config import GeneratorConfig, GeneratorFinetuneConfig
from fsynth.data.fewshot import folder_name
from fsynth.errors import FsynthError
from fsynth.generators.sd import folder_digest, load_sd_pipeline, model_folder, resolve_device
from fsynth.prompts import generation_prompt

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

FORMAT = "fsynth-sd-lora/1"
INFO_FILE = "finetune.json"
WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
LOSSES_FILE = "losses.json"  # next to each weights file: that LoRA's per-step losses
ADAPTER = "fsynth"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
ALL_CLASSES = "all"  # the loss key of a per-dataset LoRA
_SETTINGS_FIX = "pass --set generator.finetune.{key}=N with a positive N"


@dataclass
class LoraResult:
    """Trained LoRA weights in diffusers format (ready for `save_lora_weights`) and the training record."""

    unet: dict[str, torch.Tensor]  # '<module>.lora.down.weight' [r, in] / '<module>.lora.up.weight' [out, r]
    text_encoder: dict[str, torch.Tensor]  # '<module>.lora_linear_layer.down.weight' [r, in] / '.up.weight' [out, r]
    history: list[float]  # the loss of every optimiser step
    steps: int
    rank: int


@dataclass(frozen=True)
class _Models:
    """What one training step needs: the (LoRA-carrying) networks, the noise schedule and where to run."""

    unet: Any
    text_encoder: Any
    vae: Any
    noise: Any  # diffusers DDPMScheduler with the pipeline's training schedule
    device: torch.device
    precision: str  # "float32", or "bfloat16" for autocast on a GPU


def _check_settings(*, rank: int, lr: float, batch_size: int, epochs: int, warmup_steps: int) -> None:
    for key, value in (("lora_rank", rank), ("batch_size", batch_size), ("epochs", epochs)):
        if value < 1:
            raise FsynthError(f"generator.finetune.{key} must be at least 1, got {value}; "
                              + _SETTINGS_FIX.format(key=key))
    if lr <= 0 or warmup_steps < 0:
        raise FsynthError(f"generator.finetune needs lr > 0 and warmup_steps >= 0 (got lr {lr}, warmup_steps "
                          f"{warmup_steps}); fix them with --set generator.finetune.lr=... / warmup_steps=...")


def shots_to_pixels(images: Sequence[Image.Image], resolution: int) -> torch.Tensor:
    """N PIL images -> float32 [N, 3, R, R] in [-1, 1]: shorter side resized to R (bilinear), centre-cropped."""
    arrays = [np.asarray(ImageOps.fit(img.convert("RGB"), (resolution, resolution), Image.Resampling.BILINEAR),
                         dtype=np.float32) for img in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


def _token_ids(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Prompts -> int64 [N, L] token ids, padded/truncated to the tokenizer's length (77 for SD)."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def _add_lora(pipe: StableDiffusionPipeline, rank: int, seed: int) -> list[torch.nn.Parameter]:
    """Freeze the pipeline, add the `fsynth` LoRA adapter (seeded init) to UNet and text encoder; return its params.

    transformers' own `add_adapter` insists on a newer peft than diffusers needs, so the text encoder gets its
    adapter from peft's `inject_adapter_in_model` directly (the same LoRA layers).
    """
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig, inject_adapter_in_model

    if ADAPTER in (getattr(pipe.unet, "peft_config", None) or {}):
        raise FsynthError("this pipeline already carries an fsynth LoRA; pass a freshly loaded pipeline or its path")
    for model in (pipe.unet, pipe.text_encoder, pipe.vae):
        model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):  # LoRA A matrices start random: seed them, keep the caller's RNG
        torch.manual_seed(seed)
        pipe.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(UNET_TARGETS)), ADAPTER)
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TEXT_TARGETS)),
                                pipe.text_encoder, adapter_name=ADAPTER)
    params = [p for model in (pipe.unet, pipe.text_encoder) for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    cast_training_params([pipe.unet, pipe.text_encoder], dtype=torch.float32)  # trainable params in float32
    return params


def _autocast(m: _Models):
    if m.precision == "float32":
        return contextlib.nullcontext()
    return torch.autocast(m.device.type, dtype=getattr(torch, m.precision))


def _batch_loss(m: _Models, pixels: torch.Tensor, ids: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """Noise-prediction MSE on one batch: pixels [B, 3, R, R] in [-1, 1], token ids [B, L]; every draw from `rng`."""
    b = len(pixels)
    flip = (torch.rand(b, generator=rng) < 0.5).view(-1, 1, 1, 1)
    x = torch.where(flip, pixels.flip(-1), pixels).to(m.device)
    with torch.no_grad(), _autocast(m):
        latents = m.vae.encode(x).latent_dist.sample(generator=rng).float() * m.vae.config.scaling_factor
    # Draws come from the CPU generator, so a seed gives the same run on any device.
    noise = torch.randn(latents.shape, generator=rng).to(m.device)
    t = torch.randint(0, m.noise.config.num_train_timesteps, (b,), generator=rng).to(m.device)
    v_pred = m.noise.config.prediction_type == "v_prediction"  # SD 2.x 768 px; 2.1-base predicts epsilon
    target = m.noise.get_velocity(latents, noise, t) if v_pred else noise
    with _autocast(m):
        hidden = m.text_encoder(ids.to(m.device))[0]  # [B, L, D]
        pred = m.unet(m.noise.add_noise(latents, noise, t), t, encoder_hidden_states=hidden).sample
    return F.mse_loss(pred.float(), target.float())


def _train(m: _Models, params: list, pixels: torch.Tensor, ids: torch.Tensor, *, lr: float, weight_decay: float,
           warmup_steps: int, batch_size: int, epochs: int, seed: int,
           progress: Callable[[int, float], None] | None, steps: int = 0) -> list[float]:
    """AdamW + cosine-with-warm-up over seeded shuffles of the N shots; returns the per-step losses.

    `steps` 0: `epochs` shuffles; > 0: exactly `steps` optimiser steps (shuffle after shuffle, the last one cut
    short), so a shots ablation compares LoRAs trained for one budget. Equal counts give equal runs.
    """
    from diffusers.optimization import get_cosine_schedule_with_warmup

    n = len(pixels)
    steps = steps or epochs * math.ceil(n / batch_size)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = get_cosine_schedule_with_warmup(opt, warmup_steps, steps)
    rng = torch.Generator().manual_seed(seed)
    history: list[float] = []
    while len(history) < steps:
        order = torch.randperm(n, generator=rng)
        for start in range(0, n, batch_size):
            if len(history) == steps:
                break
            idx = order[start:start + batch_size]
            loss = _batch_loss(m, pixels[idx], ids[idx], rng)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            schedule.step()
            history.append(float(loss.detach()))
            if progress is not None:
                progress(len(history), history[-1])
    return history


def _lora_state(model: Any) -> dict[str, torch.Tensor]:
    """The model's `fsynth` adapter in diffusers' key format, as float32 CPU tensors."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model, adapter_name=ADAPTER))
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state.items()}


def finetune_sd_lora(
    pipe_or_path: StableDiffusionPipeline | str | Path, images: Sequence[Image.Image], prompts: Sequence[str], *,
    rank: int, lr: float, weight_decay: float, warmup_steps: int, batch_size: int, epochs: int, seed: int,
    resolution: int, device: str | torch.device = "cpu", precision: str = "float32",
    progress: Callable[[int, float], None] | None = None, steps: int = 0,
) -> LoraResult:
    """Train a LoRA on (image, prompt) pairs; `steps` optimiser steps, or (steps 0) `epochs * ceil(N / batch_size)`,
    `progress(step, loss)` after each.

    A path is loaded fresh; a pipeline object is trained in place: its UNet and text encoder keep the active
    adapter `fsynth` (base weights unchanged), so it generates with the LoRA straight away. `precision`
    "bfloat16" runs the forward passes under autocast (for a GPU; LoRA weights and optimiser stay float32).
    Deterministic on CPU for a seed; the caller's global torch RNG is left untouched.
    """
    _check_settings(rank=rank, lr=lr, batch_size=batch_size, epochs=epochs, warmup_steps=warmup_steps)
    if not images or len(images) != len(prompts):
        raise FsynthError(f"LoRA fine-tuning needs shots and one prompt per shot (got {len(images)} images, "
                          f"{len(prompts)} prompts); check the few-shot manifest's 'train' rows")
    from diffusers import DDPMScheduler

    dev = torch.device(device)
    if isinstance(pipe_or_path, (str, Path)):
        pipe = load_sd_pipeline(str(pipe_or_path), "float32", "", dev)
    else:
        pipe = pipe_or_path.to(dev)
    params = _add_lora(pipe, rank, seed)
    noise = DDPMScheduler.from_config(pipe.scheduler.config)
    if noise.config.prediction_type not in ("epsilon", "v_prediction"):
        raise FsynthError(f"cannot fine-tune a model with prediction_type '{noise.config.prediction_type}'; "
                          "use an epsilon or v_prediction Stable Diffusion model")
    m = _Models(pipe.unet.train(), pipe.text_encoder.train(), pipe.vae.eval(), noise, dev, precision)
    pixels, ids = shots_to_pixels(images, resolution), _token_ids(pipe.tokenizer, prompts)
    with torch.random.fork_rng(devices=[]):
        history = _train(m, params, pixels, ids, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                         batch_size=batch_size, epochs=epochs, seed=seed, progress=progress, steps=steps)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    return LoraResult(_lora_state(pipe.unet), _lora_state(pipe.text_encoder), history, len(history), rank)


def save_sd_lora(result: LoraResult, directory: str | Path) -> Path:
    """Write `directory/pytorch_lora_weights.safetensors` (atomically) for `pipe.load_lora_weights(directory)`."""
    from diffusers import StableDiffusionPipeline

    path = Path(directory).resolve() / WEIGHTS_FILE
    # diffusers writes only into a folder: it writes a scratch one beside the file, whose bytes are then published
    # atomically (temp sibling, fsync, rename).
    scratch = temp_sibling(path)
    try:
        # No alpha is stored: diffusers' loader then uses alpha = rank, i.e. scale 1, which is how we trained.
        StableDiffusionPipeline.save_lora_weights(scratch, unet_lora_layers=result.unet,
                                                  text_encoder_lora_layers=result.text_encoder)
        with open(scratch / WEIGHTS_FILE, "rb") as src:
            atomic_write(path, lambda f: shutil.copyfileobj(src, f))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


# ---- the cached artefact -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraPlan:
    """Everything `ensure_sd_lora` needs, picklable for remote tasks: where, what to train, and finetune.json."""

    final: Path  # <out_root>/<dataset>-lora-<16 hex>
    staging: Path  # <out_root>/.<dataset>-lora-<16 hex>.partial: the LoRAs land here first
    base_path: Path
    info: dict  # finetune.json without "losses"
    images: tuple  # PIL images of the shots, sorted by sample id
    class_names: tuple  # the class of each shot
    domain: str
    precision: str
    device: str

    def units(self) -> list[str]:
        """The LoRAs to train: ["all"] for per_dataset, the class names for per_class."""
        return list(self.info["classes"]) if self.per_class else [ALL_CLASSES]

    @property
    def per_class(self) -> bool:
        return self.info["scope"] == "per_class"

    def unit_dir(self, unit: str, root: Path | None = None) -> Path:
        """Where a LoRA's weights go: the staging (or `root`) folder itself, or its class subfolder."""
        base = self.staging if root is None else root
        return base / folder_name(unit) if self.per_class else base


def _read_shots(fewshot_manifest: str | Path) -> tuple[list[Image.Image], list[str], list[str], str]:
    """(shot images sorted by id, class of each, all class names in label order, 16-hex digest of the shot ids)."""
    from fsynth.synthetic import load_shots  # imported here: fsynth.synthetic's callers may import this module

    path = Path(fewshot_manifest)
    images, labels, classes, digest = load_shots(path.parent if path.suffix == ".parquet" else path)
    return images, [classes[y] for y in labels], classes, digest[:16]


def plan_sd_lora(base_model: str, fewshot_manifest: str | Path, gcfg: GeneratorConfig, out_root: str | Path, *,
                 dataset: str, domain: str, device: str | torch.device | None = None) -> LoraPlan:
    """Check the settings, read the shots and name the content-addressed folder (hash of all that decides it).

    The address covers the base model's content digest, the shot ids, the finetune settings, resolution, seed,
    domain and class names; not the device (cuda when there is one: bfloat16 autocast there, float32 on CPU).
    """
    ft: GeneratorFinetuneConfig = gcfg.finetune
    _check_settings(rank=ft.lora_rank, lr=ft.lr, batch_size=ft.batch_size, epochs=ft.epochs,
                    warmup_steps=ft.warmup_steps)
    base = model_folder(base_model)  # a local folder, or a hub id's cached snapshot (never downloads)
    images, names, classes, shots_digest = _read_shots(fewshot_manifest)
    finetune = {k: v for k, v in dataclasses.asdict(ft).items() if k not in ("enabled", "scope")}
    info = {"format": FORMAT, "scope": ft.scope, "base_model": str(base_model), "base_digest": folder_digest(base)[:16],
            "finetune": finetune, "resolution": gcfg.resolution, "seed": gcfg.base_seed, "domain": domain,
            "shots_digest": shots_digest, "classes": classes}
    key = {k: v for k, v in info.items() if k != "base_model"}  # the content, not where it was found
    key["finetune"] = _budget_key(finetune)
    name = f"{dataset}-lora-{content_key(key)}"  # = sha256(json.dumps(key, sort_keys=True))[:16]: plain JSON values
    root = Path(out_root).resolve()
    dev = resolve_device(device)
    return LoraPlan(root / name, root / f".{name}.partial", base, info, tuple(images), tuple(names), domain,
                    "bfloat16" if dev.type == "cuda" else "float32", str(dev))


def _budget_key(finetune: dict) -> dict:
    """The finetune settings as the address sees them: a step count replaces the epochs it overrides, and
    steps 0 is left out, so a LoRA trained before `steps` existed keeps its folder."""
    if finetune.get("steps", 0) > 0:
        return {k: v for k, v in finetune.items() if k != "epochs"}
    return {k: v for k, v in finetune.items() if k != "steps"}


def _unit_done(folder: Path) -> bool:
    return (folder / WEIGHTS_FILE).is_file() and (folder / LOSSES_FILE).is_file()


def _write_json(path: Path, payload: dict) -> None:
    atomic_write_json(path, payload, indent=2)


def finetune_one_class(plan: LoraPlan, unit: str, *, log: Callable[[str], None] | None = None) -> Path:
    """Train and save one LoRA of the plan (a class name, or "all" for per_dataset) into the staging folder.

    Reuses a finished one. For parallel classes (e.g. remote tasks): `plan = plan_sd_lora(...)`, then
    `finetune_one_class(plan, c)` for each c in `plan.units()` anywhere that sees `out_root`, then
    `finish_sd_lora(plan)`. Safe to run for different classes at once; two runs of the same class train it
    once (the other waits on the unit's lock, then reuses it).
    """
    log = log or (lambda _msg: None)
    if _complete(plan, plan.final):
        log(f"reusing LoRA '{unit}' in {plan.final}")
        return plan.unit_dir(unit, plan.final)
    target = plan.unit_dir(unit)
    pick = [i for i, c in enumerate(plan.class_names) if not plan.per_class or c == unit]
    if not pick:
        raise FsynthError(f"class '{unit}' has no shots in the few-shot manifest; prepare the shots again")

    def build() -> Path:
        ft, start = plan.info["finetune"], time.perf_counter()
        result = finetune_sd_lora(
            plan.base_path, [plan.images[i] for i in pick],
            [generation_prompt(plan.class_names[i], plan.domain) for i in pick], rank=ft["lora_rank"], lr=ft["lr"],
            weight_decay=ft["weight_decay"], warmup_steps=ft["warmup_steps"], batch_size=ft["batch_size"],
            epochs=ft["epochs"], seed=plan.info["seed"], resolution=plan.info["resolution"], device=plan.device,
            precision=plan.precision, steps=ft.get("steps", 0))
        _store_unit(result, plan, unit)
        log(f"trained LoRA '{unit}' ({result.steps} steps, loss {result.history[0]:.4f} -> "
            f"{result.history[-1]:.4f}) in {time.perf_counter() - start:.1f} s")
        return target

    lock = plan.final.parent / f"{plan.final.name}.{target.name}"  # beside, not inside, the folder renamed at the end
    _, built = ensure_built(lock, lambda: target if _unit_done(target) else None, build, log)
    if not built:
        log(f"reusing LoRA '{unit}' in {target}")
    return target


def _store_unit(result: LoraResult, plan: LoraPlan, unit: str) -> None:
    """Weights + losses.json into the unit's staging folder: a class folder appears whole, or not at all."""
    plan.staging.mkdir(parents=True, exist_ok=True)

    def fill(work: Path) -> None:
        _write_json(work / LOSSES_FILE, {"steps": result.steps, "history": result.history})
        save_sd_lora(result, work)  # written last: its presence marks the unit done

    if plan.per_class:  # replace=False: another task finished this class first: keep theirs
        publish_dir(plan.unit_dir(unit), fill, replace=False)
    else:  # the staging folder itself: each file is written atomically, the weights last
        fill(plan.unit_dir(unit))


def _complete(plan: LoraPlan, folder: Path) -> bool:
    try:
        info = json.loads((folder / INFO_FILE).read_text())
    except (OSError, ValueError):
        return False
    return info.get("format") == FORMAT and all((plan.unit_dir(u, folder) / WEIGHTS_FILE).is_file()
                                                for u in plan.units())


def _unit_losses(plan: LoraPlan) -> dict[str, list[float]]:
    """{unit: [first loss, last loss]} from each staged LoRA's losses.json; FsynthError if one is missing."""
    losses = {}
    for unit in plan.units():
        if not _unit_done(plan.unit_dir(unit)):
            raise FsynthError(f"LoRA '{unit}' of {plan.final.name} is not trained yet; run finetune_one_class for it")
        history = json.loads((plan.unit_dir(unit) / LOSSES_FILE).read_text())["history"]
        losses[unit] = [history[0], history[-1]]
    return losses


def finish_sd_lora(plan: LoraPlan) -> Path:
    """Write finetune.json into the staging folder (all LoRAs must be there) and rename it to the final folder."""
    if _complete(plan, plan.final):
        return plan.final
    try:
        _write_json(plan.staging / INFO_FILE, {**plan.info, "losses": _unit_losses(plan)})
        # Not publish_dir: the staging folder is filled over several resumable calls (one per LoRA, maybe on other
        # machines), each of its files already published atomically; only this last rename makes it the artefact.
        os.replace(plan.staging, plan.final)
    except (OSError, FsynthError) as exc:  # another process may have finished it first: then use theirs
        if _complete(plan, plan.final):
            shutil.rmtree(plan.staging, ignore_errors=True)
            return plan.final
        if isinstance(exc, FsynthError):
            raise
        raise FsynthError(f"cannot move {plan.staging} to {plan.final} ({exc.strerror}); delete {plan.final} if "
                          "it is left from an old run, and run again") from None
    return plan.final


def ensure_sd_lora(base_model: str, fewshot_manifest: str | Path, gcfg: GeneratorConfig, out_root: str | Path, *,
                   dataset: str, domain: str, device: str | torch.device | None = None,
                   log: Callable[[str], None] | None = None) -> Path:
    """The fine-tuned LoRA folder for these shots and settings: reused when complete, else trained and written.

    Layout: finetune.json, and pytorch_lora_weights.safetensors (per_dataset) or one
    <class folder>/pytorch_lora_weights.safetensors per class (per_class); each LoRA has a losses.json beside it.
    Classes are trained one after another; already finished ones (an interrupted run) are reused.
    """
    log = log or (lambda _msg: None)
    plan = plan_sd_lora(base_model, fewshot_manifest, gcfg, out_root, dataset=dataset, domain=domain, device=device)
    if _complete(plan, plan.final):
        log(f"reusing fine-tuned LoRA {plan.final}")
        return plan.final
    for unit in plan.units():
        finetune_one_class(plan, unit, log=log)
    return finish_sd_lora(plan)
