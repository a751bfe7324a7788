"""Input pipelines for image classification on Grain (kept apart from training logic).

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

Modules: ``dataset`` (``Dataset`` and its Grain pipelines, the epoch order),
``transforms`` (augmentation, normalisation, JPEG decoding), ``idx``
(Fashion-MNIST's IDX files), ``tfds_sources`` (TFDS data sources).

Datasets
--------
* ``fashion_mnist`` -- read from the IDX ``.gz`` files (``data_dir`` if given,
  else ``/usr/share/datasets/fashion-mnist`` from Debian's
  ``dataset-fashion-mnist`` package, else TFDS's ``fashion_mnist`` data
  source), held in memory as uint8 and augmented in numpy (2-pixel zero-pad
  random crop + horizontal flip).
* ``cifar10`` / ``cifar100`` -- TFDS data sources (array_record), decoded into
  memory when loaded (4-pixel zero-pad random 32x32 crop + horizontal flip;
  test: normalise only).  ``data_dir`` is the TFDS data directory.
* ``imagenet2012`` -- a TFDS data source streamed by key, JPEGs decoded with
  PIL in Grain's prefetch threads (Inception-style random resized crop, area
  0.08-1, aspect 3/4-4/3, to 224 + flip; eval: shorter side to 256, centre
  crop 224).  The dataset must already be prepared as array_record (the raw
  tars are a manual download).

Pipelines
---------
Training, for ``N`` examples, a per-process batch ``b``, process ``p`` of
``P`` and global batch ``G = b * P``, is the Grain ``MapDataset``::

    EpochOrder(N, chunk=b, length=steps_per_epoch * P, seed)  # record keys
        [p::P].repeat()            # this process's chunk of each global batch
        .map(source.read)          # its b records
        .map_with_index(augment)   # parameters drawn for G from (seed, step)

``Dataset.train_dataset(b, seed=s)`` returns it: element ``t`` is the batch of
global step ``t``, computed by random access.  ``train_batches(b, seed=s,
start_step=k)`` iterates ``train_dataset(b, seed=s)[k:]`` as a Grain
iterator: with prefetch threads for streamed JPEGs, without for data in memory
(its numpy batch takes under a millisecond, which JAX's asynchronous dispatch
overlaps with the device step).  Evaluation is
``MapDataset.range(num_eval_batches)`` mapped to the keys, the records and the
padded, normalised batch.

Determinism and resumption
--------------------------
Training is an infinite stream of epochs; the last partial global batch of
each epoch is dropped, so ``steps_per_epoch(b)`` batches make one epoch.

* The order of the examples of epoch ``e`` is the permutation drawn from a
  numpy ``Generator`` seeded with ``(seed, e)``, and the augmentation of the
  batch of global step ``t`` is drawn from a generator seeded with ``(seed,
  t)``.  Hence ``train_batches(b, seed=s, start_step=k)`` yields exactly (bit
  for bit) the batches ``train_batches(b, seed=s)`` yields from its k-th on,
  for every dataset (for ImageNet, with the same PIL).
* Resuming at step ``k`` reads the records of step ``k`` and later only: batch
  ``k`` is computed directly, nothing before it is read or skipped.
* The loader's position is recomputed from the training step, not saved as
  Grain iterator state: the step is in every checkpoint already and the stream
  is a pure function of ``(seed, step)``, so an iterator state (for this
  ``MapDataset``, its next index) would store the same number twice and tie
  checkpoints to Grain's state format.  The trainer restores the step and
  calls ``train_batches(..., start_step=step)``.

Multi-process sharding
----------------------
``process_index`` / ``process_count`` default to
``grain.sharding.ShardByJaxProcess()``, that is ``jax.process_index()`` /
``jax.process_count()``.

* Training: global step ``t`` uses the examples ``perm[k*G:(k+1)*G]`` of the
  epoch's *global* permutation (``k`` = step within epoch) and process ``p``
  takes the slice ``[p*b:(p+1)*b]`` of them, *and* the matching slice of the
  augmentation parameters drawn for the whole global batch; it reads only
  those ``b`` records.  Guarantee, for every dataset: for every step,
  concatenating the batches of processes ``0..P-1`` (each with
  ``batch_size=b``) gives exactly the batch of a single process with
  ``batch_size=P*b`` (same seed) -- images bit for bit, labels equal.
* Evaluation: process ``p`` evaluates its own contiguous shard of the test
  split (at most ``ceil(num_test / P)`` examples) and every process yields the
  same number of batches, ``num_eval_batches(batch_size)``, padding with
  masked rows; over all processes each test example appears exactly once with
  mask 1.
"""

