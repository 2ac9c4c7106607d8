"""TFDS source: prepared datasets read through `tfds.data_source`, without TensorFlow.

`tfds.data_source(name, split=..., data_dir=...)` gives random access to a
dataset prepared in the ArrayRecord format, with NumPy decoding (Pillow), and
needs no TensorFlow. Preparing it the first time (download and conversion)
does need TensorFlow and internet, once:

  pip install "fastadv-jax[prepare]"
  python -c "import tensorflow_datasets as tfds; \\
      tfds.builder('cifar10', file_format='array_record').download_and_prepare()"
  # or: tfds build cifar10 --file_format=array_record

A dataset that is not prepared raises `DatasetNotFoundError` naming the
dataset, the data folder and these commands (never a download attempt: we pass
`download=False`).
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import numpy as np

from fastadv_jax.data.local import (DatasetNotFoundError, cache_dir, cache_file, read_cache,
                                    write_cache)

_CACHE_FORMAT = 1


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds


def prepare_instructions(name: str, data_dir: str | None) -> str:
  """The commands that prepare `name` once in ArrayRecord format."""
  dir_arg = f", data_dir={data_dir!r}" if data_dir else ""
  dir_flag = f" --data_dir={data_dir}" if data_dir else ""
  manual = ""
  if name == "imagenet2012":
    manual = (" ImageNet cannot be downloaded automatically: put ILSVRC2012_img_train.tar"
              " and ILSVRC2012_img_val.tar in the manual folder (<data_dir>/downloads/manual"
              " or --manual_dir) first.")
  return (
      f"Prepare it once, on a machine with internet (this needs TensorFlow):\n"
      f"  pip install \"fastadv-jax[prepare]\"\n"
      f"  python -c \"import tensorflow_datasets as tfds; tfds.builder({name!r}"
      f"{dir_arg}, file_format='array_record').download_and_prepare()\"\n"
      f"or: tfds build {name} --file_format=array_record{dir_flag}.{manual}")


def _builder_dir(name: str, data_dir: str | None) -> tuple[str, Any]:
  """(the version folder TFDS looks in, the builder or None)."""
  try:
    builder = _tfds().builder(name, data_dir=data_dir)
    return str(builder.data_dir), builder
  except Exception:  # noqa: BLE001 - only used to word the error
    return os.path.join(data_dir or "~/tensorflow_datasets", name), None


def _not_prepared_error(name: str, split: str, data_dir: str | None,
                        cause: BaseException | None) -> BaseException:
  version_dir, builder = _builder_dir(name, data_dir)
  shown_dir = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets (default)"
  file_format = None
  try:
    if builder is not None and builder.is_prepared():
      file_format = str(builder.info.file_format)
  except Exception:  # noqa: BLE001
    pass
  if file_format is not None and "array_record" not in file_format.lower():
    return DatasetNotFoundError(
        f"TFDS dataset {name!r} is prepared in {version_dir} but as {file_format}; "
        f"fastadv_jax reads it with tfds.data_source, which needs the ArrayRecord format. "
        f"Re-prepare it with file_format='array_record' (another data_dir, or delete "
        f"the old copy).\n" + prepare_instructions(name, data_dir))
  if builder is not None and file_format is None:
    return DatasetNotFoundError(
        f"TFDS dataset {name!r} (split {split!r}) is not prepared in data_dir "
        f"{shown_dir} (looked for {version_dir}). fastadv_jax reads prepared datasets "
        f"without TensorFlow and never downloads.\n" + prepare_instructions(name, data_dir))
  return cause  # prepared as ArrayRecord: the failure is something else


def data_source(name: str, split: str, *, data_dir: str | None = None,
                decoders: Any = None) -> Sequence[dict[str, Any]]:
  """`tfds.data_source(name, split=split, data_dir=data_dir)` with our missing-data error.

  Args:
    name: a TFDS name, e.g. "cifar10", "imagenet2012".
    split: a TFDS split, slices allowed ("train[:1000]").
    data_dir: the TFDS data folder (default: TFDS's, `~/tensorflow_datasets`
      or `$TFDS_DATA_DIR`).
    decoders: passed to TFDS, e.g. `{"image": tfds.decode.SkipDecoding()}`
      for the encoded bytes.
  Returns:
    A random-access sequence of example dicts (NumPy values).
  Raises:
    DatasetNotFoundError: the dataset is not prepared (or not in ArrayRecord).
  """
  tfds = _tfds()
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir, download=False,
                            decoders=decoders)
  except Exception as e:  # noqa: BLE001 - re-raised unless it means "not prepared"
    error = _not_prepared_error(name, split, data_dir, e)
    if error is e:
      raise
    raise error from e


def is_prepared(name: str, data_dir: str | None = None) -> bool:
  """Whether `name` is prepared in ArrayRecord format under `data_dir`."""
  try:
    builder = _tfds().builder(name, data_dir=data_dir)
    return bool(builder.is_prepared()) and (
        "array_record" in str(builder.info.file_format).lower())
  except Exception:  # noqa: BLE001
    return False


def read_records(source: Sequence[Any], indices: Sequence[int]) -> list:
  """`[source[i] for i in indices]`, through the batched `__getitems__` when it works.

  ArrayRecord sources read a batch of records in parallel with `__getitems__`;
  `tfds.testing.mock_data`'s mock of it is broken in TFDS 4.9 (a TypeError),
  and plain sequences lack it, so those are read one record at a time.
  """
  indices = [int(i) for i in indices]
  getitems = getattr(source, "__getitems__", None)
  if getitems is not None:
    try:
      return list(getitems(indices))
    except TypeError:
      pass
  return [source[i] for i in indices]


def _cache_fingerprint(name: str, split: str, data_dir: str | None, keys) -> dict | None:
  """A key for caching the decoded split, or None if the files are not on disk (mocks)."""
  version_dir, _ = _builder_dir(name, data_dir)
  info = os.path.join(version_dir, "dataset_info.json")
  base = re.split(r"[\[+]", split)[0]
  if not os.path.exists(info):
    return None
  shards = sorted(f for f in os.listdir(version_dir)
                  if f.startswith(f"{name}-{base}.array_record"))
  if not shards:
    return None
  stats = [(f, os.stat(os.path.join(version_dir, f)).st_size,
            os.stat(os.path.join(version_dir, f)).st_mtime_ns) for f in shards]
  return {"version_dir": os.path.abspath(version_dir), "split": split, "shards": stats,
          "keys": list(keys), "format": _CACHE_FORMAT}


def load_tfds_split(name: str, split: str, *, data_dir: str | None = None,
                    image_key: str = "image", label_key: str = "label",
                    chunk_size: int = 1024, cache: bool = True,
                    progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """A whole split of a prepared TFDS image dataset in memory.

  Reads in chunks (`__getitems__`), decoding with Pillow, and caches the
  decoded uint8 arrays in `cache_dir()` keyed by the ArrayRecord files' names,
  sizes and modification times (only when those files exist on disk).

  Args:
    name: e.g. "cifar10", "cifar100", "svhn_cropped".
    split: e.g. "train", "test", "train[:1000]".
    data_dir: the TFDS data folder.
    image_key: the feature holding the image.
    label_key: the feature holding the class index.
    chunk_size: examples read per call.
    cache: use the decoded-array cache.
    progress: show a tqdm bar.
  Returns:
    (images uint8 (N, H, W, C), labels int32 (N,)).
  """
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  source = data_source(name, split, data_dir=data_dir)
  fingerprint = _cache_fingerprint(name, split, data_dir, (image_key, label_key)) if (
      cache) else None
  identity = {"name": name, "split": split, "keys": [image_key, label_key],
              "data_dir": os.path.abspath(data_dir) if data_dir else None}
  cache_path = cache_file(f"tfds-{name}-{re.sub(r'[^A-Za-z0-9_.-]', '_', split)}",
                           fingerprint, identity) if fingerprint else None
  if cache_path is not None:
    arrays = read_cache(cache_path)
    if arrays is not None:
      return arrays["images"], arrays["labels"]
  n = len(source)
  images, labels = None, np.zeros((n,), np.int32)
  bar = tqdm(total=n, unit="img", disable=not progress, desc=f"Reading {name} {split}")
  for start in range(0, n, chunk_size):
    idx = list(range(start, min(n, start + chunk_size)))
    examples = read_records(source, idx)
    for i, example in zip(idx, examples):
      image = np.asarray(example[image_key])
      if image.ndim == 2:
        image = image[..., None]
      if images is None:
        images = np.empty((n,) + image.shape, np.uint8)
      elif image.shape != images.shape[1:]:
        raise ValueError(
            f"Example {i} of {name} {split!r} has shape {image.shape}, not "
            f"{images.shape[1:]}: images of different sizes cannot be held as one array "
            f"(for ImageNet use fastadv_jax.data.imagenet).")
      images[i] = image
      labels[i] = int(example[label_key])
    bar.update(len(idx))
  bar.close()
  if images is None:
    raise ValueError(f"TFDS split {name} {split!r} is empty.")
  if cache_path is not None:
    write_cache(cache_path, {"images": images, "labels": labels})
  return images, labels


__all__ = ["data_source", "is_prepared", "load_tfds_split", "prepare_instructions",
           "DatasetNotFoundError", "cache_dir"]
