"""The dataset registry: every builder registers itself where it is defined, with its config schema.

    @DATASETS.register("mnist5k", schema=EmbeddedDataset)
    def build_mnist5k(cfg: Mapping[str, Any]) -> DataBundle: ...

A builder takes the dataset's config without `name`; the schema (a dataclass of kdrun/config/groups.py, also
the one conf/dataset/NAME.yaml names) gives the accepted keys, their types and their defaults.
"""
from __future__ import annotations

from kdrun.registry import Registry

DATASETS = Registry("dataset", "dataset=NAME")
