#!/usr/bin/env bash
# Every ablation of docs/results.md, each an fsynth.tune command on tune_spaces/ablation.yaml (3 seeds, tested
# once), then fsynth.report. Each command is cached and resumable: rerunning this script after an interruption
# finishes what is missing and reuses the rest; a finished configuration costs seconds.
#   bash scripts/run_ablations.sh                 # Fashion-MNIST (embedded default) then the digits folder dataset
#   bash scripts/run_ablations.sh fashion-mnist   # one dataset only (fashion-mnist | digits)
# On 2 CPU cores: ~4-6 min per configuration, plus ~3 min per new --shots value or dataset (its DDPM); ~1.7 h in all.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
py=.venv/bin/python
which=${1:-all}

ablate() {  # ablate DATASET-ARGS -- EXTRA-ARGS: one configuration, 3 seeds
  echo "== fsynth.tune $*" >&2
  $py -m fsynth.tune "$@" --space ablation
}

loss_rows() {  # the loss ablation: real only, CE only, + discrepancy, + robustness, + both (the method)
  for baseline in real-only real-synthetic-ce discrepancy-only robustness-only method; do
    ablate "$@" --baseline "$baseline"
  done
}

if [ "$which" = all ] || [ "$which" = fashion-mnist ]; then
  fm=(--dataset fashion-mnist)
  loss_rows "${fm[@]}"
  ablate "${fm[@]}" --set partition.mode=single          # one region for all samples
  ablate "${fm[@]}" --baseline real-synthetic-ce --set partition.mode=single  # Figure 2's CE-only at one region
  for k in 1 4; do ablate "${fm[@]}" --set partition.cluster_multiple=$k; done  # K = k x classes (2 = method)
  ablate "${fm[@]}" --set loss.preset=protoaug            # the other loss preset (paper = method)
  # 16 = method. The DDPM keeps the 16-shot run's training budget (400 optimiser steps = 160 epochs over 160
  # shots in batches of 64): with epochs it would get 25 steps at 1 shot, and the row would measure its collapse.
  for shots in 8 4 1; do ablate "${fm[@]}" --shots $shots --set generator.finetune.steps=400; done
fi

if [ "$which" = all ] || [ "$which" = digits ]; then
  $py scripts/make_digits_folder.py --out runs/data/digits
  loss_rows --dataset folder --root runs/data/digits
fi

$py -m fsynth.report
