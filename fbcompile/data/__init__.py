"""Datasets for fbcompile, all offline: nothing here ever downloads.

``load_dataset(spec, seed=0)`` returns a :class:`Dataset` (float32 inputs, int64 labels or
float32 regression targets, train and test splits); ``batches`` iterates minibatches of one epoch.
Specs (``DATASET_NAMES``): ``digits`` (scikit-learn, shipped), ``mnist1d`` (generated locally),
``synthetic-regression`` and ``synthetic-classification`` (paper 001, section 4), and
``mnist:DIR``, ``fashion-mnist:DIR``, ``cifar10:DIR`` (files the user already has).
"""
from .batching import batches
from .dataset import Dataset
from .registry import DATASET_NAMES, load_dataset, spec_help

__all__ = ["DATASET_NAMES", "Dataset", "batches", "load_dataset", "spec_help"]
