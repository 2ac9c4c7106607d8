"""Local data sources: NumPy `.npz` arrays and folders or tar archives of images.

Image folders and archives hold `<split>/<class>/<image>` files (any leading
directories are ignored), e.g. `/work/shared/data/cifar10-jpeg.tar.gz`:
`train/airplane/0000.jpg`, ... They are decoded once with Pillow (a tqdm bar
shows progress) and cached as an uncompressed uint8 `.npz` in the cache
folder (`FASTADV_JAX_CACHE`, default `~/.cache/fastadv_jax`), keyed by the
source's path, size and modification time, and written atomically (temporary
file + rename), so an interrupted decode never leaves a partial cache; an
unreadable cache file is reported, removed and rebuilt.

Labels: the index of the class folder in `class_names` when given (folders
must then be exactly those names), otherwise in the sorted list of all class
folders of all splits (so the labels agree across splits).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import uuid
import warnings
from typing import Iterable, Iterator, Sequence

import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".webp", ".tif",
                    ".tiff")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
_CACHE_FORMAT = 1  # bump when the cached layout changes


class DatasetNotFoundError(FileNotFoundError):
  """A dataset is neither prepared for TFDS nor available locally (message says how)."""


def cache_dir() -> str:
  """Folder for decoded caches: env `FASTADV_JAX_CACHE` or `~/.cache/fastadv_jax`."""
  return os.environ.get("FASTADV_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "fastadv_jax")


def is_archive(path: str) -> bool:
  return str(path).lower().endswith(ARCHIVE_SUFFIXES)


# ----------------------------------------------------------------------------- npz


def _as_uint8_images(images: np.ndarray, what: str) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim == 3:  # (N, H, W) grayscale
    images = images[..., None]
  if images.ndim != 4:
    raise ValueError(f"{what} must be NHWC images (N, H, W, C), got shape {images.shape}.")
  if images.shape[-1] not in (1, 3) and images.shape[1] in (1, 3):
    raise ValueError(
        f"{what} has shape {images.shape}, which looks channels-first (NCHW); "
        f"store NHWC (transpose with images.transpose(0, 2, 3, 1)).")
  if images.dtype == np.uint8:
    return images
  if np.issubdtype(images.dtype, np.floating):
    lo, hi = (float(images.min()), float(images.max())) if images.size else (0.0, 1.0)
    if lo < 0.0 or hi > 1.0:
      raise ValueError(
          f"{what} are float with values in [{lo:.4g}, {hi:.4g}]; expected uint8 "
          f"or float in [0, 1].")
    return np.round(images * 255.0).astype(np.uint8)
  if np.issubdtype(images.dtype, np.integer):
    if images.size and (images.min() < 0 or images.max() > 255):
      raise ValueError(f"{what} are integers outside [0, 255].")
    return images.astype(np.uint8)
  raise ValueError(f"{what} have unsupported dtype {images.dtype}.")


def _as_int32_labels(labels: np.ndarray, num_images: int, what: str) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim == 2 and labels.shape[1] == 1:  # Keras-style (N, 1)
    labels = labels[:, 0]
  if labels.ndim != 1 or len(labels) != num_images:
    raise ValueError(
        f"{what} must be a vector of {num_images} class indices, got shape {labels.shape}.")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{what} must be integers, got dtype {labels.dtype}.")
  return labels.astype(np.int32)


def npz_keys_for_split(keys: Iterable[str], split: str) -> tuple[str, str] | None:
  """The (images, labels) keys of `split` in an npz, or None.

  Accepted layouts: `x_<split>`/`y_<split>` (Keras), `<split>_images`/
  `<split>_labels`, `<split>/images`/`<split>/labels`, or a one-split file with
  `images`/`labels`.
  """
  keys = set(keys)
  for pair in ((f"x_{split}", f"y_{split}"), (f"{split}_images", f"{split}_labels"),
               (f"{split}/images", f"{split}/labels"), ("images", "labels")):
    if pair[0] in keys and pair[1] in keys:
      return pair
  return None


def load_npz_split(path: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads one split from `.npz` arrays.

  Args:
    path: an `.npz` file (layouts in `npz_keys_for_split`), or a folder holding
      `<split>.npz` with keys `images` and `labels`.
    split: the split name, e.g. "train".
  Returns:
    (images uint8 (N, H, W, C), labels int32 (N,)). Float images in [0, 1]
    are converted to uint8.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    file = os.path.join(path, f"{split}.npz")
    if not os.path.exists(file):
      found = sorted(f[:-4] for f in os.listdir(path) if f.endswith(".npz"))
      raise DatasetNotFoundError(
          f"No split {split!r} in {path}: expected {split}.npz; found splits {found}.")
    path = file
  if not os.path.exists(path):
    raise DatasetNotFoundError(f"Local dataset file {path} does not exist.")
  with np.load(path, allow_pickle=False) as data:
    pair = npz_keys_for_split(data.files, split)
    if pair is None:
      raise ValueError(
          f"{path} holds no arrays for split {split!r}; its keys are {sorted(data.files)}. "
          f"Expected x_{split}/y_{split}, {split}_images/{split}_labels or images/labels.")
    images = _as_uint8_images(data[pair[0]], f"{path}[{pair[0]!r}]")
    labels = _as_int32_labels(data[pair[1]], len(images), f"{path}[{pair[1]!r}]")
  return images, labels


# ----------------------------------------------------------------------------- cache


def _digest(value: dict) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def cache_file(source: str, fingerprint: dict, identity: dict) -> str:
  """The cache path `<stem>-<identity>-<fingerprint>.npz` for `source` (a name or path).

  `identity` says what is cached (the dataset's path, its class order, ...),
  `fingerprint` the state it was decoded from (sizes, modification times, the
  cache format). A new state of the same identity supersedes the old one:
  `write_cache` removes the other states' files, so a dataset that is copied
  again (a new modification time) does not leave one more decoded copy (184
  MB for CIFAR-10) behind every time.
  """
  stem = os.path.basename(os.path.normpath(source))
  for suffix in ARCHIVE_SUFFIXES:
    if stem.lower().endswith(suffix):
      stem = stem[:-len(suffix)]
      break
  return os.path.join(cache_dir(),
                      f"{stem}-{_digest(identity)[:8]}-{_digest(fingerprint)[:16]}.npz")


def _remove_superseded(path: str) -> None:
  """Removes the cache files of `path`'s identity other than `path` (see `cache_file`)."""
  folder, name = os.path.split(path)
  prefix = name.rsplit("-", 1)[0] + "-"
  for other in os.listdir(folder):
    if (other != name and other.startswith(prefix) and other.endswith(".npz")
        and re.fullmatch(r"[0-9a-f]{16}", other[len(prefix):-len(".npz")])):
      try:
        os.remove(os.path.join(folder, other))
      except OSError:
        pass  # removed by another process, or not ours to remove


def read_cache(path: str) -> dict[str, np.ndarray] | None:
  """Loads a cache `.npz` into memory; None (after removing it) if it is unreadable."""
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  except Exception as e:  # noqa: BLE001 - any unreadable cache is rebuilt
    warnings.warn(f"Ignoring unreadable cache {path} ({type(e).__name__}: {e}); "
                  f"decoding again.")
    try:
      os.remove(path)
    except OSError:
      pass
    return None


def write_cache(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes `arrays` to `path` atomically (a temporary file in the same folder,
  then rename), then removes the files it supersedes (`cache_file`)."""
  folder = os.path.dirname(path)
  os.makedirs(folder, exist_ok=True)
  # A unique name in the same folder (so the rename is atomic); opened with the
  # user's umask, unlike mkstemp's private 0600.
  tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
  try:
    with open(tmp, "xb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  _remove_superseded(path)


# ----------------------------------------------------------------------------- images


def _image_entries_in_archive(path: str) -> Iterator[tuple[str, str, str, bytes]]:
  with tarfile.open(path, "r:*") as archive:
    for member in archive:
      if not member.isfile():
        continue
      parts = [p for p in member.name.split("/") if p not in ("", ".")]
      if len(parts) < 3 or not parts[-1].lower().endswith(IMAGE_EXTENSIONS):
        continue
      if parts[-1].startswith("._"):  # macOS resource forks
        continue
      data = archive.extractfile(member).read()
      yield parts[-3], parts[-2], "/".join(parts), data


def _image_files_in_folder(path: str) -> list[tuple[str, str, str]]:
  entries = []
  for split in sorted(os.listdir(path)):
    split_dir = os.path.join(path, split)
    if not os.path.isdir(split_dir):
      continue
    for cls in sorted(os.listdir(split_dir)):
      cls_dir = os.path.join(split_dir, cls)
      if not os.path.isdir(cls_dir):
        continue
      for name in sorted(os.listdir(cls_dir)):
        if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("._"):
          entries.append((split, cls, os.path.join(split, cls, name)))
  return entries


def _decode(data: bytes, where: str) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(io.BytesIO(data)) as image:
      return np.asarray(image.convert("RGB"), dtype=np.uint8)
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"Cannot decode image {where}: {e}") from e


def _fingerprint(path: str, class_names: Sequence[str] | None) -> dict:
  path = os.path.abspath(path)
  if os.path.isdir(path):
    # A folder's own mtime misses edits deep inside: fingerprint every file.
    h = hashlib.sha256()
    for split, cls, rel in _image_files_in_folder(path):
      st = os.stat(os.path.join(path, rel))
      h.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    stat = {"files": h.hexdigest()}
  else:
    st = os.stat(path)
    stat = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
  return {"path": path, **stat, "class_names": list(class_names) if class_names else None,
          "format": _CACHE_FORMAT}


def _decode_all(path: str, class_names: Sequence[str] | None,
                progress: bool) -> dict[str, np.ndarray]:
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  if os.path.isdir(path):
    files = _image_files_in_folder(path)
    total = len(files)

    def entries():
      for split, cls, rel in files:
        with open(os.path.join(path, rel), "rb") as f:
          yield split, cls, rel, f.read()
    stream = entries()
  else:
    total = None
    stream = _image_entries_in_archive(path)
  by_split: dict[str, list[tuple[str, str, np.ndarray]]] = {}
  bar = tqdm(stream, total=total, unit="img", disable=not progress,
             desc=f"Decoding {os.path.basename(os.path.normpath(path))}")
  for split, cls, where, data in bar:
    by_split.setdefault(split, []).append((cls, where, _decode(data, f"{where} in {path}")))
  if not by_split:
    raise DatasetNotFoundError(
        f"No images found in {path}: expected <split>/<class>/<image> files with "
        f"extensions {IMAGE_EXTENSIONS}.")
  found_classes = sorted({cls for items in by_split.values() for cls, _, _ in items})
  if class_names is None:
    names = found_classes
  else:
    names = list(class_names)
    unknown = sorted(set(found_classes) - set(names))
    if unknown:
      raise ValueError(
          f"Class folders {unknown} in {path} are not among the expected class names "
          f"{names}.")
  index = {name: i for i, name in enumerate(names)}
  arrays = {"class_names": np.asarray(names, dtype=str)}
  for split, items in by_split.items():
    items.sort(key=lambda item: (index[item[0]], item[1]))
    shapes = {img.shape for _, _, img in items}
    if len(shapes) > 1:
      first = items[0][2].shape
      odd = next(where for _, where, img in items if img.shape != first)
      raise ValueError(
          f"Images of split {split!r} in {path} differ in shape ({sorted(shapes)}; e.g. "
          f"{odd} is not {first}); this loader keeps whole splits in memory and needs "
          f"one image size (resize them first, or use the ImageNet streaming loader).")
    arrays[f"{split}/images"] = np.stack([img for _, _, img in items])
    arrays[f"{split}/labels"] = np.asarray([index[cls] for cls, _, _ in items], np.int32)
  return arrays


def load_image_folder(path: str, *, class_names: Sequence[str] | None = None,
                      cache: bool = True, progress: bool = True) -> dict[str, np.ndarray]:
  """Decodes every split of an image folder or archive (cached); returns its arrays.

  Args:
    path: a folder or a tar archive (.tar, .tar.gz, .tgz, ...) of
      `<split>/<class>/<image>` files.
    class_names: the class order (label i = class_names[i]); default sorted.
    cache: read/write the decoded arrays in `cache_dir()`.
    progress: show a tqdm bar while decoding.
  Returns:
    `{"<split>/images": uint8 (N, H, W, 3), "<split>/labels": int32 (N,),
    "class_names": str array}`.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise DatasetNotFoundError(f"Local dataset {path} does not exist.")
  if not (os.path.isdir(path) or is_archive(path)):
    raise ValueError(
        f"{path} is neither a folder nor a tar archive ({', '.join(ARCHIVE_SUFFIXES)}).")
  cache_path = cache_file(path, _fingerprint(path, class_names), {
      "path": os.path.abspath(path), "class_names": list(class_names) if class_names else None,
  }) if cache else None
  if cache_path is not None:
    arrays = read_cache(cache_path)
    if arrays is not None:
      return arrays
  arrays = _decode_all(path, class_names, progress)
  if cache_path is not None:
    write_cache(cache_path, arrays)
  return arrays


def load_image_folder_split(path: str, split: str, *,
                            class_names: Sequence[str] | None = None, cache: bool = True,
                            progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """One split of an image folder or archive: (images uint8 NHWC, labels int32).

  See `load_image_folder`; all splits are decoded (and cached) in one pass.
  Folders list their examples class by class, so the split is returned in one
  fixed shuffled order (seed 0, `folder_order`): "the first n test points"
  (the GradAlign protocol) is then a random sample, as in the original CIFAR-10
  files, instead of n examples of the first class.
  """
  arrays = load_image_folder(path, class_names=class_names, cache=cache, progress=progress)
  key = f"{split}/images"
  if key not in arrays:
    found = sorted(k[:-len("/images")] for k in arrays if k.endswith("/images"))
    raise ValueError(f"Unknown split {split!r} for {path}; choose one of {found}.")
  order = folder_order(len(arrays[key]))
  return arrays[key][order], arrays[f"{split}/labels"][order]


def folder_order(num_examples: int) -> np.ndarray:
  """The fixed order in which folder/archive splits are returned (a seed-0 permutation)."""
  return np.random.default_rng(0).permutation(num_examples)


def load_local_split(path: str, split: str, *, class_names: Sequence[str] | None = None,
                     cache: bool = True,
                     progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """One split from a local source, picked by what `path` is.

  `.npz` file, or a folder of `<split>.npz`: `load_npz_split`; a tar archive or a
  folder of `<split>/<class>/<image>`: `load_image_folder_split`.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise DatasetNotFoundError(f"Local dataset {path} does not exist.")
  if path.lower().endswith(".npz") or (
      os.path.isdir(path) and any(f.endswith(".npz") for f in os.listdir(path))):
    return load_npz_split(path, split)
  return load_image_folder_split(path, split, class_names=class_names, cache=cache,
                                 progress=progress)
