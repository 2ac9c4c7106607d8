"""Known datasets and the single entry point `load_split` for in-memory datasets.

CIFAR-10, CIFAR-100 and SVHN fit in memory as uint8 arrays; `load_split`
returns a whole split from TFDS (prepared, read without TensorFlow) or from a
local source (an `.npz`, an image folder or a tar archive of
`<split>/<class>/<image>` files). ImageNet is streamed instead
(`fastadv_jax.data.imagenet`).

`source="auto"` uses TFDS when the dataset is prepared there; otherwise, for
CIFAR-10, the JPEG archive at `$FASTADV_JAX_DATA` (a file, or a folder holding
`cifar10-jpeg.tar.gz`) or `<repo>/../shared/data/cifar10-jpeg.tar.gz`; otherwise
a `DatasetNotFoundError` that says how to prepare the dataset.
"""

from __future__ import annotations

import dataclasses
import os
import re

import numpy as np

from fastadv_jax import _checks
from fastadv_jax.data import local, tfds_source
from fastadv_jax.data.local import DatasetNotFoundError

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
CIFAR10_ARCHIVE = "cifar10-jpeg.tar.gz"


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the library knows about a dataset."""
  name: str                      # the TFDS name
  num_classes: int
  image_shape: tuple[int, int, int] | None   # None: images differ in size
  splits: tuple[str, ...]        # TFDS splits
  train_split: str
  eval_split: str
  in_memory: bool                # load_split can hold it as one array
  class_names: tuple[str, ...] | None = None


DATASETS = {
    "cifar10": DatasetSpec("cifar10", 10, (32, 32, 3), ("train", "test"), "train", "test",
                           True, CIFAR10_CLASSES),
    "cifar100": DatasetSpec("cifar100", 100, (32, 32, 3), ("train", "test"), "train",
                            "test", True),
    "svhn_cropped": DatasetSpec("svhn_cropped", 10, (32, 32, 3), ("train", "test", "extra"),
                                "train", "test", True),
    "imagenet2012": DatasetSpec("imagenet2012", 1000, None, ("train", "validation"),
                                "train", "validation", False),
}
ALIASES = {"svhn": "svhn_cropped", "imagenet": "imagenet2012"}
SOURCES = ("auto", "tfds", "local")


def get_spec(dataset: str) -> DatasetSpec:
  """The `DatasetSpec` of a known dataset name (or alias); ValueError otherwise."""
  name = ALIASES.get(dataset, dataset)
  _checks.check_choice("dataset", name, list(DATASETS) + list(ALIASES))
  return DATASETS[name]


def _check_split(spec: DatasetSpec, split: str) -> None:
  if not isinstance(split, str) or not split:
    raise ValueError(f"split must be a non-empty string, got {split!r}.")
  for part in split.split("+"):
    base = re.split(r"\[", part.strip())[0]
    if base not in spec.splits:
      raise ValueError(
          f"Unknown split {base!r} of {spec.name}; choose one of {list(spec.splits)} "
          f"(TFDS slices such as 'train[:1000]' are allowed).")


def default_cifar10_path() -> str:
  """`$FASTADV_JAX_DATA` (file, or folder with the archive) or <repo>/../shared/data/<archive>."""
  env = os.environ.get("FASTADV_JAX_DATA")
  if env:
    return os.path.join(env, CIFAR10_ARCHIVE) if os.path.isdir(env) else env
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return os.path.normpath(os.path.join(repo, "..", "shared", "data", CIFAR10_ARCHIVE))


_SLICE = re.compile(r"^(\w+)\[(-?\d*%?):(-?\d*%?)\]$")


def _local_with_slice(path, split, class_names, cache, progress):
  """Local splits accept one TFDS-style slice, `train[:1000]` or `train[-10%:]`."""
  match = _SLICE.match(split.strip())
  base = match.group(1) if match else split
  images, labels = local.load_local_split(path, base, class_names=class_names, cache=cache,
                                          progress=progress)
  if not match:
    if "[" in split or "+" in split:
      raise ValueError(f"Local sources take a split name with at most one slice "
                       f"('train', 'train[:1000]', 'train[-10%:]'), got {split!r}.")
    return images, labels

  def bound(text):
    if not text:
      return None
    if text.endswith("%"):
      return int(round(len(images) * int(text[:-1]) / 100))
    return int(text)
  sl = slice(bound(match.group(2)), bound(match.group(3)))
  return images[sl], labels[sl]


_SAID: set[str] = set()


def _say_once(message: str) -> None:
  """Prints `message` the first time only (one notice per process, not per split)."""
  if message not in _SAID:
    _SAID.add(message)
    print(message, flush=True)


def load_split(dataset: str, split: str, *, source: str = "auto", data_dir: str | None = None,
               local_path: str | None = None, class_names=None, cache: bool = True,
               progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """A whole split of CIFAR-10, CIFAR-100 or SVHN as uint8 NHWC and int32 arrays.

  Args:
    dataset: "cifar10", "cifar100" or "svhn_cropped" (alias "svhn").
    split: "train", "test" ("extra" for SVHN); TFDS slices like "train[:1000]"
      or "train[-10%:]" also work for local sources.
    source: "tfds" (prepared TFDS dataset, read without TensorFlow), "local"
      (`local_path`, or the CIFAR-10 archive for cifar10), or "auto" (`local_path`
      if given, else TFDS if prepared, else the CIFAR-10 archive for cifar10).
    data_dir: the TFDS data folder (default: TFDS's).
    local_path: an `.npz`, a folder of `<split>.npz`, an image folder or a tar
      archive of `<split>/<class>/<image>` files.
    class_names: class order for image folders (default: CIFAR-10's order for
      cifar10, sorted folder names otherwise).
    cache: cache decoded images as `.npz` in `local.cache_dir()`.
    progress: show tqdm bars while decoding.
  Returns:
    (images uint8 (N, H, W, C), labels int32 (N,)).
  Raises:
    ValueError: unknown dataset, split or source.
    DatasetNotFoundError: the data is in none of the places looked at.
  """
  spec = get_spec(dataset)
  _checks.check_choice("source", source, SOURCES)
  if not spec.in_memory:
    raise ValueError(
        f"{spec.name} does not fit in memory as one array; stream it with "
        f"fastadv_jax.data.imagenet (train_batches / eval_batches).")
  _check_split(spec, split)
  if class_names is None:
    class_names = spec.class_names
  if source == "auto" and local_path is not None:
    source = "local"
  if source == "local":
    path = local_path
    if path is None:
      if spec.name != "cifar10":
        raise ValueError(
            f"source='local' for {spec.name} needs local_path (an .npz, an image folder "
            f"or a tar archive of <split>/<class>/<image> files).")
      path = default_cifar10_path()
    return _local_with_slice(path, split, class_names, cache, progress)
  if source == "tfds":
    return tfds_source.load_tfds_split(spec.name, split, data_dir=data_dir, cache=cache,
                                       progress=progress)
  # auto
  try:
    return tfds_source.load_tfds_split(spec.name, split, data_dir=data_dir, cache=cache,
                                       progress=progress)
  except DatasetNotFoundError as tfds_error:
    if spec.name == "cifar10":
      path = default_cifar10_path()
      if os.path.exists(path):
        _say_once(f"CIFAR-10: no prepared TFDS dataset; reading the local copy {path}.")
        return _local_with_slice(path, split, class_names, cache, progress)
      raise DatasetNotFoundError(
          f"{tfds_error}\nNo local copy either: {path} does not exist (set "
          f"FASTADV_JAX_DATA to the CIFAR-10 image archive, or pass local_path).") from None
    raise DatasetNotFoundError(
        f"{tfds_error}\nOr pass local_path=... (an .npz or an image folder/archive) "
        f"with source='local'.") from None
