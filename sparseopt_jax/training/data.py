"""Input pipelines for image classification (kept apart from training logic).

The pipelines yield *host* numpy batches; the trainer shards them over its
local devices itself.  Every batch is a dict::

    {'image': float32 [B, H, W, C], normalised with the dataset's per-channel
              mean / std,
     'label': int32 [B]}

and evaluation batches additionally carry ``'mask'`` (float32 [B], 1.0 for
real examples, 0.0 for padding rows), so that every evaluation batch has the
same shape and a jitted eval step never retraces.

``batch_size`` is always the *per-process* batch size (the trainer passes
``global_batch // process_count``).

Datasets
--------
* ``fashion_mnist`` -- read from the IDX ``.gz`` files (``data_dir`` if given,
  else ``/usr/share/datasets/fashion-mnist`` from Debian's
  ``dataset-fashion-mnist`` package, else ``tfds.load('fashion_mnist')``; the
  TFDS data directory can then be chosen with ``$TFDS_DATA_DIR``), held in
  memory as uint8 and augmented in numpy (2-pixel zero-pad random crop +
  horizontal flip).
* ``cifar10`` / ``cifar100`` -- TFDS + tf.data (4-pixel zero-pad random 32x32
  crop + horizontal flip; test: normalise only).  ``data_dir`` is the TFDS
  data directory.
* ``imagenet2012`` -- TFDS + tf.data (Inception-style random resized crop,
  area 0.08-1, aspect 3/4-4/3, to 224 + flip; eval: shorter side to 256,
  centre crop 224).  The TFDS dataset must already be prepared (the raw tars
  are a manual download).

Determinism and resumption
--------------------------
Training is an infinite stream of epochs; the last partial batch of each epoch
is dropped, so ``steps_per_epoch(b)`` batches make one epoch.

* In-memory datasets (fashion_mnist): the order of the examples of epoch ``e``
  is the permutation drawn from a numpy ``Generator`` seeded with
  ``(seed, e)``, and the augmentation of the batch of global step ``t`` is drawn
  from a generator seeded with ``(seed, t)``.  Hence
  ``train_batches(b, seed=s, start_step=k)`` yields exactly (bit for bit) the
  batches ``train_batches(b, seed=s)`` yields from its k-th on.
* TFDS datasets: each epoch is a fresh tf.data pipeline whose file order and
  shuffle buffer are seeded from ``(seed, epoch)`` and run with
  ``deterministic=True``; the augmentation of each example uses stateless TF
  random ops seeded from ``(seed, global step, position in batch, process)``.
  ``start_step=k`` rebuilds the pipeline of epoch ``k // steps_per_epoch`` and
  ``skip``s the first ``k % steps_per_epoch`` batches of it (encoded records are
  skipped before decoding, but they are still read, so resuming late in an
  ImageNet epoch takes a while).  This reproduces the uninterrupted stream as
  long as the prepared TFDS files and the tf/tfds versions are unchanged.
  CIFAR keeps the decoded training split in a tf.data memory cache and
  shuffles the whole (per-process) split each epoch; ImageNet shuffles files
  plus a 10 000-record buffer of encoded JPEGs.

Multi-process sharding
----------------------
``process_index`` / ``process_count`` default to ``jax.process_index()`` /
``jax.process_count()``.

* In-memory datasets: with ``G = batch_size * process_count``, global step
  ``t`` uses the examples ``perm[k*G:(k+1)*G]`` of the epoch's *global*
  permutation (``k`` = step within epoch) and process ``p`` takes the slice
  ``[p*batch_size:(p+1)*batch_size]`` of them, *and* the matching slice of the
  augmentation parameters drawn for the whole global batch.  Guarantee: for
  every step, concatenating the batches of processes ``0..P-1`` (each with
  ``batch_size=b``) gives exactly the batch of a single process with
  ``batch_size=P*b`` (same seed) -- images bit for bit, labels equal.
* TFDS datasets: each process reads its own contiguous part of the split
  (``tfds.even_splits``; training drops the remainder so every process has the
  same number of steps) and shuffles it independently; the processes' batches
  are disjoint, but the global batch is not that of a single-process run.
* Evaluation: process ``p`` evaluates its own contiguous shard of the test
  split (at most ``ceil(num_test / P)`` examples) and every process yields the
  same number of batches, ``num_eval_batches(batch_size)``, padding with
  masked rows; over all processes each test example appears exactly once with
  mask 1.
"""

