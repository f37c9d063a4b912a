"""A 2-process gloo DDP run of `fit` (spawned by tests/test_train_job.py): every rank records its centroids and
checks the assignment rule on every batch it trains."""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler


def main(rank: int, world: int, folder: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("FSYNTH_DDP_PORT", "29533"))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import fsynth.batch_regions as br
    import fsynth.loop as loop
    from fsynth.jobs.training import _all_gather, _broadcast
    from tests.test_loop import toy_config, toy_data

    cfg = toy_config("partition.features=outputs", "partition.cluster_multiple=2", "partition.refit_every=1",
                     "training.epochs=2", "training.measure_regularisers=false")
    data = toy_data(Path(folder), write=False)  # written by the test before the ranks start
    fitted, batches = [], []
    real_fit, real_loss = loop.fit_centroids, loop.compute_loss

    def record_fit(*args):
        part = real_fit(*args)
        fitted.append(part.centroids.tolist())
        return part

    def check_loss(c, d, logits, targets, synthetic, regions, lambdas=None):
        centroids = torch.tensor(fitted[-1])
        rule = torch.cdist(br.output_features(c, logits), centroids).argmin(1)
        batches.append(bool(torch.equal(rule, regions)))
        return real_loss(c, d, logits, targets, synthetic, regions, lambdas)

    loop.fit_centroids, loop.compute_loss = record_fit, check_loss

    def prepare_loader(loader):
        sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank, shuffle=True,
                                     seed=loader.generator.initial_seed() % (2**31))
        return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler)

    hooks = loop.LoopHooks(prepare_model=lambda m: torch.nn.parallel.DistributedDataParallel(m),
                           prepare_loader=prepare_loader, is_chief=rank == 0, all_gather=_all_gather,
                           broadcast=_broadcast, log=lambda line: None)
    model = loop_model(cfg, data, rank)
    loop.fit(cfg, data, model, lambda m, c: None, workdir=Path(out) / f"rank{rank}", device=torch.device("cpu"),
             hooks=hooks)
    Path(out, f"rank{rank}.json").write_text(json.dumps({"centroids": fitted, "rule_held": batches}))
    dist.destroy_process_group()


def loop_model(cfg, data, rank):
    """The same starting model on every rank, except for a perturbed head on rank 1: without the broadcast,
    rank 1 would fit other centroids."""
    from fsynth.stages import build_model

    model = build_model(cfg, data)
    if rank == 1:
        with torch.no_grad():
            model.head.logit_scale.mul_(1.5)
    return model


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
