"""The one training loop, `fit`: every runner (CLI, Ray Train, Tune, tests) passes its own `report` callable."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fsynth import checkpoints
from fsynth.augment import Transform, build_eval_transform, build_train_transform, mix_within_domains
from fsynth.batch_regions import (
    MixingCounter,
    dataset_features,
    fit_centroids,
    needs_partitioner,
    no_mixing_warning,
    output_features,
    refit_due,
    refits,
    uses_outputs,
)
from fsynth.checkpoints import TrainState
from fsynth.config import ExperimentConfig
from fsynth.evaluate import EvalResult, evaluate
from fsynth.loss import LossOutput, regularized_loss, synthetic_only_loss
from fsynth.partition import OnlinePartitioner
from fsynth.trainset import ImageSet, TrainData, epoch_items, make_loader

Report = Callable[[dict, "str | None"], None]
PARTS = ("ce_real", "ce_synth", "discrepancy", "robustness")


@dataclass
class LoopHooks:
    """Where a distributed runner plugs in (Ray Train's prepare_model / prepare_data_loader); identity here."""

    prepare_model: Callable[[nn.Module], nn.Module] = lambda m: m
    prepare_loader: Callable = lambda loader: loader
    is_chief: bool = True  # only the chief writes checkpoints
    # [B, ...] on each rank -> [world * B, ...] in rank order: every rank updates the online centroids with
    # every rank's synthetic features, so the centroids stay identical across DDP workers.
    all_gather: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    # rank 0's tensor on every rank: the prediction-space centroids, so every rank assigns with the same ones
    broadcast: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    log: Callable[[str], None] = print  # one-line warnings (the chief's only)


@dataclass
class FitResult:
    best_epoch: int
    best_val_accuracy: float
    val: EvalResult | None
    test: EvalResult | None
    history: list[dict] = field(default_factory=list)
    checkpoint: str | None = None


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def amp_dtype(cfg: ExperimentConfig, device: torch.device) -> torch.dtype | None:
    """Mixed precision on GPU only (bf16 where supported, else fp16 with a grad scaler); full precision on CPU."""
    if device.type != "cuda" or not cfg.training.mixed_precision:
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of one epoch: augmentations, dropout, mixing and order replay exactly when resuming there."""
    return (seed * 1_000_003 + epoch * 7919) % (2**63 - 1)


def compute_loss(cfg: ExperimentConfig, data: TrainData, logits: torch.Tensor, targets: torch.Tensor,
                 synthetic: torch.Tensor, regions: torch.Tensor, lambdas: tuple[float, float] | None = None
                 ) -> LossOutput:
    """The configured loss for one batch: eq. 7, or its synthetic-only variant when no real data is used."""
    lam_d, lam_r = lambdas if lambdas is not None else (cfg.loss.lambda_discrepancy, cfg.loss.lambda_robustness)
    common = dict(num_classes=data.num_classes, ce_synth_weight=cfg.loss.ce_synth_weight,
                  lambda_robustness=lam_r, preset=cfg.loss.preset,
                  synthetic_per_class=data.synthetic_per_class or None)
    if not cfg.training.use_real:
        return synthetic_only_loss(logits, targets, regions, **common)
    return regularized_loss(logits, targets, synthetic, regions, ce_real_weight=cfg.loss.ce_real_weight,
                            lambda_discrepancy=lam_d, **common)


@dataclass
class _Run:
    """What every batch of a run needs besides the batch: the config, the model and its optimisation, regions."""

    cfg: ExperimentConfig
    data: TrainData
    model: nn.Module  # possibly a DDP wrapper (the encoder is then its `.module`'s)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None  # set by `fit` once the steps are known
    scaler: torch.amp.GradScaler
    dtype: torch.dtype | None
    device: torch.device
    hooks: LoopHooks
    base: nn.Module  # the model itself, never wrapped: its adapters are saved, restored and evaluated
    plain: ImageSet  # real ∪ synthetic once, without augmentation (the centroids' start, Figure 2)
    eval_tf: Transform
    workdir: Path
    partitioner: OnlinePartitioner | None = None
    # Prediction-space refits: the latest training output of every epoch item [N_items, C] and, for each sample of
    # real ∪ synthetic, the item position whose output stands for it.
    latest: torch.Tensor | None = None
    representative: np.ndarray | None = None
    warned: bool = False  # the zero-mixing warning was printed


def _gather(hooks: LoopHooks, *tensors: torch.Tensor) -> list[torch.Tensor]:
    return [hooks.all_gather(t) for t in tensors]


def _assign(run: _Run, feats: torch.Tensor, synthetic: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B] nearest centroids of a batch's features [B, D]; records them for a refit and, online, updates the
    centroids (MacQueen) with every rank's synthetic samples, so the centroids stay identical across ranks."""
    part, online = run.partitioner, run.cfg.partition.mode == "online"
    regions = part.assign(feats)
    if online or run.latest is not None:
        all_feats, all_synth, all_pos = _gather(run.hooks, feats, synthetic.to(torch.uint8), positions)
        if run.latest is not None:
            run.latest[all_pos.cpu()] = all_feats.cpu()
        if online:
            all_regions = part.assign(all_feats) if all_feats is not feats else regions
            part.update(all_feats[all_synth.bool()], all_regions[all_synth.bool()])
    return regions


def _train_epoch(run: _Run, loader, gen: torch.Generator) -> dict:
    """One pass over the epoch's items; returns the mean loss parts, the training accuracy and the mixing."""
    cfg, model, device = run.cfg, run.model, run.device
    model.train()
    sums = {k: 0.0 for k in ("loss", *PARTS)}
    correct = seen = 0
    mixing, outputs = MixingCounter(), uses_outputs(cfg)
    amp = torch.autocast(device.type, dtype=run.dtype) if run.dtype else nullcontext()
    for batch in loader:
        images, labels = batch["image"].to(device), batch["label"].to(device)
        synthetic, regions = batch["synthetic"].to(device), batch["region"].to(device)
        positions = batch["position"].to(device)
        if run.partitioner is not None and not outputs:  # online regions of the encoder's embeddings
            with torch.no_grad():
                regions = _assign(run, getattr(model, "module", model).encode(images).float(), synthetic, positions)
        targets = F.one_hot(labels, run.data.num_classes).float()
        images, targets = mix_within_domains(images, targets, synthetic.cpu(), cfg.training.mix_prob, gen)
        with amp:
            logits = model(images)
        if run.partitioner is not None and outputs:  # Algorithm 1, line 7: the batch's current outputs
            regions = _assign(run, output_features(cfg, logits), synthetic, positions)
        mixing.add(regions, synthetic)
        out = compute_loss(cfg, run.data, logits.float(), targets, synthetic, regions)
        run.optimizer.zero_grad(set_to_none=True)
        run.scaler.scale(out.total).backward()
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.scheduler.step()
        n = len(labels)
        sums["loss"] += float(out.total.detach()) * n
        for k in PARTS:
            sums[k] += float(out.parts[k].detach()) * n
        correct += int((logits.argmax(1) == targets.argmax(1)).sum())
        seen += n
    metrics = {f"train/{k}": v / max(seen, 1) for k, v in sums.items()}
    metrics["train/accuracy"] = correct / max(seen, 1)
    if cfg.training.use_real and cfg.training.use_synthetic:
        metrics.update(mixing.metrics())
    return metrics


@torch.no_grad()
def measure_regularisers(run: _Run) -> dict:
    """The discrepancy and robustness terms on the training set, without lambda (the paper's Figure 2)."""
    cfg, data, model, device, dtype, partitioner = run.cfg, run.data, run.base, run.device, run.dtype, run.partitioner
    model.eval()
    loader = make_loader(run.plain, cfg.training.batch_size, shuffle=True, seed=cfg.training.seed, workers=0)
    sums, batches = {"discrepancy": 0.0, "robustness": 0.0}, 0
    amp = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    for batch in loader:
        images, labels = batch["image"].to(device), batch["label"].to(device)
        synthetic, regions = batch["synthetic"].to(device), batch["region"].to(device)
        with amp:
            logits = model(images)
        if partitioner is not None:
            feats = output_features(cfg, logits) if uses_outputs(cfg) else model.encode(images).float()
            regions = partitioner.assign(feats)
        out = compute_loss(cfg, data, logits.float(), F.one_hot(labels, data.num_classes).float(),
                           synthetic, regions, lambdas=(1.0, 1.0))
        sums["discrepancy"] += float(out.parts["discrepancy"])
        sums["robustness"] += float(out.parts["robustness"])
        batches += 1
    model.train()
    return {f"measured/{k}": v / max(batches, 1) for k, v in sums.items()}


def _build_partitioner(cfg, data, model, plain, device, hooks: LoopHooks) -> OnlinePartitioner | None:
    """Centroids held by the loop: online (MacQueen) or prediction-space ones, fitted on the starting model."""
    if not needs_partitioner(cfg):
        return None
    loader = make_loader(plain, cfg.training.eval_batch_size, shuffle=False, seed=0, workers=0)
    return fit_centroids(cfg, dataset_features(cfg, model, loader, device), data.num_classes, hooks.broadcast)


def _refit(run: _Run) -> None:
    """New prediction-space centroids: k-means over each sample's latest training output (no extra forward)."""
    feats = run.latest[torch.from_numpy(run.representative)].to(run.device)
    run.partitioner = fit_centroids(run.cfg, feats, run.data.num_classes, run.hooks.broadcast)


def _representatives(items: list, plain_samples: list) -> np.ndarray:
    """For each sample of `plain_samples`, the last position in `items` that holds it (joined by id)."""
    last = {s.id: i for i, s in enumerate(items)}
    return np.array([last[s.id] for s in plain_samples], dtype=np.int64)


def fit(cfg: ExperimentConfig, data: TrainData, model: nn.Module, report: Report, *, workdir: str | Path,
        regions: Callable[[list[str]], np.ndarray] | None = None, resume_from: str | Path | None = None,
        device: torch.device | None = None, hooks: LoopHooks | None = None) -> FitResult:
    """Fine-tune `model` on `data` as `cfg` says; validate every epoch, test the best-on-validation model once.

    `regions(ids) -> [N] int64` gives the static region of each training sample by id (None: one region, or
    online regions when `cfg.partition.mode == "online"`). `report(metrics, checkpoint_dir_or_None)` is called
    after every epoch and once more with the test metrics. `resume_from` is a checkpoint directory of this loop.
    """
    hooks, device = hooks or LoopHooks(), device or pick_device()
    torch.manual_seed(cfg.training.seed)
    t = cfg.training
    items, flags = epoch_items(cfg, data)
    lookup = regions or (lambda ids: np.zeros(len(ids), dtype=np.int64))
    run = _start_run(cfg, data, model.to(device), lookup, Path(workdir).resolve(), device, hooks)
    train_set = ImageSet(items, flags, lookup([s.id for s in items]),
                         build_train_transform(model.image_size, model.mean, model.std, t.augment))
    steps_per_epoch = math.ceil(len(items) / t.batch_size) if items else 0
    run.scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(
        run.optimizer, T_max=max(1, t.epochs * steps_per_epoch), eta_min=t.min_lr) if run.optimizer else None)
    if items and t.epochs > 0:
        run.partitioner = _build_partitioner(cfg, data, run.base, run.plain, device, hooks)
        if refits(cfg):  # online regions never refit: they would record outputs for nothing
            run.latest = torch.zeros(len(items), data.num_classes)
            run.representative = _representatives(items, list(run.plain.samples))
    state = TrainState()
    if resume_from is not None:
        state = checkpoints.load(resume_from, run.base, run.optimizer, run.scheduler, run.partitioner)
    run.model = hooks.prepare_model(run.base)
    val_loader = _eval_loader(data.val, run.eval_tf, t)
    for epoch in range(state.epoch + 1, t.epochs if items else 0):
        seed = epoch_seed(t.seed, epoch)
        torch.manual_seed(seed)
        loader = hooks.prepare_loader(make_loader(train_set, t.batch_size, shuffle=True, seed=seed,
                                                  workers=t.loader_workers))
        metrics = _train_epoch(run, loader, torch.Generator().manual_seed(seed))
        if refit_due(cfg, epoch):  # before the checkpoint, so a resumed run replays the refitted regions
            _refit(run)
        metrics.update(_validate(run, val_loader, epoch))
        _warn_once(run, metrics)
        _keep_best(run, state, metrics, epoch, steps_per_epoch)
        due = (epoch + 1) % max(1, t.checkpoint_every) == 0 or epoch == t.epochs - 1
        ckpt = None
        if due and hooks.is_chief:
            ckpt = checkpoints.save(run.workdir / "checkpoints" / f"epoch_{epoch:04d}", run.base, run.optimizer,
                                    run.scheduler, run.partitioner, state, cfg)
        report(metrics, ckpt)
    return _finish(run, report, state)


