"""One process's view of a dataset: Grain pipelines over random-access sources.

The contract (determinism, resumption, sharding) is stated in the package
docstring, ``sparseopt_jax.training.input``.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import grain
import numpy as np

# Tags that keep the random streams derived from one seed apart.
TAG_ORDER = 0x0D1E_0001
TAG_AUGMENT = 0x0D1E_0002


class DataError(ValueError):
  """Dataset files are missing, unreadable or corrupt."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  image_shape: tuple[int, int, int]
  num_classes: int
  num_train: int  # global number of training examples (after train_subset)
  num_test: int  # global number of test examples


def rng(tag: int, *values: int) -> np.random.Generator:
  """A numpy generator seeded by ``(tag, *values)`` (any ints)."""
  return np.random.default_rng([tag] + [int(v) % 2**64 for v in values])


def check_batch_size(batch_size: int) -> int:
  if (
      isinstance(batch_size, bool)
      or int(batch_size) != batch_size
      or batch_size <= 0
  ):
    raise ValueError(
        f"batch_size must be a positive integer, got {batch_size!r}"
    )
  return int(batch_size)


# --------------------------------------------------------------------------
# sources and transforms (the two things a dataset plugs in)


class Source(Protocol):
  """Random access to the records of one split."""

  def __len__(self) -> int:
    ...

  def read(self, keys: np.ndarray) -> dict:
    """Records ``keys`` as ``{'image': ..., 'label': int [n]}``."""


