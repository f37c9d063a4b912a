"""Random-weight Stable Diffusion pipelines written to disk: a tiny one for tests, a real-size one for benchmarks.

Both are ordinary diffusers pipeline folders (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
scheduler/), so the `sd` backend loads them through its real loading code. The tokenizer is built offline from
the CLIP BPE merges that open_clip ships (the same vocabulary as openai/clip-vit-large-patch14's tokenizer).
Random weights cost the same compute as trained ones, which is all a speed benchmark needs.
"""

from __future__ import annotations

import gzip
import json
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from fsynth.cache import publish_dir
from fsynth.errors import FsynthError

SIZES = ("tiny", "sd21")
_VOCAB_SIZE = 49408  # 256 bytes + 256 end-of-word bytes + 48894 merges + 2 special tokens
_SD_TEMPLATE_LEN = 77


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (CLIP's BPE works on these characters)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, (chr(c) for c in chars), strict=True))


@lru_cache(maxsize=1)
def clip_bpe() -> tuple[dict[str, int], list[str]]:
    """(vocab token -> id, merges as 'a b' lines) of CLIP's tokenizer, from open_clip's bundled merges file."""
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(path).read().decode("utf-8").split("\n")[1:_VOCAB_SIZE - 512 - 2 + 1]
    base = list(_bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer(directory: str | Path):
    """Write vocab.json + merges.txt for CLIP's BPE into `directory` and return a transformers CLIPTokenizer."""
    from transformers import CLIPTokenizer

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_bpe()
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=_SD_TEMPLATE_LEN,
                        pad_token="<|endoftext|>")
    tok.save_pretrained(out)
    return tok


def _components(size: str) -> dict:
    """UNet, VAE and text-encoder configs: `tiny` (~1 M parameters, 32 px) or `sd21` (SD 2.1-base, 512 px)."""
    if size == "tiny":
        unet = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                    attention_head_dim=(2, 4), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32,
                    use_linear_projection=True)
        vae = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                   up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=32, sample_size=32)
        text = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                    projection_dim=32)
    elif size == "sd21":
        unet = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
                    cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
        vae = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                   up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                   sample_size=512)
        text = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                    projection_dim=512, hidden_act="gelu")
    else:
        raise FsynthError(f"unknown random Stable Diffusion size '{size}'; use one of {', '.join(SIZES)}")
    return {"unet": unet, "vae": vae, "text": text}


def build_random_sd(size: str = "tiny", seed: int = 0, scheduler: str = "ddim"):
    """A StableDiffusionPipeline with random weights (seeded; the caller's global RNG is left untouched)."""
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    parts = _components(size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(in_channels=4, out_channels=4, **parts["unet"])
        vae = AutoencoderKL(in_channels=3, out_channels=3, **parts["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=_VOCAB_SIZE, max_position_embeddings=_SD_TEMPLATE_LEN,
                                                    bos_token_id=_VOCAB_SIZE - 2, eos_token_id=_VOCAB_SIZE - 1,
                                                    pad_token_id=_VOCAB_SIZE - 1, **parts["text"]))
    schedule = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    sched = DDIMScheduler(**schedule) if scheduler == "ddim" else PNDMScheduler(
        skip_prk_steps=True, **{k: v for k, v in schedule.items() if k != "clip_sample"})
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_clip_tokenizer(tmp)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=sched, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def write_random_sd(directory: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Save `build_random_sd(size, seed)` as a diffusers folder at `directory` (atomically); return its path."""
    pipe = build_random_sd(size, seed)
    return publish_dir(Path(directory).resolve(), lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