def _start_run(cfg: ExperimentConfig, data: TrainData, model: nn.Module, lookup: Callable, workdir: Path,
               device: torch.device, hooks: LoopHooks) -> _Run:
    """The run's state before its first epoch: optimiser (its schedule is set by `fit`), precision, the plain set."""
    t = cfg.training
    dtype = amp_dtype(cfg, device)
    real, synthetic = (data.real if t.use_real else []), (data.synthetic if t.use_synthetic else [])
    eval_tf = build_eval_transform(model.image_size, model.mean, model.std)
    plain_samples = real + synthetic
    plain = ImageSet(plain_samples, np.array([False] * len(real) + [True] * len(synthetic), dtype=bool),
                     lookup([s.id for s in plain_samples]), eval_tf)
    params = list(model.trainable_parameters())
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay) if params else None
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    return _Run(cfg, data, model, optimizer, None, scaler, dtype, device, hooks, model, plain, eval_tf, workdir)


def _validate(run: _Run, val_loader, epoch: int) -> dict:
    """An epoch's validation figures and its measured regularisers (when asked)."""
    val = evaluate(run.base, val_loader, run.data.num_classes, run.device, run.dtype)
    metrics = {"epoch": epoch, "lr": run.scheduler.get_last_lr()[0], "val/accuracy": val.accuracy,
               "val/loss": val.loss}
    both = run.plain.synthetic.any() and not run.plain.synthetic.all()  # real and synthetic samples both trained on
    if run.cfg.training.measure_regularisers and both:
        metrics.update(measure_regularisers(run))
    return metrics