from __future__ import annotations

import dataclasses

import grain

from sparseopt_jax.training.input import idx, tfds_sources, transforms
from sparseopt_jax.training.input.dataset import (
    DataError,
    Dataset,
    DatasetInfo,
)
from sparseopt_jax.training.input.idx import FASHION_MNIST_DIR

__all__ = [
    "DataError",
    "Dataset",
    "DatasetInfo",
    "FASHION_MNIST_DIR",
    "KNOWN_DATASETS",
    "load",
]

KNOWN_DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagenet2012")


def _shard(
    process_index: int | None, process_count: int | None
) -> grain.sharding.ShardOptions:
  if process_index is None or process_count is None:
    jax_shard = grain.sharding.ShardByJaxProcess()
    if process_index is None:
      process_index = jax_shard.shard_index
    if process_count is None:
      process_count = jax_shard.shard_count
  process_index, process_count = int(process_index), int(process_count)
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
        "need 0 <= process_index < process_count, got"
        f" process_index={process_index}, process_count={process_count}"
    )
  return grain.sharding.ShardOptions(process_index, process_count)


def load(
    name: str,
    *,
    data_dir: str | None = None,
    train_subset: int | None = None,
    test_subset: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Dataset:
  """Loads dataset ``name`` for this process.

  Args:
    name: one of ``KNOWN_DATASETS``.
    data_dir: for ``fashion_mnist`` the directory holding the IDX files; for the
      TFDS datasets the TFDS data directory.
    train_subset: use only the first ``train_subset`` training examples.
    test_subset: evaluate on the first ``test_subset`` test examples only
      (a quick estimate; the default is the whole test split).
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
  train_subset = _check_subset("train_subset", train_subset)
  test_subset = _check_subset("test_subset", test_subset)
  dataset = _load(name, data_dir, train_subset, process_index, process_count)
  if test_subset is not None:
    if test_subset > dataset.info.num_test:
      raise ValueError(
          f"test_subset={test_subset} exceeds the {dataset.info.num_test}"
          f" test examples of {name}"
      )
    # The evaluation shards [0, num_test) over the processes: the first
    # test_subset examples, whatever the source.
    dataset.info = dataclasses.replace(dataset.info, num_test=test_subset)
  return dataset


def _check_subset(what: str, value: int | None) -> int | None:
  if value is None:
    return None
  if isinstance(value, bool) or int(value) != value or value < 1:
    raise ValueError(f"{what} must be a positive integer, got {value!r}")
  return int(value)


def _load(name, data_dir, train_subset, process_index, process_count):
  shard = _shard(process_index, process_count)
  if name != "fashion_mnist":
    return tfds_sources.load(
        tfds_sources.SPECS[name],
        data_dir=data_dir,
        train_subset=train_subset,
        shard=shard,
    )
  train, test = idx.fashion_mnist_arrays(data_dir)
  # Normalisation statistics of the full training split (independent of
  # train_subset and of the process).
  mean, std = transforms.pixel_stats(train[0])
  if train_subset is not None:
    if train_subset > train[0].shape[0]:
      raise ValueError(
          f"train_subset={train_subset} exceeds the {train[0].shape[0]}"
          " training examples"
      )
    train = (train[0][:train_subset], train[1][:train_subset])
  return transforms.small_image_dataset(
      "fashion_mnist",
      10,
      train,
      test,
      mean=mean,
      std=std,
      crop_pad=2,
      shard=shard,
  )
