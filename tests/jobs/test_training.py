"""The Ray Train job on a local Ray: the one loop under a TorchTrainer, its checkpoints, and resuming by name."""

import os
from pathlib import Path

import pytest

from fsynth.baselines import apply_baseline
from fsynth.config import build_config
from fsynth.stages import ensure_fewshot
from tests.data.fake_roots import make_root

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TINY = ["model.arch=tiny-clip", "model.pretrained=", "model.head=zeroshot", "model.image_size=32",
        "training.epochs=2", "training.batch_size=8", "data.shots=2", "data.val_per_class=0", "model.lora.rank=2",
        "resources.cpus_per_worker=1"]


def tiny_config(root: Path, *extra: str):
    cfg = build_config("embedded", overrides=[*TINY, *extra],
                       extra={"data": {"dataset": "folder", "root": str(root)}})
    return apply_baseline(cfg, "real-only")


def reports(result) -> list[dict]:
    """The metrics of every checkpointed report Ray kept for the run, in order."""
    return [m for _, m in result.best_checkpoints]


def test_one_worker_run_reports_checkpoints_and_resumes_by_name(tmp_path, ray_local):
    from fsynth.jobs.training import job_name, run_train_job

    make_root("folder", tmp_path / "data", per_class=8)
    cfg = tiny_config(tmp_path / "data")
    fewshot = ensure_fewshot(cfg, tmp_path / "fewshot")
    args = dict(fewshot_dir=fewshot, cache_dir=tmp_path / "cache", storage=tmp_path / "ray")
    name = job_name(cfg, fewshot_dir=fewshot, synthetic_manifest=None)
    assert name == job_name(cfg, fewshot_dir=fewshot, synthetic_manifest=None)
    assert name != job_name(tiny_config(tmp_path / "data", "training.lr=1e-3"), fewshot_dir=fewshot,
                            synthetic_manifest=None)

    result = run_train_job(cfg, **args)
    assert result.error is None
    assert {"val/accuracy", "test/accuracy"} <= set(result.metrics)
    assert 0.0 <= result.metrics["test/accuracy"] <= 1.0
    final = Path(result.checkpoint.path)
    assert (final / "adapters.safetensors").is_file() and (final / "config.yaml").is_file()
    assert (final / "resume" / "state.json").is_file()  # the last checkpoint is resumable
    epochs = [m["epoch"] for m in reports(result) if "train/loss" in m]
    assert epochs == [0, 1]

    again = run_train_job(cfg, **args)  # same name: Ray resumes the finished run, which only re-tests
    assert again.error is None
    assert [m["epoch"] for m in reports(again) if "train/loss" in m] == epochs  # no epoch trained again
    assert sum("test/accuracy" in m for m in reports(again)) == 2
    assert again.metrics["test/accuracy"] == result.metrics["test/accuracy"]
    assert Path(again.checkpoint.path) != final


@pytest.mark.skipif(not os.environ.get("FSYNTH_DDP_TEST"), reason="2-worker DDP costs ~60 s more on 2 CPUs; "
                    "set FSYNTH_DDP_TEST=1 to run it")
def test_two_worker_ddp_run(tmp_path, ray_local):
    from fsynth.jobs.training import run_train_job

    make_root("folder", tmp_path / "data", per_class=8)
    # online regions: each rank's encoder is reached through the DDP wrapper, centroids updated from all ranks
    cfg = tiny_config(tmp_path / "data", "resources.num_workers=2", "partition.mode=online")
    result = run_train_job(cfg, fewshot_dir=ensure_fewshot(cfg, tmp_path / "fewshot"), cache_dir=tmp_path / "cache",
                           storage=tmp_path / "ray")
    assert result.error is None and "test/accuracy" in result.metrics
    assert [m["epoch"] for m in reports(result) if "train/loss" in m] == [0, 1]
    assert (Path(result.checkpoint.path) / "adapters.safetensors").is_file()


def test_workers_get_ten_minutes_to_start_unless_told_otherwise(tmp_path, monkeypatch):
    """Ray's default 60 s fails runs on a busy 2-core machine; an explicit setting is left alone."""
    from fsynth.jobs.training import WORKER_START_TIMEOUT_ENV, build_trainer

    cfg = tiny_config(make_root("folder", tmp_path / "data", per_class=4))
    kwargs = dict(fewshot_dir=tmp_path, synthetic_manifest=None, cache_dir=tmp_path, storage=tmp_path, name="run")
    monkeypatch.delenv(WORKER_START_TIMEOUT_ENV, raising=False)
    build_trainer(cfg, **kwargs)
    assert os.environ[WORKER_START_TIMEOUT_ENV] == "600"
    monkeypatch.setenv(WORKER_START_TIMEOUT_ENV, "30")
    build_trainer(cfg, **kwargs)
    assert os.environ[WORKER_START_TIMEOUT_ENV] == "30"
    assert build_trainer(cfg, **kwargs).run_config.failure_config.max_failures == cfg.resources.max_failures == 2


