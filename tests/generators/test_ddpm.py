"""The offline DDPM backend with real diffusers at toy size: training, determinism, save/load, sampling."""

import json

import numpy as np
import pytest
from PIL import Image

from fsynth.errors import FsynthError
from fsynth.generators.ddpm import (
    images_to_tensor,
    load_generator,
    sample_images,
    save_generator,
    tensor_to_images,
    train_ddpm,
)

TINY = {"resolution": 16, "channels": 1, "widths": (16, 32, 32)}
SAMPLE_STEPS = 4


pytestmark = pytest.mark.usefixtures("one_thread")


def toy_images() -> tuple[list[Image.Image], list[int]]:
    """Two classes of 20x20 grey images: a bright vertical bar (0) and a bright square frame (1), 4 each."""
    images, labels = [], []
    for label in (0, 1):
        for shift in range(4):
            a = np.zeros((20, 20), np.uint8)
            if label == 0:
                a[2:18, 6 + shift : 10 + shift] = 255
            else:
                a[3 + shift : 15 + shift, 3:15] = 255
                a[5 + shift : 13 + shift, 5:13] = 0
            images.append(Image.fromarray(a))
            labels.append(label)
    return images, labels


def train(steps: int, seed: int = 0, progress=None):
    images, labels = toy_images()
    return train_ddpm(images, labels, 2, steps=steps, batch_size=16, lr=2e-3, weight_decay=0.0, warmup_steps=3,
                      seed=seed, progress=progress, **TINY)


@pytest.fixture(scope="module")
def trained():
    losses = []
    gen = train(30, progress=lambda step, loss: losses.append((step, loss)))
    return gen, losses


def arrays(images):
    return np.stack([np.asarray(img, dtype=np.int16) for img in images])


def test_images_scaled_to_minus_one_one():
    x = images_to_tensor(toy_images()[0], 16, 1)
    assert tuple(x.shape) == (8, 1, 16, 16)
    assert x.min() >= -1.0 and x.max() <= 1.0 and x.min() < -0.99 and x.max() > 0.99


def test_loss_goes_down(trained):
    gen, losses = trained
    assert [s for s, _ in losses] == list(range(1, 31))
    first, last = np.mean([v for _, v in losses[:5]]), np.mean([v for _, v in losses[-5:]])
    assert last < 0.7 * first, (first, last)
    assert len(gen.fingerprint) == 16 and int(gen.fingerprint, 16) >= 0


def test_training_is_seeded_and_deterministic():
    assert train(3, seed=5).fingerprint == train(3, seed=5).fingerprint
    assert train(3, seed=5).fingerprint != train(3, seed=6).fingerprint


def test_same_seed_gives_bit_identical_images(trained):
    gen, _ = trained
    a = sample_images(gen, [0, 1, 0], [11, 12, 13], steps=SAMPLE_STEPS)
    b = sample_images(gen, [0, 1, 0], [11, 12, 13], steps=SAMPLE_STEPS)
    assert np.array_equal(arrays(a), arrays(b))
    assert not np.array_equal(arrays(a)[0], arrays(a)[2])  # another seed, another image
    assert a[0].mode == "RGB" and a[0].size == (16, 16)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_image_does_not_depend_on_its_batch(trained, eta):
    gen, _ = trained
    labels, seeds = [0, 1, 1, 0, 1], [3, 1, 4, 1_000_000_007, 2**62 + 9]
    one = arrays(sample_images(gen, labels, seeds, steps=SAMPLE_STEPS, batch_size=1, eta=eta))
    many = arrays(sample_images(gen, labels, seeds, steps=SAMPLE_STEPS, batch_size=64, eta=eta))
    assert np.abs(one - many).max() <= 2
    # Reordering the batch moves each image with its seed (and, for eta > 0, its step noise).
    rev = arrays(sample_images(gen, labels[::-1], seeds[::-1], steps=SAMPLE_STEPS, batch_size=64, eta=eta))[::-1]
    assert np.abs(rev - many).max() <= 2


def test_ancestral_and_deterministic_sampling_differ(trained):
    gen, _ = trained
    eta0, eta1 = (arrays(sample_images(gen, [0, 1], [5, 6], steps=SAMPLE_STEPS, eta=e)) for e in (0.0, 1.0))
    assert not np.array_equal(eta0, eta1)
    from fsynth.generators.ddpm import DDPMBackend

    assert DDPMBackend(gen, eta=0.0).fingerprint != DDPMBackend(gen).fingerprint


def sdedit(gen, strength, seeds=(31, 32, 33, 34), steps=10):
    """SDEdit samples of the toy shots 0, 1 (class 0) and 4, 5 (class 1) at `strength`, and those shots [4, 1, R, R]."""
    images, labels = toy_images()
    pick = [0, 1, 4, 5]
    shots = images_to_tensor([images[i] for i in pick], 16, 1)
    out = sample_images(gen, [labels[i] for i in pick], list(seeds), steps=steps, sources=shots, strength=strength)
    return arrays(out)[..., 0], arrays(tensor_to_images(shots))[..., 0]


