"""ImageNet streaming input with Wong et al.'s three-phase progressive resizing.

Wong, Rice & Kolter 2020 ("Fast is better than free", ImageNet, after the
fast.ai DAWNBench recipe) train ResNet-50 for 15 epochs in three phases:

| epochs | crop | batch | images read from                      |
|--------|------|-------|---------------------------------------|
| 0-6    | 128  | 512   | copies pre-resized to shorter side 160 |
| 6-12   | 224  | 224   | copies pre-resized to shorter side 352 |
| 12-15  | 288  | 128   | the original images                    |

(the GradAlign runs used batches 180 and 100 in the last two phases). Training
takes a torchvision `RandomResizedCrop(crop)` (scale 0.08-1, ratio 3/4-4/3) and
a horizontal flip; validation a `CenterCrop(288)` of the original image (their
phase-3 config has `img_size: 0`, i.e. no resize; `resize_size` offers the usual
resize-then-crop instead). Here the pre-resizing happens on the fly (shorter
side to `resize_size`) so one prepared TFDS copy serves every phase.

Records come from `tfds.data_source("imagenet2012", ...)` with the image left
encoded (`imagenet_source`); they are read in the main thread (ArrayRecord
batches its reads) and decoded, resized and cropped with Pillow in a thread
pool while the previous batch is being consumed. Batches are uint8 NHWC NumPy
arrays, deterministic: the order is `epoch_permutation(N, seed, epoch)` and the
crop of each example is drawn from a generator seeded by (seed, epoch, index).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import math
from typing import Any, Iterator, Sequence

import numpy as np

from fastadv_jax.data import pipeline, tfds_source


@dataclasses.dataclass(frozen=True)
class ResizePhase:
  """One phase of progressive resizing: epochs [start_epoch, end_epoch)."""
  start_epoch: int
  end_epoch: int
  image_size: int                 # training crop size
  batch_size: int                 # global batch size
  resize_size: int | None = None  # shorter side before the crop; None: original


WONG_PHASES = (ResizePhase(0, 6, 128, 512, 160), ResizePhase(6, 12, 224, 224, 352),
               ResizePhase(12, 15, 288, 128, None))
GRADALIGN_PHASES = (ResizePhase(0, 6, 128, 512, 160), ResizePhase(6, 12, 224, 180, 352),
                    ResizePhase(12, 15, 288, 100, None))
EVAL_IMAGE_SIZE = 288


def check_phases(phases: Sequence[ResizePhase]) -> None:
  """Phases must be contiguous, start at epoch 0 and have positive sizes."""
  phases = tuple(phases)
  if not phases:
    raise ValueError("phases must hold at least one ResizePhase.")
  if phases[0].start_epoch != 0:
    raise ValueError(f"The first phase must start at epoch 0, got {phases[0]}.")
  for a, b in zip(phases, phases[1:]):
    if a.end_epoch != b.start_epoch:
      raise ValueError(f"Phases must be contiguous: {a} ends where {b} does not start.")
  for p in phases:
    if p.end_epoch <= p.start_epoch or p.image_size <= 0 or p.batch_size <= 0 or (
        p.resize_size is not None and p.resize_size <= 0):
      raise ValueError(f"Bad phase {p}: needs end_epoch > start_epoch and positive sizes.")


def progressive_resize_phase(epoch: float,
                             phases: Sequence[ResizePhase] = WONG_PHASES) -> ResizePhase:
  """The phase that epoch `epoch` (0-based, may be fractional) belongs to.

  Args:
    epoch: the current epoch, 0 <= epoch < phases[-1].end_epoch.
    phases: the schedule (default: Wong et al.'s).
  Returns:
    The `ResizePhase` with start_epoch <= epoch < end_epoch.
  """
  check_phases(phases)
  for phase in phases:
    if phase.start_epoch <= epoch < phase.end_epoch:
      return phase
  raise ValueError(
      f"epoch={epoch!r} lies outside the phases, which cover epochs "
      f"[0, {phases[-1].end_epoch}).")


def phase_steps_per_epoch(num_examples: int, phases: Sequence[ResizePhase] = WONG_PHASES, *,
                          process_count: int = 1) -> tuple[int, ...]:
  """Steps per epoch of each phase (drop_remainder), for `schedules.imagenet_wong`."""
  check_phases(phases)
  return tuple(pipeline.steps_per_epoch(num_examples, p.batch_size,
                                        process_count=process_count) for p in phases)


# ----------------------------------------------------------------------------- decoding


def decode_image(data: Any, *, min_size: int | None = None):
  """Encoded bytes (JPEG/PNG) or a uint8 array -> an RGB `PIL.Image`.

  Args:
    data: bytes, or an (H, W, C)/(H, W) uint8 array (already decoded records).
    min_size: when set, JPEG decoding may downscale by a power of two
      (`Image.draft`) as long as both sides stay >= min_size: several times
      faster for the 128-px phase, and the image is resized further anyway.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if isinstance(data, np.ndarray):
    array = data if data.ndim == 3 else data[..., None]
    if array.shape[-1] == 1:
      array = np.repeat(array, 3, axis=-1)
    return Image.fromarray(array.astype(np.uint8), "RGB")
  image = Image.open(io.BytesIO(bytes(data)))
  if min_size is not None and image.format == "JPEG":
    image.draft("RGB", (min_size, min_size))
  return image.convert("RGB")


def resize_shorter_side(image, size: int):
  """torchvision `Resize(size)`: shorter side to `size`, aspect kept, bilinear (antialiased)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  width, height = image.size
  if min(width, height) == size:
    return image
  if width <= height:
    new = (size, int(size * height / width))
  else:
    new = (int(size * width / height), size)
  return image.resize(new, Image.BILINEAR)


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator, *,
                            scale: tuple[float, float] = (0.08, 1.0),
                            ratio: tuple[float, float] = (3 / 4, 4 / 3)
                            ) -> tuple[int, int, int, int]:
  """torchvision `RandomResizedCrop.get_params`: (top, left, crop_height, crop_width).

  Ten tries at an area fraction ~ U[scale] and a log-uniform aspect ratio;
  if none fits, the largest centred crop with the ratio clamped to `ratio`.
  """
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def center_crop(image, size: int) -> np.ndarray:
  """torchvision `CenterCrop(size)` (zero-padded when the image is smaller) -> uint8."""
  width, height = image.size
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  # PIL fills the part of the box outside the image with zeros.
  return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)


def preprocess_train(data: Any, rng: np.random.Generator, *, image_size: int,
                     resize_size: int | None = None, flip: bool = True,
                     scale: tuple[float, float] = (0.08, 1.0),
                     ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """Decode, pre-resize (shorter side), random-resized-crop to `image_size`, flip.

  Returns:
    uint8 (image_size, image_size, 3).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = decode_image(data, min_size=resize_size)
  if resize_size is not None:
    image = resize_shorter_side(image, resize_size)
  width, height = image.size
  top, left, h, w = random_resized_crop_box(height, width, rng, scale=scale, ratio=ratio)
  image = image.resize((image_size, image_size), Image.BILINEAR,
                       box=(left, top, left + w, top + h))
  out = np.asarray(image, np.uint8)
  if flip and rng.random() < 0.5:
    out = out[:, ::-1]
  return np.ascontiguousarray(out)


def preprocess_eval(data: Any, *, image_size: int = EVAL_IMAGE_SIZE,
                    resize_size: int | None = None) -> np.ndarray:
  """Decode, optionally resize the shorter side, centre-crop `image_size` -> uint8."""
  image = decode_image(data, min_size=resize_size)
  if resize_size is not None:
    image = resize_shorter_side(image, resize_size)
  return center_crop(image, image_size)


# ----------------------------------------------------------------------------- loading


def imagenet_source(split: str, *, data_dir: str | None = None,
                    name: str = "imagenet2012") -> Sequence[dict[str, Any]]:
  """The prepared TFDS ImageNet split with images left JPEG-encoded (bytes).

  Raises `DatasetNotFoundError` (with how to prepare it) when it is missing.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds_source.data_source(name, split, data_dir=data_dir,
                                 decoders={"image": tfds.decode.SkipDecoding()})


def _example_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
  # The trailing 1 keeps these streams apart from epoch_permutation's [seed, epoch].
  return np.random.Generator(np.random.PCG64(np.random.SeedSequence(
      [int(seed), int(epoch), int(index), 1])))


def _stream(source, index_batches, make_job, num_threads: int, prefetch: int,
            image_key: str, label_key: str):
  """Yields decoded batches; up to `prefetch` later batches are decoding meanwhile.

  `index_batches` yields (indices, keep): the records `indices[keep]` are read
  (in this thread; ArrayRecord batches the reads) and decoded in the pool.
  """
  with concurrent.futures.ThreadPoolExecutor(max_workers=num_threads) as pool:
    pending = collections.deque()
    batches = iter(index_batches)

    def submit(indices, keep):
      chosen = indices[keep]
      records = tfds_source.read_records(source, chosen) if len(chosen) else []
      jobs = [pool.submit(make_job(record[image_key], int(i)))
              for record, i in zip(records, chosen)]
      labels = np.asarray([int(record[label_key]) for record in records], np.int32)
      return jobs, labels, keep

    def fill(size):
      while len(pending) < size:
        item = next(batches, None)
        if item is None:
          return
        pending.append(submit(*item))

    fill(1 + prefetch)
    while pending:
      jobs, labels, keep = pending.popleft()
      fill(prefetch)  # batches t+1..t+prefetch decode while batch t is consumed
      yield [job.result() for job in jobs], labels, keep


def train_batches(source: Sequence[dict[str, Any]], *, phase: ResizePhase, seed: int,
                  epoch: int, start_step: int = 0, num_threads: int = 16,
                  prefetch: int = 2, process_index: int = 0, process_count: int = 1,
                  flip: bool = True, image_key: str = "image",
                  label_key: str = "label") -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One epoch of ImageNet training batches for `phase`, resumable at any step.

  Args:
    source: random-access records (`imagenet_source("train")`, or any object
      with `__len__` and `__getitem__` returning {"image": bytes or array,
      "label": int}).
    phase: the `ResizePhase` (crop size, global batch size, pre-resize).
    seed: the run's seed.
    epoch: the epoch (>= 0); with `seed` it fixes the order and the crops.
    start_step: first step to yield, for an exact resume.
    num_threads: Pillow decoding threads.
    prefetch: batches decoded ahead.
    process_index: this host; it reads only its share of every global batch.
    process_count: the number of hosts.
    flip: random horizontal flips.
    image_key: record field of the image.
    label_key: record field of the label.
  Yields:
    (images uint8 (B/P, S, S, 3), labels int32 (B/P,)), S = phase.image_size.
  """
  pipeline._check_process(process_index, process_count)  # pylint: disable=protected-access
  num_steps = pipeline.steps_per_epoch(len(source), phase.batch_size,
                                       process_count=process_count)
  local_batch = phase.batch_size // process_count
  if isinstance(start_step, bool) or not isinstance(start_step, (int, np.integer)) or not (
      0 <= start_step <= num_steps):
    raise ValueError(f"start_step must lie in [0, {num_steps}], got {start_step!r}.")
  order = pipeline.shard_for_host(pipeline.epoch_permutation(len(source), seed, epoch),
                                  process_index, process_count, phase.batch_size)
  index_batches = ((order[s * local_batch:(s + 1) * local_batch], slice(None))
                   for s in range(start_step, num_steps))

  def make_job(data, index):
    return lambda: preprocess_train(data, _example_rng(seed, epoch, index),
                                    image_size=phase.image_size,
                                    resize_size=phase.resize_size, flip=flip)

  def batches():
    for images, labels, _ in _stream(source, index_batches, make_job, num_threads,
                                     prefetch, image_key, label_key):
      yield np.stack(images), labels

  return batches()  # a generator made here, so bad arguments raise at the call


def eval_batches(source: Sequence[dict[str, Any]], *, batch_size: int,
                 image_size: int = EVAL_IMAGE_SIZE, resize_size: int | None = None,
                 num_examples: int | None = None, num_threads: int = 16, prefetch: int = 2,
                 process_index: int = 0, process_count: int = 1, image_key: str = "image",
                 label_key: str = "label"
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """Validation batches in order, centre-cropped, the last padded (mask) to a fixed shape.

  Args:
    source: random-access records (`imagenet_source("validation")`).
    batch_size: the global batch size.
    image_size: the centre crop (Wong et al.: 288).
    resize_size: resize the shorter side first (None: crop the original, as
      Wong et al.'s phase-3 evaluation).
    num_examples: use only the first `num_examples` records (e.g. 1000 for the
      robust-accuracy subset).
    num_threads, prefetch, process_index, process_count, image_key, label_key:
      as in `train_batches`.
  Yields:
    (images uint8 (B/P, S, S, 3), labels int32, mask bool): padded rows are zeros.
  """
  n = len(source) if num_examples is None else min(int(num_examples), len(source))
  pipeline._check_process(process_index, process_count)  # pylint: disable=protected-access
  local_batch = pipeline._local_batch_size(batch_size, process_count)  # pylint: disable=protected-access
  num_steps = -(-n // batch_size)
  positions = pipeline.shard_for_host(np.arange(num_steps * batch_size), process_index,
                                      process_count, batch_size)

  def index_batches():
    for s in range(num_steps):
      pos = positions[s * local_batch:(s + 1) * local_batch]
      yield pos, pos < n

  def make_job(data, index):
    del index
    return lambda: preprocess_eval(data, image_size=image_size, resize_size=resize_size)

  def batches():
    for images, labels, mask in _stream(source, index_batches(), make_job, num_threads,
                                        prefetch, image_key, label_key):
      out = np.zeros((len(mask), image_size, image_size, 3), np.uint8)
      out_labels = np.zeros((len(mask),), np.int32)
      if images:
        out[mask] = np.stack(images)
        out_labels[mask] = labels
      yield out, out_labels, mask

  return batches()
