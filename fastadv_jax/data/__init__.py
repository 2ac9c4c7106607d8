"""Input pipeline: sources, deterministic batching, on-device augmentation, ImageNet.

* `load_split(dataset, split, source="auto"|"tfds"|"local", ...)`: a whole split
  of CIFAR-10/100 or SVHN as (uint8 NHWC, int32) NumPy arrays, from a prepared
  TFDS dataset (read without TensorFlow) or a local `.npz` / image folder / tar.
* `train_batches`, `epoch_permutation`, `shard_for_host`:
  deterministic, resumable, per-host batches of uint8 arrays.
* `augment`, `to_float`: crop/flip/rotation in JAX, inside the train step.
* `fastadv_jax.data.imagenet`: streaming ImageNet with progressive resizing.
"""

from fastadv_jax.data import imagenet
from fastadv_jax.data.augment import (PAD_MODES, augment, random_crop_flip,
                                      random_rotation, rotate, to_float)
from fastadv_jax.data.local import (DatasetNotFoundError, cache_dir, load_image_folder,
                                    load_image_folder_split, load_local_split,
                                    load_npz_split)
from fastadv_jax.data.pipeline import (epoch_permutation, shard_for_host,
                                       steps_per_epoch, train_batches)
from fastadv_jax.data.sources import (ALIASES, CIFAR10_CLASSES, DATASETS, SOURCES,
                                      DatasetSpec, default_cifar10_path, get_spec,
                                      load_split)
from fastadv_jax.data.tfds_source import data_source, is_prepared, load_tfds_split

__all__ = [
    "ALIASES", "CIFAR10_CLASSES", "DATASETS", "DatasetNotFoundError", "DatasetSpec",
    "PAD_MODES", "SOURCES", "augment", "cache_dir", "data_source", "default_cifar10_path",
    "epoch_permutation", "get_spec", "imagenet", "is_prepared",
    "load_image_folder", "load_image_folder_split", "load_local_split", "load_npz_split",
    "load_split", "load_tfds_split", "random_crop_flip", "random_rotation", "rotate",
    "shard_for_host", "steps_per_epoch", "to_float", "train_batches",
]
