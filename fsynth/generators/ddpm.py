"""The `ddpm` backend: a small class-conditional diffusion model trained on the real shots.

It is the embedded default's offline analogue of DataDream's fine-tuned Stable Diffusion: a diffusers
`UNet2DModel` with class embeddings, trained with the DDPM noise-prediction loss and sampled with DDIM (eta 1 by
default: ancestral sampling over the step subsequence; see `sample_images`).
Shapes: an image batch is float32 [N, C, R, R] in [-1, 1] (C = channels, R = resolution), labels are int64 [N].

diffusers is imported inside the functions that use it: it takes ~15 s to import on a small machine, and
modules that only need the dataclass or the synthetic-set manifest should not pay for it.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fsynth.cache import content_key, ensure_built, publish_dir
from fsynth.errors import FsynthError
from fsynth.generators.base import SourceShots, denoising_steps

if TYPE_CHECKING:
    from diffusers import UNet2DModel

TRAIN_TIMESTEPS = 1000
# The DDPM paper's linear schedule; DDIM sampling reads the same config so both see the same alphas.
SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": TRAIN_TIMESTEPS, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02,
    "prediction_type": "epsilon", "clip_sample": True,
}
FORMAT = "fsynth-ddpm/1"
CONFIG_FILE = "generator.json"
UNET_DIR = "unet"
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
_RESAMPLE = Image.Resampling.BICUBIC


@dataclass
class DDPMGenerator:
    """A trained class-conditional UNet, its noise schedule, and the sha256 fingerprint of weights + config."""

    unet: UNet2DModel
    schedule: dict[str, Any]  # diffusers scheduler config of the training noise schedule
    resolution: int
    channels: int
    num_classes: int
    fingerprint: str = ""  # "" = compute it from the weights and config
    training: dict[str, Any] = field(default_factory=dict)  # provenance: steps, lr, seed, digest of the shots

    def __post_init__(self) -> None:
        if not self.fingerprint:
            self.fingerprint = compute_fingerprint(self)

    def meta(self) -> dict[str, Any]:
        """Everything that determines the generator except its weights (what generator.json stores)."""
        return {"format": FORMAT, "schedule": dict(self.schedule), "resolution": self.resolution,
                "channels": self.channels, "num_classes": self.num_classes, "training": dict(self.training)}


def compute_fingerprint(gen: DDPMGenerator) -> str:
    """First 16 hex chars of sha256(config JSON, then each weight tensor's name and bytes in name order).

    A streaming digest of many tensors (not one payload), so it stays hashlib rather than `content_key`."""
    unet_config = {k: v for k, v in gen.unet.config.items() if not k.startswith("_")}
    digest = hashlib.sha256(json.dumps([gen.meta(), unet_config], sort_keys=True, default=str).encode())
    for name, tensor in sorted(gen.unet.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# Half the widths of the first design: a training step costs 0.44 s instead of 0.92 s at batch 64 on 2 CPU
# threads (32 px), which keeps the embedded default's fresh run near 20 minutes.
DEFAULT_WIDTHS = (16, 32, 32)


def build_unet(num_classes: int, resolution: int = 32, channels: int = 1,
               widths: Sequence[int] = DEFAULT_WIDTHS) -> UNet2DModel:
    """A class-conditional UNet: (x [N, C, R, R], t [N], class_labels [N]) -> noise estimate [N, C, R, R].

    One ResNet layer per level; attention only at the lowest level (R / 2**(levels-1), 8x8 for R = 32) and in
    the mid block, where it is cheap. (16, 32, 32) at R = 32 is ~0.28 M parameters, (32, 64, 64) ~1.1 M.
    """
    from diffusers import UNet2DModel

    levels = len(widths)
    if num_classes < 1 or resolution % 2 ** (levels - 1):
        raise FsynthError(f"cannot build a DDPM UNet for {num_classes} classes at resolution {resolution} with "
                          f"{levels} levels; use at least 1 class and a resolution divisible by {2 ** (levels - 1)}")
    return UNet2DModel(
        sample_size=resolution, in_channels=channels, out_channels=channels, block_out_channels=tuple(widths),
        layers_per_block=1, down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1), num_class_embeds=num_classes,
        norm_num_groups=math.gcd(8, *widths), attention_head_dim=8,
    )


def images_to_tensor(images: Sequence[Image.Image], resolution: int, channels: int) -> torch.Tensor:
    """N PIL images of any size and mode -> float32 [N, C, R, R] in [-1, 1] (grey when C == 1)."""
    mode = "L" if channels == 1 else "RGB"
    arrays = [np.asarray(img.convert(mode).resize((resolution, resolution), _RESAMPLE), dtype=np.float32)
              for img in images]
    x = torch.from_numpy(np.stack(arrays))
    x = x.unsqueeze(1) if channels == 1 else x.permute(0, 3, 1, 2)
    return x / 127.5 - 1.0


def tensor_to_images(x: torch.Tensor, out_size: int | None = None) -> list[Image.Image]:
    """float [N, C, R, R] in [-1, 1] -> N RGB PIL images, R x R or out_size x out_size."""
    pixels = ((x.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    images = [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p).convert("RGB") for p in pixels]
    if out_size:
        images = [img.resize((out_size, out_size), _RESAMPLE) for img in images]
    return images


def _check_inputs(labels: Sequence[int], num_classes: int, other: Sequence, what: str) -> None:
    if len(labels) != len(other):
        raise FsynthError(f"{len(labels)} labels for {len(other)} {what}; pass one label per {what[:-1]}")
    bad = [y for y in labels if not 0 <= int(y) < num_classes]
    if bad:
        raise FsynthError(f"label {bad[0]} is outside 0..{num_classes - 1}; labels index the generator's classes")


def _noise_loss(unet: UNet2DModel, noise_sched: Any, x0: torch.Tensor, y: torch.Tensor, batch_size: int,
                rng: torch.Generator) -> torch.Tensor:
    """MSE between true and predicted noise on a batch drawn (with replacement) from x0 [N, C, R, R]."""
    device = x0.device
    idx = torch.randint(len(x0), (batch_size,), generator=rng).to(device)
    flip = (torch.rand(batch_size, generator=rng) < 0.5).view(-1, 1, 1, 1).to(device)
    x = torch.where(flip, x0[idx].flip(-1), x0[idx])  # horizontal flip: the only augmentation
    # Every random draw comes from the CPU generator, so a seed gives the same run on any device.
    noise = torch.randn(x.shape, generator=rng).to(device)
    t = torch.randint(0, TRAIN_TIMESTEPS, (batch_size,), generator=rng).to(device)
    pred = unet(noise_sched.add_noise(x, noise, t), t, class_labels=y[idx]).sample
    return F.mse_loss(pred, noise)


def train_ddpm(
    images: Sequence[Image.Image], labels: Sequence[int], num_classes: int, *, steps: int, batch_size: int,
    lr: float, weight_decay: float, warmup_steps: int, seed: int, resolution: int = 32, channels: int = 1,
    device: str | torch.device = "cpu", progress: Callable[[int, float], None] | None = None,
    widths: Sequence[int] = DEFAULT_WIDTHS,
) -> DDPMGenerator:
    """Train a class-conditional noise predictor on the shots (x0 [N, C, R, R], labels [N]) from scratch.

    AdamW with a cosine schedule after `warmup_steps` of linear warm-up; `progress(step, loss)` after each step;
    `widths` are the UNet's channels per level (see `build_unet`).
    Deterministic on CPU for a given seed; the caller's global torch RNG is left untouched.
    """
    _check_inputs(labels, num_classes, images, "images")
    if steps < 1 or batch_size < 1 or not images:
        raise FsynthError(f"DDPM training needs images, steps >= 1 and batch_size >= 1 (got {len(images)} "
                          f"images, steps {steps}, batch_size {batch_size}); fix the generator settings")
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup

    x0 = images_to_tensor(images, resolution, channels).to(device)
    y = torch.as_tensor([int(v) for v in labels], dtype=torch.long, device=device)
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's global RNG
        torch.manual_seed(seed)
        unet = build_unet(num_classes, resolution, channels, widths).to(device)
    noise_sched = DDPMScheduler.from_config(SCHEDULE)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=weight_decay)
    lr_sched = get_cosine_schedule_with_warmup(opt, warmup_steps, steps)
    rng = torch.Generator().manual_seed(seed)
    unet.train()
    for step in range(1, steps + 1):
        loss = _noise_loss(unet, noise_sched, x0, y, batch_size, rng)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)  # early steps on few images can spike
        opt.step()
        lr_sched.step()
        if progress is not None:
            progress(step, float(loss.detach()))
    training = {"steps": steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
                "warmup_steps": warmup_steps, "seed": seed, "shots": len(images), "widths": list(widths)}
    return DDPMGenerator(unet.eval(), dict(SCHEDULE), resolution, channels, num_classes, training=training)


def save_generator(gen: DDPMGenerator, directory: str | Path) -> Path:
    """Write `directory/unet` (safetensors + diffusers config) and `directory/generator.json`; return directory.

    Everything is written to a sibling temp folder first and renamed into place (replacing an older copy), so a
    reader never sees half.
    """

    def fill(tmp: Path) -> None:
        gen.unet.save_pretrained(tmp / UNET_DIR, safe_serialization=True)
        (tmp / CONFIG_FILE).write_text(json.dumps({**gen.meta(), "fingerprint": gen.fingerprint}, indent=2))

    return publish_dir(Path(directory).resolve(), fill)


def _read_meta(path: Path) -> dict[str, Any]:
    fix = f"point to a folder written by save_generator, or delete {path} and train the generator again"
    if not (path / CONFIG_FILE).is_file() or not (path / UNET_DIR / WEIGHTS_FILE).is_file():
        raise FsynthError(f"no DDPM generator at {path} (needs {CONFIG_FILE} and {UNET_DIR}/{WEIGHTS_FILE}); {fix}")
    try:
        meta = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise FsynthError(f"cannot read {path / CONFIG_FILE} ({exc}); {fix}") from None
    keys = ("format", "schedule", "resolution", "channels", "num_classes", "fingerprint")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or any(k not in meta for k in keys):
        raise FsynthError(f"{path / CONFIG_FILE} is not a {FORMAT} generator config; {fix}")
    return meta


def load_generator(directory: str | Path) -> DDPMGenerator:
    """Read a generator written by `save_generator`; the recomputed fingerprint must match the stored one."""
    path = Path(directory).resolve()
    meta = _read_meta(path)  # checked first: from_pretrained on a missing folder would ask the hub
    from diffusers import UNet2DModel

    try:
        unet = UNet2DModel.from_pretrained(path / UNET_DIR, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as exc:
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise FsynthError(f"cannot load the DDPM weights in {path / UNET_DIR} ({reason}); "
                          f"delete {path} and train the generator again") from None
    gen = DDPMGenerator(unet.eval(), meta["schedule"], meta["resolution"], meta["channels"], meta["num_classes"],
                        training=meta.get("training", {}))
    if gen.fingerprint != meta["fingerprint"]:
        raise FsynthError(f"DDPM generator {path}: its weights and config do not match {CONFIG_FILE} (fingerprint "
                          f"{gen.fingerprint} != {meta['fingerprint']}); delete {path} and train it again")
    return gen


def image_generator(seed: int) -> torch.Generator:
    """The CPU random generator of one image: its initial noise, then (eta > 0) its noise at every step."""
    return torch.Generator().manual_seed(int(seed))


def initial_noise(gen: DDPMGenerator, rng: torch.Generator) -> torch.Tensor:
    """The start of one image's reverse process: [C, R, R] standard normal drawn from the image's generator."""
    return torch.randn((gen.channels, gen.resolution, gen.resolution), generator=rng)


@torch.inference_mode()
def _ddim(unet: UNet2DModel, sched: Any, x: torch.Tensor, y: torch.Tensor, eta: float,
          rngs: list[torch.Generator], timesteps: torch.Tensor) -> torch.Tensor:
    """DDIM over `timesteps` from x [N, C, R, R] with labels y [N] to images [N, C, R, R]; image i's step noise
    from rngs[i]."""
    for t in timesteps:
        eps = unet(x, t, class_labels=y).sample
        x = sched.step(eps, t, x, eta=eta, generator=rngs).prev_sample
    return x


def _start(gen: DDPMGenerator, sched: Any, rngs: list[torch.Generator], sources: torch.Tensor | None,
           strength: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [N, C, R, R], timesteps) a batch's reverse process starts from: its initial noise and the whole step
    subsequence, or (SDEdit) its source shots [N, C, R, R] noised to the first of the subsequence's last
    int(steps * strength) timesteps.

    Truncating the text-to-image subsequence, rather than spreading `steps` over [0, strength * T], is what
    diffusers' img2img does: the two backends then mean the same by steps and strength, each kept step is as
    large as in text-to-image, and a set costs in proportion to its strength. The shot is noised to that first
    kept timestep (at most T / steps below strength * T) so the UNet's first call sees the noise level it is
    told. The noise is the image's own first draw, as in text-to-image: strength 1 is that path exactly.
    """
    noise = torch.stack([initial_noise(gen, r) for r in rngs])
    if sources is None or strength >= 1.0:
        return noise, sched.timesteps
    kept = sched.timesteps[len(sched.timesteps) - denoising_steps(len(sched.timesteps), strength):]
    t0 = torch.full((len(noise),), int(kept[0]), dtype=torch.long)
    return sched.add_noise(sources.to(noise.dtype), noise, t0), kept


def sample_images(
    gen: DDPMGenerator, labels: Sequence[int], seeds: Sequence[int], *, steps: int = 25, batch_size: int = 64,
    device: str | torch.device = "cpu", out_size: int | None = None, eta: float = 1.0,
    sources: torch.Tensor | None = None, strength: float = 1.0,
) -> list[Image.Image]:
    """One RGB image per (label, seed): R x R, or out_size x out_size.

    eta 1 (default) is ancestral sampling over the `steps` subsequence; eta 0 is deterministic DDIM. On the
    embedded default's DDPM (600 steps on 160 shots) eta 0 leaves heavy grain (a nearest-class-mean pixel
    classifier: 0.23 on its samples, 0.53 with eta 1, 0.74 on real shots): fresh noise at every step corrects
    an imperfect noise predictor. Every random draw of an image comes from its own CPU generator seeded with its
    seed, so an image depends only on its label and seed, not on its batch (up to float rounding in batched
    kernels) or device.
    sources: float [N, C, R, R] in [-1, 1] (see images_to_tensor), one start image per label, for SDEdit at
    `strength` in (0, 1] (see `_start`); None is text-to-image.
    """
    _check_inputs(labels, gen.num_classes, seeds, "seeds")
    if sources is not None and tuple(sources.shape) != (len(labels), gen.channels, gen.resolution, gen.resolution):
        raise FsynthError(f"source images of shape {tuple(sources.shape)} for {len(labels)} labels; pass "
                          f"[{len(labels)}, {gen.channels}, {gen.resolution}, {gen.resolution}] (images_to_tensor)")
    from diffusers import DDIMScheduler

    # "trailing" spacing starts at t = 999, which few-step DDIM needs to begin from (almost) pure noise.
    sched = DDIMScheduler.from_config(gen.schedule, timestep_spacing="trailing", set_alpha_to_one=True)
    sched.set_timesteps(steps)
    unet = gen.unet.to(device).eval()
    images: list[Image.Image] = []
    for start in range(0, len(labels), max(1, batch_size)):
        stop = start + max(1, batch_size)
        rngs = [image_generator(s) for s in seeds[start:stop]]
        x, timesteps = _start(gen, sched, rngs, None if sources is None else sources[start:stop], strength)
        y = torch.as_tensor([int(v) for v in labels[start:stop]], dtype=torch.long, device=device)
        images.extend(tensor_to_images(_ddim(unet, sched, x.to(device), y, eta, rngs, timesteps), out_size))
    return images


@dataclass
class DDPMBackend:
    """The `ddpm` backend behind the generator interface: a trained DDPMGenerator plus its sampling settings.

    sources: the real shots to start from (SDEdit, fsynth.generators.SourceShots) or None for text-to-image; with
    them the fingerprint also covers the strength and the shots.
    """

    gen: DDPMGenerator
    steps: int = 25
    out_size: int | None = None
    device: str | torch.device = "cpu"
    eta: float = 1.0
    sources: SourceShots | None = None
    fingerprint: str = field(init=False)

    def __post_init__(self) -> None:
        # A list of scalars: json.dumps gives the same text with or without sort_keys, so the value is unchanged.
        self.fingerprint = content_key([self.gen.fingerprint, f"ddim-eta{self.eta:g}-trailing", self.steps,
                                        self.out_size])
        if self.sources is not None:
            self.fingerprint = self.sources.fingerprint(self.fingerprint)

    def generate(self, rows: Any) -> list[Image.Image]:
        """One RGB image per row (columns `label`, `seed`; `source_id` with sources), R x R or out_size x out_size."""
        start, strength = None, 1.0
        if self.sources is not None:
            shots = self.sources.pick([str(v) for v in rows["source_id"]])
            start = images_to_tensor(shots, self.gen.resolution, self.gen.channels) if shots else None
            strength = self.sources.strength
        return sample_images(self.gen, [int(v) for v in rows["label"]], [int(v) for v in rows["seed"]],
                             steps=self.steps, batch_size=max(1, len(rows)), device=self.device,
                             out_size=self.out_size, eta=self.eta, sources=start, strength=strength)


def training_steps(epochs: int, shots: int, batch_size: int) -> int:
    """Optimiser steps for `epochs` passes over `shots` images at `batch_size` (at least one)."""
    return max(1, math.ceil(epochs * shots / max(1, batch_size)))


def ensure_ddpm_generator(
    images: Sequence[Image.Image], labels: Sequence[int], num_classes: int, shots_digest: str, settings: dict,
    out_root: str | Path, *, device: str | torch.device = "cpu", log: Callable[[str], None] | None = None,
) -> Path:
    """The trained DDPM for these shots and settings, as a versioned folder under out_root (trained once).

    The folder `out_root/ddpm-<16 hex>` is named by sha256 of the shots' ids digest, the class count and
    `settings` (train_ddpm's keyword arguments: steps, batch_size, lr, weight_decay, warmup_steps, seed,
    resolution, channels); it holds the weights and generator.json (the settings that made them).
    Concurrent callers (two sweeps of one config) train it once: the others wait on its lock, then reuse it.
    """
    log = log or (lambda line: None)
    key = {"shots": shots_digest, "num_classes": num_classes, "settings": settings, "format": FORMAT}
    digest = content_key(key)  # = sha256(json.dumps(key, sort_keys=True))[:16]: plain JSON values, default=str unused
    directory = Path(out_root).resolve() / f"ddpm-{digest}"

    def done() -> Path | None:
        return directory if (directory / CONFIG_FILE).is_file() else None

    def build() -> Path:
        start, every = time.perf_counter(), max(1, settings["steps"] // 10)

        def progress(step: int, loss: float) -> None:
            if step % every == 0 or step == settings["steps"]:
                log(f"ddpm step {step}/{settings['steps']} loss {loss:.4f}")

        gen = train_ddpm(images, labels, num_classes, device=device, progress=progress, **settings)
        gen = DDPMGenerator(gen.unet, gen.schedule, gen.resolution, gen.channels, gen.num_classes,
                            training={**gen.training, "shots_digest": shots_digest})
        save_generator(gen, directory)
        log(f"trained DDPM {gen.fingerprint} ({settings['steps']} steps) in {time.perf_counter() - start:.1f} s "
            f"-> {directory}")
        return directory

    _, built = ensure_built(directory, done, build, log)
    if not built:
        log(f"reusing the trained DDPM in {directory}")
    return directory
