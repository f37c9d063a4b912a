#!/usr/bin/env bash
# The evidence of docs/results.md for "the method at work" (tune_spaces/evidence.yaml: the full test set, 5 seeds
# per row, the budget chosen on validation), each row an fsynth.tune command, then fsynth.report. Cached and
# resumable like scripts/run_ablations.sh: a rerun finishes what is missing.
#   bash scripts/run_evidence.sh                  # Fashion-MNIST (the embedded default) main table
#   bash scripts/run_evidence.sh digits           # the digits folder dataset's main rows
# On 2 CPU cores: ~12 min per 5-seed row (6 epochs, 10,000 test images per seed).
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
py=.venv/bin/python
which=${1:-fashion-mnist}

row() {  # row DATASET-ARGS -- EXTRA: one configuration of the evidence space
  echo "== fsynth.tune $*" >&2
  $py -m fsynth.tune "$@" --space evidence
}

if [ "$which" = fashion-mnist ]; then
  fm=(--dataset fashion-mnist)
  row "${fm[@]}" --baseline zero-shot --seeds 1   # the frozen start: no training, so no seed changes it
  for baseline in real-only real-synthetic-ce method; do row "${fm[@]}" --baseline "$baseline"; done
  for baseline in discrepancy-only robustness-only; do row "${fm[@]}" --baseline "$baseline" --seeds 3; done
  row "${fm[@]}" --set partition.features=embedding --seeds 3  # Algorithm 1 line 4's embedding regions
fi
if [ "$which" = digits ]; then
  $py scripts/make_digits_folder.py --out runs/data/digits
  dg=(--dataset folder --root runs/data/digits)
  row "${dg[@]}" --baseline zero-shot --seeds 1
  for baseline in real-only real-synthetic-ce method; do row "${dg[@]}" --baseline "$baseline" --seeds 3; done
fi
$py -m fsynth.report