def test_sdedit_is_seeded_and_strength_sets_closeness_to_the_shot(trained):
    gen, _ = trained
    low, shots = sdedit(gen, 0.3)
    assert np.array_equal(low, sdedit(gen, 0.3)[0])
    assert not np.array_equal(low, sdedit(gen, 0.3, seeds=(41, 42, 43, 44))[0])
    high, _ = sdedit(gen, 0.9)
    dist = {name: np.abs(x - shots).mean() for name, x in (("0.3", low), ("0.9", high))}
    assert dist["0.3"] < dist["0.9"], dist
    # strength 1 is text-to-image, pixel for pixel: the shot is noised all the way
    full, _ = sdedit(gen, 1.0)
    images, labels = toy_images()
    plain = sample_images(gen, [labels[i] for i in (0, 1, 4, 5)], [31, 32, 33, 34], steps=10)
    assert np.array_equal(full, arrays(plain)[..., 0])


def test_sdedit_backend_reads_each_row_s_source(trained):
    import pandas as pd

    from fsynth.errors import ConfigError
    from fsynth.generators import SourceShots
    from fsynth.generators.ddpm import DDPMBackend

    gen, _ = trained
    images, _ = toy_images()
    sources = SourceShots({"a": images[0], "b": images[4]}, 0.5, "toy")
    backend = DDPMBackend(gen, steps=4, sources=sources)
    rows = pd.DataFrame({"label": [0, 1], "seed": [1, 2], "source_id": ["a", "b"]})
    swapped = rows.assign(source_id=["b", "a"])
    assert not np.array_equal(arrays(backend.generate(rows)), arrays(backend.generate(swapped)))
    assert len({backend.fingerprint, DDPMBackend(gen, steps=4).fingerprint,
                DDPMBackend(gen, steps=4, sources=SourceShots(sources.images, 0.75, "toy")).fingerprint}) == 3
    with pytest.raises(FsynthError, match="source shot 'c' is not among the 2 real shots"):
        backend.generate(rows.assign(source_id=["a", "c"]))
    with pytest.raises(ConfigError, match="leaves no denoising step"):
        DDPMBackend(gen, steps=4, sources=SourceShots(sources.images, 0.2, "toy")).generate(rows)


def test_out_size_and_bad_labels(trained):
    gen, _ = trained
    (img,) = sample_images(gen, [1], [0], steps=2, out_size=24)
    assert img.size == (24, 24) and img.mode == "RGB"
    with pytest.raises(FsynthError, match="outside 0..1"):
        sample_images(gen, [2], [0], steps=2)
    with pytest.raises(FsynthError, match="2 labels for 1 seeds"):
        sample_images(gen, [0, 1], [0], steps=2)


def test_save_load_round_trip(trained, tmp_path):
    gen, _ = trained
    path = save_generator(gen, tmp_path / "gen")
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert json.loads((path / "generator.json").read_text())["fingerprint"] == gen.fingerprint
    back = load_generator(path)
    assert back.fingerprint == gen.fingerprint and back.meta() == gen.meta()
    a = sample_images(gen, [0, 1], [21, 22], steps=SAMPLE_STEPS)
    b = sample_images(back, [0, 1], [21, 22], steps=SAMPLE_STEPS)
    assert np.array_equal(arrays(a), arrays(b))
    assert not list(tmp_path.glob(".*.tmp"))  # the temp folder was renamed into place


def test_missing_directory_is_one_line_error(tmp_path):
    with pytest.raises(FsynthError) as err:
        load_generator(tmp_path / "nowhere")
    msg = str(err.value)
    assert "\n" not in msg and str(tmp_path / "nowhere") in msg and "train the generator again" in msg


def test_mismatched_directory_is_one_line_error(trained, tmp_path):
    gen, _ = trained
    path = save_generator(gen, tmp_path / "gen")
    meta = json.loads((path / "generator.json").read_text())
    meta["training"]["seed"] = 99  # the config no longer describes these weights
    (path / "generator.json").write_text(json.dumps(meta))
    with pytest.raises(FsynthError) as err:
        load_generator(path)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg and "fingerprint" in msg and "delete" in msg
    (path / "generator.json").write_text("{not json")
    with pytest.raises(FsynthError, match="cannot read"):
        load_generator(path)


def ddpm_race_worker(out_root, barrier, queue):
    """One of two trials asking for the same trained DDPM at once (spawned, so module level)."""
    import torch

    from fsynth.generators.ddpm import ensure_ddpm_generator

    torch.set_num_threads(1)
    images, labels = toy_images()
    settings = {"steps": 20, "batch_size": 8, "lr": 2e-3, "weight_decay": 0.0, "warmup_steps": 2, "seed": 0, **TINY}
    lines = []
    barrier.wait(timeout=120)
    path = ensure_ddpm_generator(images, labels, 2, "toy-shots", settings, out_root, log=lines.append)
    queue.put((str(path), lines))


def test_two_trials_asking_for_one_ddpm_at_once_train_it_once(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=ddpm_race_worker, args=(str(tmp_path), barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (path,) = {path for path, _ in results}
    logs = [lines for _, lines in results]
    assert sum(any(line.startswith("trained DDPM") for line in lines) for lines in logs) == 1
    waiter = next(lines for lines in logs if not any(line.startswith("ddpm step") for line in lines))
    assert waiter[-1] == f"reusing the trained DDPM in {path}"  # after "waited N s for another process ..."
    assert load_generator(path).fingerprint
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [path.rsplit("/", 1)[1]]