class ArraySource:
  """A split held in memory: uint8 images [N, H, W, C] and labels [N]."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.labels)

  def read(self, keys: np.ndarray) -> dict:
    return {"image": self.images[keys], "label": self.labels[keys]}


class TrainTransform(Protocol):
  """Augmentation of a batch, its randomness drawn per *global* batch."""

  def draw(self, gen: np.random.Generator, n: int) -> tuple[np.ndarray, ...]:
    """Augmentation parameters of ``n`` examples (arrays with leading axis ``n``)."""

  def __call__(self, records: dict, params: tuple[np.ndarray, ...]) -> dict:
    """The float32 ``{'image', 'label'}`` batch of ``records`` under ``params``."""


EvalTransform = Callable[[dict], dict]


# --------------------------------------------------------------------------
# the order of the training examples


class EpochOrder(grain.MapDataset):
  """Record keys of the training stream, ``chunk`` keys per element.

  Element ``c`` of epoch ``e`` (index ``e * len(self) + c``, Grain's convention
  for indices past the length) is ``perm[c * chunk:(c + 1) * chunk]`` of the
  epoch's permutation ``perm`` of ``range(num_records)``, drawn from a numpy
  generator seeded with ``(seed, e)``; the ``num_records - len(self) * chunk``
  keys left over at its end are not used that epoch. A permutation is drawn in
  one vectorised call and kept while its epoch is read, so an element costs a
  slice. (``MapDataset.range(n).shuffle(seed).batch(b)`` computes each key in
  Python: 1.3-1.8 ms a batch of 128 keys on this project's CPU, more than the
  whole Fashion-MNIST batch costs with this order.)
  """

  def __init__(self, num_records: int, chunk: int, length: int, seed: int):
    super().__init__()
    if length * chunk > num_records:
      raise ValueError(
          f"{length} chunks of {chunk} need {length * chunk} records, there"
          f" are {num_records}"
      )
    self._num_records, self._chunk, self._length = num_records, chunk, length
    self._seed = seed
    self._perms: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()  # prefetch threads share the cache

  def __len__(self) -> int:
    return self._length

  def __str__(self) -> str:
    return f"EpochOrder(num_records={self._num_records}, chunk={self._chunk})"

  def permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      perm = self._perms.get(epoch)
      if perm is None:
        perm = rng(TAG_ORDER, self._seed, epoch).permutation(self._num_records)
        if len(self._perms) >= 2:  # the epoch being read and the next one
          del self._perms[min(self._perms)]
        self._perms[epoch] = perm
    return perm

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    epoch, c = divmod(index, self._length)
    return self.permutation(epoch)[c * self._chunk : (c + 1) * self._chunk]


# --------------------------------------------------------------------------
# the dataset


class Dataset:
  """A train/test image-classification dataset as seen by one process.

  Built from a random-access ``Source`` per split and the transforms of the
  dataset; ``train_dataset`` / ``eval_dataset`` are the Grain pipelines and
  ``train_batches`` / ``eval_batches`` iterate them with ``read_options``.
  """

  def __init__(
      self,
      info: DatasetInfo,
      *,
      train: Source,
      test: Source,
      train_transform: TrainTransform,
      eval_transform: EvalTransform,
      mean: Sequence[float],
      std: Sequence[float],
      shard: grain.sharding.ShardOptions,
      read_options: grain.ReadOptions,
  ):
    self.info = info
    self.train_source, self.test_source = train, test
    self._train_transform = train_transform
    self._eval_transform = eval_transform
    self.mean = tuple(float(m) for m in mean)  # per channel, [0, 1] units
    self.std = tuple(float(s) for s in std)
    self.process_index = shard.shard_index
    self.process_count = shard.shard_count
    self.read_options = read_options

  def __repr__(self) -> str:
    return (
        f"{type(self).__name__}({self.info}, process"
        f" {self.process_index}/{self.process_count})"
    )

  # -- training

  def steps_per_epoch(self, batch_size: int) -> int:
    """Training steps per epoch for a per-process ``batch_size``."""
    return self.info.num_train // (
        check_batch_size(batch_size) * self.process_count
    )

  def _check_train(self, batch_size: int) -> tuple[int, int]:
    batch_size = check_batch_size(batch_size)
    steps = self.steps_per_epoch(batch_size)
    if steps < 1:
      raise ValueError(
          f"{self.info.name}: per-process batch size {batch_size} x"
          f" {self.process_count} process(es) is larger than the training set"
          f" ({self.info.num_train} examples)"
      )
    return batch_size, steps

  def train_order(self, batch_size: int, *, seed: int) -> grain.MapDataset:
    """Record keys of this process's batch at each step (infinite)."""
    batch_size, steps = self._check_train(batch_size)
    p, n_proc = self.process_index, self.process_count
    # Global batch t is chunks t*P .. t*P+P-1 of the epoch's order; process p
    # takes the p-th: Grain's strided slice, the way it shards a MapDataset.
    order = EpochOrder(self.info.num_train, batch_size, steps * n_proc, seed)
    return order[p::n_proc].repeat()

  def train_dataset(self, batch_size: int, *, seed: int) -> grain.MapDataset:
    """Augmented training batches; element ``t`` is the batch of global step ``t``.

    Infinite, epochs back to back, and random access: ``[t]`` reads only the
    ``batch_size`` records of step ``t``.
    """
    batch_size, _ = self._check_train(batch_size)
    keys = self.train_order(batch_size, seed=seed)
    g = batch_size * self.process_count
    mine = slice(
        self.process_index * batch_size, (self.process_index + 1) * batch_size
    )
    transform = self._train_transform
    seed = int(seed)

    def augment(step, records):
      # Parameters are drawn for the whole *global* batch and sliced, so that
      # the processes' batches concatenate to the single-process global batch.
      params = transform.draw(rng(TAG_AUGMENT, seed, step), g)
      return transform(records, tuple(a[mine] for a in params))

    return keys.map(self.train_source.read).map_with_index(augment)

  def train_batches(
      self, batch_size: int, *, seed: int, start_step: int = 0
  ) -> Iterator[dict]:
    """Infinite stream of augmented training batches from global step ``start_step``.

    Resuming reads only the batches from ``start_step`` on (random access).
    """
    if int(start_step) != start_step or start_step < 0:
      raise ValueError(
          f"start_step must be a non-negative integer, got {start_step!r}"
      )
    ds = self.train_dataset(batch_size, seed=seed)[int(start_step) :]
    return iter(ds.to_iter_dataset(self.read_options))

  # -- evaluation

  def _eval_shard(self) -> tuple[int, int, int]:
    """This process's contiguous part [lo, hi) of the test split, and the largest part."""
    n = self.info.num_test
    shard = -(-n // self.process_count)
    lo = min(n, self.process_index * shard)
    return lo, min(n, lo + shard), shard

  def num_eval_batches(self, batch_size: int) -> int:
    """Number of batches ``eval_batches`` yields (equal on every process)."""
    return -(-self._eval_shard()[2] // check_batch_size(batch_size))

  def eval_dataset(self, batch_size: int) -> grain.MapDataset:
    """This process's padded evaluation batches, ``num_eval_batches`` of them."""
    batch_size = check_batch_size(batch_size)
    n_batches = self.num_eval_batches(batch_size)
    lo, hi, _ = self._eval_shard()
    image_shape = self.info.image_shape

    def keys(b):
      return np.arange(
          min(hi, lo + b * batch_size), min(hi, lo + (b + 1) * batch_size)
      )

    def pad(records):
      n = len(records["label"])
      if n == batch_size:
        return {**self._eval_transform(records), "mask": np.ones(n, np.float32)}
      out = {
          "image": np.zeros((batch_size,) + image_shape, np.float32),
          "label": np.zeros((batch_size,), np.int32),
          "mask": np.zeros((batch_size,), np.float32),
      }
      if n:
        batch = self._eval_transform(records)
        out["image"][:n] = batch["image"]
        out["label"][:n] = batch["label"]
        out["mask"][:n] = 1.0
      return out

    return (
        grain.MapDataset.range(n_batches)
        .map(keys)
        .map(self.test_source.read)
        .map(pad)
    )

  def eval_batches(self, batch_size: int) -> Iterator[dict]:
    """One pass over this process's shard of the test split (padded + masked)."""
    ds = self.eval_dataset(batch_size)
    return iter(ds.to_iter_dataset(self.read_options))