def flaky(loop, marker: str, fail_epoch: int):
    """`loop` with a fault injected: the first attempt raises in the middle of epoch `fail_epoch` (after one
    optimiser step of it). Each attempt notes whether Ray handed it a checkpoint. A closure, so Ray pickles it by
    value and the workers need not import this test module."""

    def run(config: dict) -> None:
        import ray.train

        import fsynth.loop

        with open(marker + ".attempts", "a") as f:
            f.write(f"{ray.train.get_checkpoint() is not None}\n")
        real = fsynth.loop.make_loader
        fail_seed = fsynth.loop.epoch_seed(config["config"]["training"]["seed"], fail_epoch)

        def batches(loader):
            for i, batch in enumerate(loader):
                if i == 1 and not os.path.exists(marker):
                    open(marker, "w").close()
                    raise RuntimeError("injected fault: the worker dies mid-epoch")
                yield batch

        def make_loader(dataset, batch_size, *, shuffle, seed, **kw):
            loader = real(dataset, batch_size, shuffle=shuffle, seed=seed, **kw)
            return batches(loader) if shuffle and seed == fail_seed else loader

        fsynth.loop.make_loader = make_loader
        loop(config)

    return run


def test_a_worker_raising_mid_epoch_is_retried_from_its_last_checkpoint(tmp_path, ray_local):
    """FailureConfig: the run restarts from the last epoch's checkpoint and ends where an unbroken run ends."""
    from fsynth.jobs.training import build_trainer, train_loop_per_worker

    make_root("folder", tmp_path / "data", per_class=8)
    cfg = tiny_config(tmp_path / "data", "training.epochs=3", "training.batch_size=2", "training.checkpoint_every=1")
    fewshot = ensure_fewshot(cfg, tmp_path / "fewshot")
    args = dict(fewshot_dir=fewshot, synthetic_manifest=None, cache_dir=tmp_path / "cache", storage=tmp_path / "ray")
    clean = build_trainer(cfg, name="clean", **args).fit()
    marker = str(tmp_path / "fault")
    broken = build_trainer(cfg, name="broken", loop=flaky(train_loop_per_worker, marker, 1), **args).fit()

    assert os.path.exists(marker)  # the fault did fire
    assert Path(marker + ".attempts").read_text().split() == ["False", "True"]  # the retry began at a checkpoint
    assert clean.error is None and broken.error is None
    epochs = [m["epoch"] for m in reports(broken) if "train/loss" in m]
    assert epochs == [0, 1, 2]  # epoch 0 not trained again, the broken epoch 1 once, from its start
    losses = {name: [m["train/loss"] for m in reports(r) if "train/loss" in m] for name, r in (("clean", clean),
                                                                                              ("broken", broken))}
    assert losses["broken"] == pytest.approx(losses["clean"], abs=1e-6)  # resumed epochs replay exactly
    for key in ("val/accuracy", "test/accuracy"):
        assert broken.metrics[key] == pytest.approx(clean.metrics[key], abs=1e-6), key


def test_two_ddp_ranks_see_the_same_outputs_regions_and_assignment_rule(tmp_path):
    """2 CPU workers (gloo DDP, Ray Train's all_gather / broadcast hooks): rank 0's centroids reach every rank,
    at the start and at every refit, and each rank assigns its batches to the nearest of them."""
    import json
    import subprocess
    import sys

    from tests.test_loop import toy_data

    (tmp_path / "data").mkdir()
    toy_data(tmp_path / "data")
    env = {**os.environ, "FSYNTH_DDP_PORT": str(29500 + os.getpid() % 400), "PYTHONPATH": str(Path.cwd())}
    procs = [subprocess.Popen([sys.executable, "-m", "tests.ddp_worker", str(rank), "2", str(tmp_path / "data"),
                               str(tmp_path)], env=env, cwd=Path(__file__).parent.parent) for rank in (0, 1)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(ranks[0]["centroids"]) == 3  # the start, then a refit after each of the 2 epochs
    assert ranks[0]["centroids"] == ranks[1]["centroids"]
    assert all(ranks[0]["rule_held"]) and all(ranks[1]["rule_held"]) and ranks[0]["rule_held"]
