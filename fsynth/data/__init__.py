"""Real data: the dataset registry, loaders over local roots, splits and few-shot sampling."""

from fsynth.data.records import RealDataset, Sample, load_image
from fsynth.data.registry import DatasetSpec, get_spec, list_specs, load_dataset

__all__ = ["DatasetSpec", "RealDataset", "Sample", "get_spec", "list_specs", "load_dataset", "load_image"]
