"""How much the static regions mix real and synthetic samples: the quantity that decides whether the method's
regularisers do anything.

The discrepancy term compares real and synthetic samples of the same region, and both terms only count regions
that hold a real sample (T in DESIGN.md 1.3). When k-means puts every synthetic image in a region with no real
one, both terms are exactly 0 and the method trains like cross-entropy on real + synthetic. For every cached
partition under `--cache` (fsynth.tune's `<out>/cache`), this prints K, the regions holding both kinds, and the
share of synthetic samples that lie in a region with a real sample.

    python scripts/region_mixing.py --cache runs/cache
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def mixing(ids: np.ndarray, assignments: np.ndarray) -> dict:
    """K, regions with both kinds, and the share of synthetic samples in a region with a real one."""
    synthetic = np.array([str(i).startswith("synthetic/") for i in ids])
    regions = np.unique(assignments)
    with_real = {k for k in regions if (~synthetic & (assignments == k)).any()}
    both = [k for k in with_real if (synthetic & (assignments == k)).any()]
    in_t = np.isin(assignments[synthetic], list(with_real)).mean() if synthetic.any() else float("nan")
    return {"k": len(regions), "real": int((~synthetic).sum()), "synthetic": int(synthetic.sum()),
            "regions_with_both": len(both), "synthetic_in_real_regions": float(in_t)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="runs/cache", help="fsynth.tune's cache folder (default runs/cache)")
    args = parser.parse_args(argv)
    folders = sorted(Path(args.cache).glob("regions-*/regions.npz"))
    if not folders:
        print(f"error: no cached regions under {args.cache}; run python -m fsynth.tune first", file=sys.stderr)
        return 2
    print("| regions | dataset | features | image px | K | real | synthetic | regions with both | "
          "synthetic in a region with a real sample |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for npz in folders:
        parts = json.loads((npz.parent / "key.json").read_text())["parts"]
        with np.load(npz, allow_pickle=False) as z:
            m = mixing(z["ids"], z["assignments"])
        print(f"| {npz.parent.name} | {parts['dataset']} | {parts['features']} | {parts.get('image_size', '-')} | "
              f"{m['k']} | {m['real']} | {m['synthetic']} | {m['regions_with_both']} | "
              f"{'–' if not m['synthetic'] else format(m['synthetic_in_real_regions'], '.0%')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
