"""The one name of a run, a content key of its config and inputs; light (config and cache only), so the Tune trial
and Train controller processes that name runs never load the models or the data stack."""

from __future__ import annotations

from pathlib import Path

from fsynth.cache import content_key
from fsynth.config import ExperimentConfig, config_to_dict


def absolute(path: str | Path) -> str:
    """A local path made absolute (a URI such as s3://... as it is): names and keys never depend on the cwd."""
    text = str(path)
    return text if "://" in text else str(Path(text).expanduser().resolve())


def run_name(cfg: ExperimentConfig, fewshot_dir: str | Path, synthetic_manifest: str | Path | None) -> str:
    """`<dataset>-<baseline>-<12 hex>`: the same run started again (by `python -m fsynth.train` or Ray Train)
    finds its own folder and resumes there; another config or other inputs get another name."""
    key = {"config": config_to_dict(cfg), "fewshot": absolute(fewshot_dir),
           "synthetic": absolute(synthetic_manifest) if synthetic_manifest else None}
    return f"{cfg.data.dataset}-{cfg.name}-{content_key(key, 12)}"
