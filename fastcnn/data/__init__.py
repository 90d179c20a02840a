"""Datasets and the on-device data pipeline for training.

* :mod:`.datasets`   -- CIFAR-10/100 pickles, SVHN ``.mat``, MNIST idx; checksum-verified download
* :mod:`.gpu_loader` -- the whole uint8 dataset on the training device, batched augmentation
"""
from .datasets import (DATA_ENV, DATASETS, Dataset, DatasetError, data_root, load_dataset,
                       take_subset)
from .gpu_loader import GpuLoader, channel_stats

__all__ = ["DATA_ENV", "DATASETS", "Dataset", "DatasetError", "data_root", "load_dataset",
           "take_subset", "GpuLoader", "channel_stats"]