def _warn_once(run: _Run, metrics: dict) -> None:
    """The chief's one-line warning, at most once per `fit`, when the regularisers saw no synthetic sample."""
    warning = no_mixing_warning(run.cfg, metrics) if run.hooks.is_chief and not run.warned else None
    if warning:
        run.hooks.log(warning)
        run.warned = True


def _keep_best(run: _Run, state: TrainState, metrics: dict, epoch: int, steps_per_epoch: int) -> None:
    """Record the epoch in `state`; keep a copy of the adapters when validation improved."""
    if metrics["val/accuracy"] > state.best_val_accuracy:
        state.best_val_accuracy, state.best_epoch = metrics["val/accuracy"], epoch
        state.best_adapters = copy.deepcopy(run.base.adapter_state_dict())
    state.epoch, state.step = epoch, state.step + steps_per_epoch
    state.history.append(metrics)


def _eval_set(samples, transform) -> ImageSet:
    n = len(samples)
    return ImageSet(samples, np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64), transform)


def _eval_loader(samples, transform, t):
    """Validation or test samples in a fixed order, without augmentation."""
    return make_loader(_eval_set(samples, transform), t.eval_batch_size, shuffle=False, seed=0,
                       workers=t.loader_workers)


def _finish(run: _Run, report: Report, state: TrainState) -> FitResult:
    """Restore the best-on-validation adapters, evaluate on test once (unless training.evaluate_test is off, as in
    sweep trials), report, and save the final adapters."""
    cfg, data, model, device, dtype, eval_tf = run.cfg, run.data, run.base, run.device, run.dtype, run.eval_tf
    if state.best_adapters:
        model.load_adapter_state_dict(state.best_adapters)
    t = cfg.training
    val = evaluate(model, _eval_loader(data.val, eval_tf, t), data.num_classes, device, dtype)
    test = evaluate(model, _eval_loader(data.test, eval_tf, t), data.num_classes, device, dtype) \
        if t.evaluate_test else None
    final = None
    if run.hooks.is_chief:
        final = checkpoints.save_final(run.workdir / "final", model, cfg, test.confusion if test else None)
    metrics = {"best/epoch": state.best_epoch, "best/val_accuracy": val.accuracy, "epoch": state.epoch}
    # The last epoch's mixing rides along, so a runner's result (Tune's summary) can say what the regularisers saw.
    metrics.update({k: v for k, v in (state.history[-1] if state.history else {}).items() if k.startswith("mixing/")})
    if test is not None:
        metrics.update({"test/accuracy": test.accuracy, "test/loss": test.loss})
    report(metrics, final)
    return FitResult(state.best_epoch, val.accuracy, val, test, state.history, final)
