#!/usr/bin/env bash
# The evidence of docs/results.md for "the method at work" (tune_spaces/evidence.yaml: the full test set, 5 seeds
# per row, the budget chosen on validation), each row an fsynth.tune command, then fsynth.report. Cached and
# resumable like scripts/run_ablations.sh: a rerun finishes what is missing.
#   bash scripts/run_evidence.sh                  # Fashion-MNIST (the embedded default): main table, then factors
#   bash scripts/run_evidence.sh factors          # only its factor rows (image-to-image, features, K, λ)
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
  for baseline in discrepancy-only robustness-only; do row "${fm[@]}" --baseline "$baseline"; done
fi
if [ "$which" = fashion-mnist ] || [ "$which" = factors ]; then
  fm=(--dataset fashion-mnist)
  i2i=(--set generator.init_from=shots)
  # image-to-image from the shots (SDEdit), the synthetic-set factor: CE and the method at each strength
  for baseline in real-synthetic-ce method; do row "${fm[@]}" "${i2i[@]}" --set generator.strength=0.5 --baseline "$baseline"; done
  for baseline in real-synthetic-ce method; do
    row "${fm[@]}" "${i2i[@]}" --set generator.strength=0.75 --baseline "$baseline" --seeds 3
  done
  # the regions' feature space (Algorithm 1 line 4 clusters the images themselves: embedding or pixels)
  for features in embedding pixels; do row "${fm[@]}" --set partition.features=$features --seeds 3; done
  # the number of regions
  row "${fm[@]}" --set partition.mode=single --seeds 3
  for k in 1 4; do row "${fm[@]}" --set partition.cluster_multiple=$k --seeds 3; done
  # λ from the paper's published grid, chosen on validation (its own space: 4 trials, then 5 seeds)
  echo "== fsynth.tune ${fm[*]} --space evidence-lambda" >&2
  $py -m fsynth.tune "${fm[@]}" --space evidence-lambda
fi
if [ "$which" = digits ]; then
  $py scripts/make_digits_folder.py --out runs/data/digits
  dg=(--dataset folder --root runs/data/digits)
  row "${dg[@]}" --baseline zero-shot --seeds 1
  for baseline in real-only real-synthetic-ce method discrepancy-only robustness-only; do
    row "${dg[@]}" --baseline "$baseline"
  done
fi
$py -m fsynth.report