from __future__ import annotations

import abc
import dataclasses
import gzip
import math
import os
import zlib
from collections.abc import Iterator

import numpy as np

__all__ = [
    "DataError",
    "Dataset",
    "DatasetInfo",
    "FASHION_MNIST_DIR",
    "KNOWN_DATASETS",
    "load",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
KNOWN_DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagenet2012")

_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_FMNIST_HINT = (
    "install the data with `apt-get install dataset-fashion-mnist` (files land"
    f" in {FASHION_MNIST_DIR}) or point `--data-dir` (data_dir=) at a directory"
    " holding train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz,"
    " t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz"
)

# Tags that keep the different random streams derived from one seed apart.
_TAG_ORDER = 0x0D1E_0001
_TAG_AUGMENT = 0x0D1E_0002


class DataError(ValueError):
  """Dataset files are missing, unreadable or corrupt."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  image_shape: tuple[int, int, int]
  num_classes: int
  num_train: int  # global number of training examples (after train_subset)
  num_test: int  # global number of test examples


# --------------------------------------------------------------------------
# helpers


def _seed_int(*values: int) -> int:
  """A 63-bit non-negative integer derived from ``values`` (any ints)."""
  ss = np.random.SeedSequence([int(v) % 2**64 for v in values])
  return int(ss.generate_state(1, np.uint64)[0] >> np.uint64(1))


def _rng(tag: int, *values: int) -> np.random.Generator:
  return np.random.default_rng([tag] + [int(v) % 2**64 for v in values])


def _check_batch_size(batch_size: int) -> int:
  if (
      isinstance(batch_size, bool)
      or int(batch_size) != batch_size
      or batch_size <= 0
  ):
    raise ValueError(
        f"batch_size must be a positive integer, got {batch_size!r}"
    )
  return int(batch_size)


def _resolve_process(
    process_index: int | None, process_count: int | None
) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # only needed for the defaults

    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
  process_index, process_count = int(process_index), int(process_count)
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
        "need 0 <= process_index < process_count, got"
        f" process_index={process_index}, process_count={process_count}"
    )
  return process_index, process_count


def _pixel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean / std of uint8 NHWC images, in [0, 1] units (exact, low memory)."""
  values = np.arange(256, dtype=np.float64)
  means, stds = [], []
  flat = images.reshape(-1, images.shape[-1])
  chunk = 1 << 20  # bincount converts to intp: bound the temporary
  for c in range(images.shape[-1]):
    counts = np.zeros(256, np.float64)
    for lo in range(0, flat.shape[0], chunk):
      counts += np.bincount(flat[lo : lo + chunk, c], minlength=256)
    n = counts.sum()
    mean = (counts * values).sum() / n
    var = (counts * values**2).sum() / n - mean**2
    means.append(mean / 255.0)
    stds.append(math.sqrt(max(var, 0.0)) / 255.0)
  return np.asarray(means), np.asarray(stds)


# --------------------------------------------------------------------------
# public API


class Dataset(abc.ABC):
  """A train/test image-classification dataset as seen by one process."""

  info: DatasetInfo
  process_index: int
  process_count: int
  mean: tuple[float, ...]  # per-channel, in [0, 1] pixel units
  std: tuple[float, ...]

  @abc.abstractmethod
  def steps_per_epoch(self, batch_size: int) -> int:
    """Training steps per epoch for a per-process ``batch_size``."""

  @abc.abstractmethod
  def train_batches(
      self, batch_size: int, *, seed: int, start_step: int = 0
  ) -> Iterator[dict]:
    """Infinite stream of augmented training batches, epochs back to back."""

  @abc.abstractmethod
  def eval_batches(self, batch_size: int) -> Iterator[dict]:
    """One pass over this process's shard of the test split (padded + masked)."""

  @abc.abstractmethod
  def num_eval_batches(self, batch_size: int) -> int:
    """Number of batches ``eval_batches`` yields (equal on every process)."""

  def _check_train_args(
      self, batch_size: int, start_step: int
  ) -> tuple[int, int]:
    batch_size = _check_batch_size(batch_size)
    steps = self.steps_per_epoch(batch_size)
    if steps < 1:
      raise ValueError(
          f"{self.info.name}: per-process batch size {batch_size} x"
          f" {self.process_count} process(es) is larger than the training set"
          f" ({self.info.num_train} examples)"
      )
    if int(start_step) != start_step or start_step < 0:
      raise ValueError(
          f"start_step must be a non-negative integer, got {start_step!r}"
      )
    return batch_size, steps

  def __repr__(self) -> str:
    return (
        f"{type(self).__name__}({self.info}, process"
        f" {self.process_index}/{self.process_count})"
    )


def load(
    name: str,
    *,
    data_dir: str | None = None,
    train_subset: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Dataset:
  """Loads dataset ``name`` for this process.

  Args:
    name: one of ``KNOWN_DATASETS``.
    data_dir: for ``fashion_mnist`` the directory holding the IDX files; for the
      TFDS datasets the TFDS data directory.
    train_subset: use only the first ``train_subset`` training examples.
    process_index, process_count: default to ``jax.process_index()`` /
      ``jax.process_count()``.

  Raises:
    ValueError: unknown ``name`` or bad arguments.
    DataError: data missing or corrupt.
  """
  if name not in KNOWN_DATASETS:
    raise ValueError(
        f"unknown dataset {name!r}; known datasets: {', '.join(KNOWN_DATASETS)}"
    )
  if train_subset is not None:
    if (
        isinstance(train_subset, bool)
        or int(train_subset) != train_subset
        or train_subset < 1
    ):
      raise ValueError(
          f"train_subset must be a positive integer, got {train_subset!r}"
      )
    train_subset = int(train_subset)
  process_index, process_count = _resolve_process(process_index, process_count)
  if name == "fashion_mnist":
    return _load_fashion_mnist(
        data_dir, train_subset, process_index, process_count
    )
  return _TFDSDataset(
      _TFDS_SPECS[name],
      data_dir=data_dir,
      train_subset=train_subset,
      process_index=process_index,
      process_count=process_count,
  )


# --------------------------------------------------------------------------
# in-memory datasets (numpy)


def _crop_flip(
    images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int
) -> np.ndarray:
  """Zero-pads by ``pad``, crops back to HxW at ``offsets`` [B, 2] (y, x), flips where ``flips``."""
  b, h, w, _ = images.shape
  padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  rows = offsets[:, 0, None] + np.arange(h)  # [B, H]
  cols = offsets[:, 1, None] + np.arange(w)  # [B, W]
  cols = np.where(flips[:, None], cols[:, ::-1], cols)  # crop, then mirror
  return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]


class _ArrayDataset(Dataset):
  """A dataset held in memory as uint8 NHWC arrays; augmentation in numpy."""

  def __init__(
      self,
      info: DatasetInfo,
      train: tuple[np.ndarray, np.ndarray],
      test: tuple[np.ndarray, np.ndarray],
      *,
      mean: np.ndarray,
      std: np.ndarray,
      crop_pad: int,
      process_index: int,
      process_count: int,
  ):
    self.info = info
    self._train_images, self._train_labels = train
    self._test_images, self._test_labels = test
    self.mean = tuple(float(m) for m in mean)
    self.std = tuple(float(s) for s in std)
    self._scale = (1.0 / (255.0 * np.asarray(std))).astype(np.float32)
    self._shift = (-np.asarray(mean) / np.asarray(std)).astype(np.float32)
    self._crop_pad = crop_pad
    self.process_index = process_index
    self.process_count = process_count

  def _normalize(self, images: np.ndarray) -> np.ndarray:
    out = images.astype(np.float32)
    out *= self._scale
    out += self._shift
    return out

  def steps_per_epoch(self, batch_size: int) -> int:
    return self.info.num_train // (
        _check_batch_size(batch_size) * self.process_count
    )

  def _epoch_order(self, seed: int, epoch: int) -> np.ndarray:
    """Global order of the training examples in ``epoch`` (same on all processes)."""
    return _rng(_TAG_ORDER, seed, epoch).permutation(self.info.num_train)

  def _step_indices(
      self, batch_size: int, seed: int, step: int, order=None
  ) -> np.ndarray:
    """Indices of this process's training examples at global ``step``."""
    steps = self.steps_per_epoch(batch_size)
    epoch, k = divmod(step, steps)
    if order is None:
      order = self._epoch_order(seed, epoch)
    g = batch_size * self.process_count
    lo = k * g + self.process_index * batch_size
    return order[lo : lo + batch_size]

  def train_batches(
      self, batch_size: int, *, seed: int, start_step: int = 0
  ) -> Iterator[dict]:
    batch_size, steps = self._check_train_args(batch_size, start_step)
    return self._train_iter(batch_size, steps, int(seed), int(start_step))

  def _train_iter(self, batch_size, steps, seed, step):
    g = batch_size * self.process_count
    mine = slice(
        self.process_index * batch_size, (self.process_index + 1) * batch_size
    )
    n_offsets = 2 * self._crop_pad + 1
    epoch, order = None, None
    while True:
      if step // steps != epoch:
        epoch = step // steps
        order = self._epoch_order(seed, epoch)
      idx = self._step_indices(batch_size, seed, step, order)
      # Augmentation parameters are drawn for the whole *global* batch and
      # sliced, so that the processes' batches concatenate to the
      # single-process global batch.
      rng = _rng(_TAG_AUGMENT, seed, step)
      offsets = rng.integers(0, n_offsets, size=(g, 2))[mine]
      flips = (rng.random(g) < 0.5)[mine]
      images = _crop_flip(
          self._train_images[idx], offsets, flips, self._crop_pad
      )
      yield {
          "image": self._normalize(images),
          "label": self._train_labels[idx].astype(np.int32),
      }
      step += 1

  def _eval_shard(self) -> tuple[int, int, int]:
    n = self.info.num_test
    shard = -(-n // self.process_count)
    lo = min(n, self.process_index * shard)
    hi = min(n, lo + shard)
    return lo, hi, shard

  def num_eval_batches(self, batch_size: int) -> int:
    return -(-self._eval_shard()[2] // _check_batch_size(batch_size))

  def eval_batches(self, batch_size: int) -> Iterator[dict]:
    batch_size = _check_batch_size(batch_size)
    return self._eval_iter(batch_size)

  def _eval_iter(self, batch_size):
    lo, hi, _ = self._eval_shard()
    for b in range(self.num_eval_batches(batch_size)):
      start = min(hi, lo + b * batch_size)
      stop = min(hi, start + batch_size)
      n = stop - start
      image = np.zeros((batch_size,) + self.info.image_shape, np.float32)
      label = np.zeros((batch_size,), np.int32)
      mask = np.zeros((batch_size,), np.float32)
      image[:n] = self._normalize(self._test_images[start:stop])
      label[:n] = self._test_labels[start:stop]
      mask[:n] = 1.0
      yield {"image": image, "label": label, "mask": mask}


# --------------------------------------------------------------------------
# Fashion-MNIST from IDX files


def _find_idx_file(directory: str, base: str) -> str:
  for candidate in (base + ".gz", base):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  raise DataError(
      f"Fashion-MNIST file not found: {os.path.join(directory, base + '.gz')};"
      f" {_FMNIST_HINT}"
  )


def _read_idx(path: str, ndim: int, tail_dims: tuple[int, ...]) -> np.ndarray:
  """Reads and validates an unsigned-byte IDX file (gzip-compressed if ``*.gz``)."""
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        raw = f.read()
    else:
      with open(path, "rb") as f:
        raw = f.read()
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    raise DataError(
        f"{path}: corrupt gzip file ({type(e).__name__}: {e}); re-download it"
        f" or {_FMNIST_HINT}"
    ) from e
  except OSError as e:
    raise DataError(f"{path}: cannot read file ({e})") from e

  kind = {1: "idx1-ubyte label", 3: "idx3-ubyte image"}.get(
      ndim, f"idx{ndim}-ubyte"
  )
  if len(raw) < 4:
    raise DataError(
        f"{path}: truncated: {len(raw)} bytes, too short for an IDX header"
    )
  magic = int.from_bytes(raw[:4], "big")
  expected_magic = 0x0800 | ndim
  if magic != expected_magic:
    raise DataError(
        f"{path}: wrong IDX magic number 0x{magic:08X}, expected"
        f" 0x{expected_magic:08X} for a {kind} file (wrong file, or not an IDX"
        " file)"
    )
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(
        f"{path}: truncated: {len(raw)} bytes, the IDX header alone needs"
        f" {header}"
    )
  dims = tuple(
      int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
  )
  if dims[1:] != tuple(tail_dims) or dims[0] == 0:
    want = (
        "(N>0, " + ", ".join(map(str, tail_dims)) + ")"
        if tail_dims
        else "(N>0,)"
    )
    raise DataError(
        f"{path}: wrong dimensions {dims} in the IDX header, expected {want}"
    )
  expected = math.prod(dims)
  got = len(raw) - header
  if got < expected:
    raise DataError(
        f"{path}: truncated: header announces {dims} = {expected} bytes of"
        f" data, but only {got} are present"
    )
  if got > expected:
    raise DataError(
        f"{path}: {got - expected} unexpected trailing bytes after the"
        f" {expected} bytes announced by the header {dims}"
    )
  return np.frombuffer(
      raw, dtype=np.uint8, count=expected, offset=header
  ).reshape(dims)


def _read_fashion_mnist_split(
    directory: str, split: str
) -> tuple[np.ndarray, np.ndarray]:
  image_base, label_base = _FMNIST_FILES[split]
  image_path = _find_idx_file(directory, image_base)
  label_path = _find_idx_file(directory, label_base)
  images = _read_idx(image_path, 3, (28, 28))
  labels = _read_idx(label_path, 1, ())
  if labels.shape[0] != images.shape[0]:
    raise DataError(
        f"{label_path}: has {labels.shape[0]} labels but {image_path} has "
        f"{images.shape[0]} images"
    )
  bad = np.flatnonzero(labels > 9)
  if bad.size:
    raise DataError(
        f"{label_path}: label {int(labels[bad[0]])} at index {int(bad[0])} is"
        f" outside 0..9 ({bad.size} bad label(s))"
    )
  return images[..., None], labels


def _fashion_mnist_from_tfds() -> (
    tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
):
  tfds = _import_tfds()
  out = []
  for split in ("train", "test"):
    # (batch_size=-1 / get_single_element aborts inside TF under
    # tfds.testing.mock_data, so batch explicitly.)
    ds = tfds.load("fashion_mnist", split=split, shuffle_files=False).batch(
        10_000
    )
    chunks = list(tfds.as_numpy(ds))
    images = np.concatenate([c["image"] for c in chunks]).astype(np.uint8)
    if images.ndim == 3:
      images = images[..., None]
    labels = np.concatenate([c["label"] for c in chunks]).astype(np.uint8)
    out.append((images, labels))
  return out[0], out[1]


def _load_fashion_mnist(
    data_dir, train_subset, process_index, process_count
) -> Dataset:
  if data_dir is not None:
    if not os.path.isdir(data_dir):
      raise DataError(
          f"Fashion-MNIST data directory not found: {data_dir}; {_FMNIST_HINT}"
      )
    train = _read_fashion_mnist_split(data_dir, "train")
    test = _read_fashion_mnist_split(data_dir, "test")
  elif os.path.isdir(FASHION_MNIST_DIR):
    train = _read_fashion_mnist_split(FASHION_MNIST_DIR, "train")
    test = _read_fashion_mnist_split(FASHION_MNIST_DIR, "test")
  else:
    try:
      train, test = _fashion_mnist_from_tfds()
    except Exception as e:  # no network, tfds missing, ...
      raise DataError(
          f"Fashion-MNIST not found: {FASHION_MNIST_DIR} does not exist and"
          f" tfds.load('fashion_mnist') failed ({type(e).__name__}: {e});"
          f" {_FMNIST_HINT}"
      ) from e
  # Normalisation statistics of the full training split (independent of
  # train_subset and of the process).
  mean, std = _pixel_stats(train[0])
  if train_subset is not None:
    if train_subset > train[0].shape[0]:
      raise ValueError(
          f"train_subset={train_subset} exceeds the {train[0].shape[0]}"
          " training examples"
      )
    train = (train[0][:train_subset], train[1][:train_subset])
  info = DatasetInfo(
      name="fashion_mnist",
      image_shape=tuple(int(d) for d in train[0].shape[1:]),
      num_classes=10,
      num_train=int(train[0].shape[0]),
      num_test=int(test[0].shape[0]),
  )
  return _ArrayDataset(
      info,
      train,
      test,
      mean=mean,
      std=std,
      crop_pad=2,
      process_index=process_index,
      process_count=process_count,
  )


# --------------------------------------------------------------------------
# TFDS datasets (tf.data)

_TF = None


def _import_tf():
  """Imports tensorflow once, hiding GPUs from it (JAX owns the accelerators)."""
  global _TF
  if _TF is None:
    import tensorflow as tf

    try:
      tf.config.set_visible_devices([], "GPU")
    except (RuntimeError, ValueError):  # already initialised / no GPU support
      pass
    _TF = tf
  return _TF


def _import_tfds():
  _import_tf()
  import tensorflow_datasets as tfds

  return tfds


@dataclasses.dataclass(frozen=True)
class _TFDSSpec:
  name: str
  test_split: str
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  imagenet: bool = (
      False  # JPEG pipeline (random resized crop) vs small-image pipeline
  )
  crop_pad: int = 4
  image_size: int = 224  # imagenet only
  resize_size: int = 256  # imagenet eval only
  shuffle_buffer: int = (
      10_000  # imagenet only (encoded records); small datasets: whole split
  )


_TFDS_SPECS = {
    "cifar10": _TFDSSpec(
        "cifar10",
        "test",
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": _TFDSSpec(
        "cifar100",
        "test",
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
    "imagenet2012": _TFDSSpec(
        "imagenet2012",
        "validation",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        imagenet=True,
    ),
}


class _TFDSDataset(Dataset):
  """A TFDS dataset read with tf.data, one even split of it per process."""

  def __init__(
      self,
      spec: _TFDSSpec,
      *,
      data_dir,
      train_subset,
      process_index,
      process_count,
  ):
    tf = _import_tf()
    tfds = _import_tfds()
    self._tf, self._tfds, self._spec = tf, tfds, spec
    self.process_index, self.process_count = process_index, process_count
    self.mean, self.std = tuple(spec.mean), tuple(spec.std)
    self._builder = tfds.builder(spec.name, data_dir=data_dir)
    try:
      self._builder.download_and_prepare()
    except Exception as e:
      raise DataError(
          f"TFDS dataset {spec.name!r} is not available in"
          f" {self._builder.data_dir} and could not be prepared"
          f" ({type(e).__name__}: {e}); prepare it first (e.g. `tfds build"
          f" {spec.name} --data_dir=...`, ImageNet needs the manual download)"
          " and pass its data directory as data_dir"
      ) from e

    self._options = tf.data.Options()
    self._options.deterministic = True
    self._options.threading.max_intra_op_parallelism = 1

    if train_subset is not None and train_subset > (
        full_train := self._num_examples("train")
    ):
      raise ValueError(
          f"train_subset={train_subset} exceeds the {full_train} training"
          f" examples of {spec.name}"
      )
    train_split = "train" if train_subset is None else f"train[:{train_subset}]"
    self._train_split = tfds.even_splits(
        train_split, n=process_count, drop_remainder=True
    )[process_index]
    self._test_split = tfds.even_splits(spec.test_split, n=process_count)[
        process_index
    ]
    self._num_train_local = self._num_examples(self._train_split)
    self._num_test_local = self._num_examples(self._test_split)

    features = self._builder.info.features
    if spec.imagenet:
      image_shape = (spec.image_size, spec.image_size, 3)
    else:
      image_shape = tuple(int(d) for d in features["image"].shape)
    self.info = DatasetInfo(
        name=spec.name,
        image_shape=image_shape,
        num_classes=int(features["label"].num_classes),
        num_train=self._num_examples(train_split),
        num_test=self._num_examples(spec.test_split),
    )
    self._cached_train = None
    self._mean_t = tf.constant(spec.mean, tf.float32)
    self._std_t = tf.constant(spec.std, tf.float32)

  # -- reading

  def _as_dataset(self, split, *, shuffle_seed: int | None = None):
    tfds = self._tfds
    read_config = tfds.ReadConfig(
        options=self._options, shuffle_seed=shuffle_seed, try_autocache=False
    )
    decoders = (
        {"image": tfds.decode.SkipDecoding()} if self._spec.imagenet else None
    )
    return self._builder.as_dataset(
        split=split,
        shuffle_files=shuffle_seed is not None,
        read_config=read_config,
        decoders=decoders,
    )

  def _num_examples(self, split) -> int:
    n = int(self._as_dataset(split).cardinality())
    if n < 0:  # unknown cardinality: fall back on the metadata
      n = int(self._builder.info.splits[split].num_examples)
    return n

  # -- preprocessing (per example, inside tf.data)

  def _normalize(self, image):
    tf = self._tf
    return (tf.cast(image, tf.float32) / 255.0 - self._mean_t) / self._std_t

  def _train_preprocess(self, image, seed):
    tf = self._tf
    seeds = tf.random.experimental.stateless_split(seed, 2)
    crop_seed, flip_seed = seeds[0], seeds[1]
    if self._spec.imagenet:
      size = self._spec.image_size
      shape = tf.io.extract_jpeg_shape(image)
      whole = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4])
      begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
          shape,
          bounding_boxes=whole,
          seed=crop_seed,
          min_object_covered=0.1,
          aspect_ratio_range=(3.0 / 4.0, 4.0 / 3.0),
          area_range=(0.08, 1.0),
          max_attempts=10,
          use_image_if_no_bounding_boxes=True,
      )  # falls back to the whole image if no valid box was found
      window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])
      image = tf.io.decode_and_crop_jpeg(image, window, channels=3)
      image = tf.image.resize(
          image, [size, size], method="bilinear", antialias=True
      )
    else:
      pad = self._spec.crop_pad
      shape = self.info.image_shape
      image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
      image = tf.image.stateless_random_crop(image, shape, seed=crop_seed)
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return self._normalize(image)

  def _eval_preprocess(self, image):
    tf = self._tf
    if self._spec.imagenet:
      size, resize = self._spec.image_size, self._spec.resize_size
      image = tf.io.decode_jpeg(image, channels=3)
      hw = tf.cast(tf.shape(image)[:2], tf.float32)
      new_hw = tf.cast(
          tf.math.round(hw * (resize / tf.reduce_min(hw))), tf.int32
      )
      new_hw = tf.maximum(new_hw, resize)
      image = tf.image.resize(image, new_hw, method="bilinear", antialias=True)
      top = (new_hw[0] - size) // 2
      left = (new_hw[1] - size) // 2
      image = image[top : top + size, left : left + size]
      image = tf.ensure_shape(image, (size, size, 3))
    return self._normalize(image)

  # -- training

  def steps_per_epoch(self, batch_size: int) -> int:
    return self._num_train_local // _check_batch_size(batch_size)

  def train_batches(
      self, batch_size: int, *, seed: int, start_step: int = 0
  ) -> Iterator[dict]:
    batch_size, steps = self._check_train_args(batch_size, start_step)
    return self._train_iter(batch_size, steps, int(seed), int(start_step))

  def _train_iter(self, batch_size, steps, seed, start_step):
    epoch, skip = divmod(start_step, steps)
    while True:
      ds = self._train_epoch(batch_size, steps, seed, epoch, skip)
      yield from self._tfds.as_numpy(ds)
      epoch, skip = epoch + 1, 0

  def _train_epoch(self, batch_size, steps, seed, epoch, skip_steps):
    tf = self._tf
    epoch_seed = _seed_int(_TAG_ORDER, seed, epoch)
    if self._spec.imagenet:
      ds = self._as_dataset(self._train_split, shuffle_seed=epoch_seed)
      ds = ds.shuffle(
          self._spec.shuffle_buffer,
          seed=epoch_seed,
          reshuffle_each_iteration=False,
      )
    else:
      if self._cached_train is None:
        self._cached_train = (
            self._as_dataset(self._train_split)
            .map(lambda ex: {"image": ex["image"], "label": ex["label"]})
            .cache()
        )
      ds = self._cached_train.shuffle(
          self._num_train_local, seed=epoch_seed, reshuffle_each_iteration=False
      )
    ds = ds.take(steps * batch_size).enumerate().skip(skip_steps * batch_size)

    aug_key = tf.constant(_seed_int(_TAG_AUGMENT, seed), tf.int64)
    first_step = epoch * steps
    p, n_proc = self.process_index, self.process_count

    def prepare(i, ex):
      step = first_step + i // batch_size
      uid = (
          step * n_proc + p
      ) * batch_size + i % batch_size  # unique per example
      image = self._train_preprocess(ex["image"], tf.stack([aug_key, uid]))
      return {"image": image, "label": tf.cast(ex["label"], tf.int32)}

    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(self._options)

  # -- evaluation

  def num_eval_batches(self, batch_size: int) -> int:
    per_process = max(
        -(-self.info.num_test // self.process_count), self._num_test_local
    )
    return -(-per_process // _check_batch_size(batch_size))

  def eval_batches(self, batch_size: int) -> Iterator[dict]:
    tf = self._tf
    batch_size = _check_batch_size(batch_size)
    n_batches = self.num_eval_batches(batch_size)
    ds = self._as_dataset(self._test_split).map(
        lambda ex: {
            "image": self._eval_preprocess(ex["image"]),
            "label": tf.cast(ex["label"], tf.int32),
            "mask": tf.constant(1.0, tf.float32),
        },
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    padding = tf.data.Dataset.from_tensors({
        "image": tf.zeros(self.info.image_shape, tf.float32),
        "label": tf.constant(0, tf.int32),
        "mask": tf.constant(0.0, tf.float32),
    }).repeat()
    ds = ds.concatenate(padding).take(n_batches * batch_size)
    ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return iter(self._tfds.as_numpy(ds.with_options(self._options)))
