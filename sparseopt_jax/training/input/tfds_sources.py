"""TFDS datasets through random-access data sources (array_record).

``builder.as_data_source(split)`` gives random access to the records of a split
prepared in the array_record format; Grain reads them. No tf.data.

* ``cifar10`` / ``cifar100``: each split is decoded once, when loaded, into
  uint8 arrays in memory (50 000 x 32 x 32 x 3 = 150 MB for training), then
  served like Fashion-MNIST (4-pixel pad random crop + flip).
* ``imagenet2012``: streamed; records are read by key with the image left
  encoded (``SkipDecoding``) and each batch is decoded with PIL in Grain's
  prefetch threads (``STREAM_READ``).

A split prepared in another format (TFDS's default is tfrecord) has no random
access: ``load`` says how to rebuild or convert it.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from sparseopt_jax.training.input import transforms
from sparseopt_jax.training.input.dataset import (
    DataError,
    Dataset,
    DatasetInfo,
)

# Each element is a whole batch: 8 batches decode in parallel, 8 wait ready.
STREAM_READ = grain.ReadOptions(num_threads=8, prefetch_buffer_size=8)


@dataclasses.dataclass(frozen=True)
class Spec:
  name: str
  test_split: str
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  jpeg: bool = False  # streamed JPEG records vs small images held in memory
  crop_pad: int = 4  # small images
  image_size: int = 224  # jpeg
  resize_size: int = 256  # jpeg, evaluation


SPECS = {
    "cifar10": Spec(
        "cifar10",
        "test",
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": Spec(
        "cifar100",
        "test",
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
    "imagenet2012": Spec(
        "imagenet2012",
        "validation",
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        jpeg=True,
    ),
}


def _hide_gpus_from_tensorflow():
  """JAX owns the accelerators: TensorFlow, if present, must not take their memory."""
  try:
    import tensorflow as tf
  except ImportError:
    return
  try:
    tf.config.set_visible_devices([], "GPU")
  except (RuntimeError, ValueError):  # already initialised / no GPU support
    pass


def _builder(name: str, data_dir: str | None):
  import tensorflow_datasets as tfds

  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared():  # in whatever format: _data_source checks it
    return builder
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  try:
    _hide_gpus_from_tensorflow()  # preparing runs TensorFlow
    builder.download_and_prepare()
  except Exception as e:
    raise DataError(
        f"TFDS dataset {name!r} is not available in {builder.data_dir} and"
        f" could not be prepared ({type(e).__name__}: {e}); prepare it first"
        f" (`tfds build {name} --data_dir=... --file_format=array_record`;"
        " ImageNet needs the manual download) and pass its data directory as"
        " data_dir"
    ) from e
  return builder


def _data_source(builder, split: str, decoders=None):
  try:
    return builder.as_data_source(split=split, decoders=decoders)
  except NotImplementedError as e:  # prepared without random access
    raise DataError(
        f"{builder.data_dir}: {builder.name} is prepared in a format without"
        f" random access ({e}); the Grain pipeline reads array_record:"
        " convert it (`tfds convert_format --dataset_version_dir="
        f"{builder.data_dir} --out_file_format=array_record`) or rebuild it"
        f" (`tfds build {builder.name} --file_format=array_record`)"
    ) from e


class RecordSource:
  """Records of a TFDS split read by key, images left encoded."""

  def __init__(self, source, where: str, size: int | None = None):
    self.source, self.where = source, where
    self.size = len(source) if size is None else size

  def __len__(self) -> int:
    return self.size

  def read(self, keys: np.ndarray) -> dict:
    records = [self.source[int(k)] for k in keys]
    return {
        "image": [r["image"] for r in records],
        "label": np.asarray([r["label"] for r in records], np.int64),
        "key": np.asarray(keys),
        "source": self.where,
    }


def _read_all(source, size: int, where: str) -> tuple[np.ndarray, np.ndarray]:
  """The first ``size`` records of ``source`` decoded, as uint8 arrays.

  One key at a time: tfds's numpy decoding (protobuf, PIL) holds the GIL for
  most of a record, and prefetch threads made it slower here (0.5 against
  0.3 ms a 32x32 record on 2 cores).
  """
  images, labels = None, np.empty(size, np.int64)
  try:
    for i in range(size):
      record = source[i]
      if images is None:
        images = np.empty((size,) + np.shape(record["image"]), np.uint8)
      images[i] = record["image"]
      labels[i] = record["label"]
  except Exception as e:
    raise DataError(f"{where}: cannot read record {i} ({e})") from e
  return images, labels


def _check_subset(train_subset, num_train, name):
  if train_subset is not None and train_subset > num_train:
    raise ValueError(
        f"train_subset={train_subset} exceeds the {num_train} training"
        f" examples of {name}"
    )
  return num_train if train_subset is None else train_subset


def load(
    spec: Spec,
    *,
    data_dir: str | None,
    train_subset: int | None,
    shard: grain.sharding.ShardOptions,
) -> Dataset:
  """Dataset ``spec`` from the TFDS data directory ``data_dir``."""
  import tensorflow_datasets as tfds

  builder = _builder(spec.name, data_dir)
  features = builder.info.features
  num_classes = int(features["label"].num_classes)
  where = f"{builder.data_dir} ({spec.name}, split %r)"
  if not spec.jpeg:
    train_source = _data_source(builder, "train")
    num_train = _check_subset(train_subset, len(train_source), spec.name)
    test_source = _data_source(builder, spec.test_split)
    return transforms.small_image_dataset(
        spec.name,
        num_classes,
        _read_all(train_source, num_train, where % "train"),
        _read_all(test_source, len(test_source), where % spec.test_split),
        mean=spec.mean,
        std=spec.std,
        crop_pad=spec.crop_pad,
        shard=shard,
    )
  decoders = {"image": tfds.decode.SkipDecoding()}
  train = _data_source(builder, "train", decoders)
  test = _data_source(builder, spec.test_split, decoders)
  num_train = _check_subset(train_subset, len(train), spec.name)
  normalize = transforms.Normalize(spec.mean, spec.std)
  info = DatasetInfo(
      name=spec.name,
      image_shape=(spec.image_size, spec.image_size, 3),
      num_classes=num_classes,
      num_train=num_train,
      num_test=len(test),
  )
  return Dataset(
      info,
      train=RecordSource(train, where % "train", num_train),
      test=RecordSource(test, where % spec.test_split),
      train_transform=transforms.InceptionCrop(spec.image_size, normalize),
      eval_transform=transforms.CentreCrop(
          spec.image_size, spec.resize_size, normalize
      ),
      mean=spec.mean,
      std=spec.std,
      shard=shard,
      read_options=STREAM_READ,
  )


def fashion_mnist_arrays() -> (
    tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
):
  """Fashion-MNIST's (train, test) uint8 arrays from TFDS (downloaded if needed)."""
  builder = _builder("fashion_mnist", None)
  where = f"{builder.data_dir} (fashion_mnist, split %r)"
  out = []
  for split in ("train", "test"):
    source = _data_source(builder, split)
    images, labels = _read_all(source, len(source), where % split)
    if images.ndim == 3:
      images = images[..., None]
    out.append((images, labels.astype(np.uint8)))
  return out[0], out[1]
