#!/usr/bin/env bash
# Sets up fsynth on a fresh machine: .venv with fsynth and everything its code and tests need, and Debian's copy
# of Fashion-MNIST (the embedded default's data). Idempotent: a second run only checks, and reinstalls when
# pyproject.toml or this script changed.
#   FSYNTH_TORCH   pip requirement(s) for torch/torchvision (default: the CPU-usable pair for this architecture)
#   FSYNTH_EXTRAS  pyproject extras (default: cpu,dev; use gpu,dev on a CUDA machine for faiss-gpu)
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv

case "$(uname -m)" in
  aarch64 | arm64) default_torch="torch==2.9.1 torchvision==0.24.1" ;;
  *) default_torch="torch==2.14.1 torchvision==0.29.1" ;;
esac
torch_req=${FSYNTH_TORCH:-$default_torch}
extras=${FSYNTH_EXTRAS:-cpu,dev}

stamp=.venv/.fsynth-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$extras-${torch_req// /_}
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing into .venv (torch: $torch_req; extras: $extras)"
  .venv/bin/python -m pip install -q --upgrade pip
  # torch and torchvision first and pinned as a pair: an unpinned resolve can pick a torchvision that does not
  # match the installed torch and fails to import (and takes open_clip and peft with it).
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q $torch_req
  .venv/bin/python -m pip install -q -e ".[$extras]"
  echo "$want" > "$stamp"
fi

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null; }
  else
    echo "setup: Debian's dataset-fashion-mnist is not installed; add --download to fetch Fashion-MNIST instead"
  fi
fi
echo "setup: ready (.venv/bin/python)"
