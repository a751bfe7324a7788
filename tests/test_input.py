"""Tests for sparseopt_jax.training.input (the Grain input pipelines)."""

from __future__ import annotations

import gzip
import io
import itertools
import os

import numpy as np
import pytest

# The input pipelines need the [train] extra's grain: skip without it.
grain = pytest.importorskip("grain")

from sparseopt_jax.training import input as input_lib  # noqa: E402
from sparseopt_jax.training.input import DataError, DatasetInfo  # noqa: E402

FMNIST_DIR = input_lib.FASHION_MNIST_DIR
needs_fmnist = pytest.mark.skipif(
    not os.path.isfile(os.path.join(FMNIST_DIR, "t10k-labels-idx1-ubyte.gz")),
    reason="Debian package dataset-fashion-mnist is not installed",
)


# ---------------------------------------------------------------- helpers


def _read_reference(path: str, header: int) -> np.ndarray:
  """Independent minimal IDX reader used as ground truth."""
  with gzip.open(path, "rb") as f:
    return np.frombuffer(f.read(), np.uint8, offset=header)


def _take(iterator, n):
  return list(itertools.islice(iterator, n))


def _idx_bytes(array: np.ndarray, magic: int | None = None, dims=None) -> bytes:
  array = np.asarray(array, np.uint8)
  magic = (0x0800 | array.ndim) if magic is None else magic
  dims = array.shape if dims is None else dims
  header = magic.to_bytes(4, "big") + b"".join(
      int(d).to_bytes(4, "big") for d in dims
  )
  return header + array.tobytes()


def _write(path, payload: bytes, compress: bool = True):
  if compress:
    with gzip.open(path, "wb") as f:
      f.write(payload)
  else:
    with open(path, "wb") as f:
      f.write(payload)


def _make_idx_dir(directory, n_train=12, n_test=6, seed=0):
  rng = np.random.default_rng(seed)
  arrays = {
      "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28)),
      "train-labels-idx1-ubyte": rng.integers(0, 10, (n_train,)),
      "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28)),
      "t10k-labels-idx1-ubyte": rng.integers(0, 10, (n_test,)),
  }
  os.makedirs(directory, exist_ok=True)
  for base, array in arrays.items():
    _write(os.path.join(directory, base + ".gz"), _idx_bytes(array))
  return arrays


def _normalize(ds, images_uint8):
  mean = np.asarray(ds.mean, np.float64)
  std = np.asarray(ds.std, np.float64)
  return ((images_uint8 / 255.0 - mean) / std).astype(np.float32)


# ---------------------------------------------------------------- real Fashion-MNIST


@pytest.fixture(scope="module")
def fmnist():
  return input_lib.load("fashion_mnist", process_index=0, process_count=1)


@pytest.fixture(scope="module")
def fmnist_reference():
  test_images = _read_reference(
      os.path.join(FMNIST_DIR, "t10k-images-idx3-ubyte.gz"), 16
  )
  test_labels = _read_reference(
      os.path.join(FMNIST_DIR, "t10k-labels-idx1-ubyte.gz"), 8
  )
  train_images = _read_reference(
      os.path.join(FMNIST_DIR, "train-images-idx3-ubyte.gz"), 16
  )
  train_labels = _read_reference(
      os.path.join(FMNIST_DIR, "train-labels-idx1-ubyte.gz"), 8
  )
  return {
      "test_images": test_images.reshape(-1, 28, 28, 1),
      "test_labels": test_labels,
      "train_images": train_images.reshape(-1, 28, 28, 1),
      "train_labels": train_labels,
  }


@needs_fmnist
def test_fashion_mnist_info_and_train_batches(fmnist):
  assert fmnist.info == DatasetInfo(
      "fashion_mnist", (28, 28, 1), 10, 60000, 10000
  )
  assert fmnist.steps_per_epoch(128) == 60000 // 128
  # Normalisation statistics are the per-channel ones of the training split.
  assert fmnist.mean[0] == pytest.approx(0.2860, abs=1e-3)
  assert fmnist.std[0] == pytest.approx(0.3530, abs=1e-3)

  batches = _take(fmnist.train_batches(256, seed=0), 20)
  for batch in batches:
    assert set(batch) == {"image", "label"}
    assert (
        batch["image"].shape == (256, 28, 28, 1)
        and batch["image"].dtype == np.float32
    )
    assert batch["label"].shape == (256,) and batch["label"].dtype == np.int32
    assert batch["label"].min() >= 0 and batch["label"].max() <= 9
  images = np.stack([b["image"] for b in batches])
  assert (
      abs(images.mean()) < 0.1
  )  # zero padding of the crops shifts it a little
  assert 0.9 < images.std() < 1.1
  # all 10 classes show up
  assert len(np.unique(np.concatenate([b["label"] for b in batches]))) == 10


@needs_fmnist
def test_fashion_mnist_eval_covers_test_set_once(fmnist, fmnist_reference):
  batch_size = 768  # 10000 = 13 * 768 + 16: last batch mostly padding
  assert fmnist.num_eval_batches(batch_size) == 14
  batches = list(fmnist.eval_batches(batch_size))
  assert len(batches) == 14
  for batch in batches:
    assert set(batch) == {"image", "label", "mask"}
    assert batch["image"].shape == (batch_size, 28, 28, 1)
    assert batch["image"].dtype == np.float32
    assert (
        batch["label"].shape == (batch_size,)
        and batch["label"].dtype == np.int32
    )
    assert batch["mask"].shape == (batch_size,)
  mask = np.concatenate([b["mask"] for b in batches])
  assert mask.sum() == 10000
  assert np.all(mask[:10000] == 1) and np.all(
      mask[10000:] == 0
  )  # padding only at the end
  labels = np.concatenate([b["label"] for b in batches])[:10000]
  images = np.concatenate([b["image"] for b in batches])[:10000]
  np.testing.assert_array_equal(labels, fmnist_reference["test_labels"])
  np.testing.assert_allclose(
      images, _normalize(fmnist, fmnist_reference["test_images"]), atol=1e-5
  )
  assert abs(images.mean()) < 0.05 and 0.9 < images.std() < 1.1
  # A second pass gives the same batches.
  again = list(fmnist.eval_batches(batch_size))
  assert all(
      np.array_equal(a["image"], b["image"]) for a, b in zip(batches, again)
  )


@needs_fmnist
def test_test_subset_evaluates_the_first_examples_on_every_process(
    fmnist_reference,
):
  labels = []
  for index in range(2):
    ds = input_lib.load(
        "fashion_mnist", test_subset=130, process_index=index, process_count=2
    )
    assert ds.info.num_test == 130 and ds.num_eval_batches(32) == 3
    batches = list(ds.eval_batches(32))
    mask = np.concatenate([b["mask"] for b in batches]).astype(bool)
    labels.append(np.concatenate([b["label"] for b in batches])[mask])
  np.testing.assert_array_equal(
      np.concatenate(labels), fmnist_reference["test_labels"][:130]
  )
  for bad in (0, 10_001, True):
    with pytest.raises(ValueError, match="test_subset"):
      input_lib.load("fashion_mnist", test_subset=bad)


@needs_fmnist
def test_train_batches_are_crops_and_flips_of_a_permutation(
    fmnist, fmnist_reference
):
  batch_size, seed = 16, 7
  steps = fmnist.steps_per_epoch(batch_size)
  # Each epoch visits a permutation of the training set (last partial batch
  # dropped), a different one each epoch, and a pure function of the seed.
  order = fmnist.train_order(batch_size, seed=seed)
  epochs = [
      np.concatenate([order[s] for s in range(e * steps, (e + 1) * steps)])
      for e in range(2)
  ]
  for keys in epochs:
    assert keys.dtype.kind == "i" and keys.shape == (steps * batch_size,)
    assert len(np.unique(keys)) == steps * batch_size
  assert not np.array_equal(epochs[0], epochs[1])
  again = fmnist.train_order(batch_size, seed=seed)
  np.testing.assert_array_equal(again[3 * steps + 1], order[3 * steps + 1])

  step = steps + 2  # in the second epoch
  batch = _take(
      fmnist.train_batches(batch_size, seed=seed, start_step=step), 1
  )[0]
  idx = order[step]
  np.testing.assert_array_equal(
      batch["label"], fmnist_reference["train_labels"][idx]
  )
  originals = np.pad(
      fmnist_reference["train_images"][idx], ((0, 0), (2, 2), (2, 2), (0, 0))
  )
  n_flipped = 0
  for image, padded in zip(batch["image"], originals):
    matches = [
        (dy, dx, flip)
        for dy in range(5)
        for dx in range(5)
        for flip in (False, True)
        if np.allclose(
            image,
            _normalize(
                fmnist,
                padded[dy : dy + 28, dx : dx + 28][:, ::-1]
                if flip
                else padded[dy : dy + 28, dx : dx + 28],
            ),
            atol=1e-5,
        )
    ]
    assert (
        matches
    ), "training image is not a 2-pixel-padded crop (+ flip) of its example"
    n_flipped += all(m[2] for m in matches)
  assert 0 < n_flipped < batch_size  # flips happen, but not always


@needs_fmnist
def test_resume_from_start_step_across_epoch_boundary():
  ds = input_lib.load(
      "fashion_mnist", train_subset=1000, process_index=0, process_count=1
  )
  assert ds.info.num_train == 1000 and ds.info.num_test == 10000
  batch_size, seed = 64, 3
  steps = ds.steps_per_epoch(batch_size)
  assert steps == 15
  fresh = _take(ds.train_batches(batch_size, seed=seed), 2 * steps + 10)
  start = steps - 2  # resume two steps before the first epoch boundary
  resumed = _take(
      ds.train_batches(batch_size, seed=seed, start_step=start),
      len(fresh) - start,
  )
  for a, b in zip(fresh[start:], resumed, strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  # Deterministic for a given seed, different for another seed.
  again = _take(ds.train_batches(batch_size, seed=seed), 3)
  assert all(
      np.array_equal(a["image"], b["image"]) for a, b in zip(fresh, again)
  )
  other = _take(ds.train_batches(batch_size, seed=seed + 1), 1)[0]
  assert not np.array_equal(other["label"], fresh[0]["label"])
  # train_subset uses only the first 1000 examples.
  order = ds.train_order(batch_size, seed=seed)
  assert max(order[s].max() for s in range(steps)) < 1000
  # Random access: element t of the pipeline is the batch of step t.
  pipeline = ds.train_dataset(batch_size, seed=seed)
  for t in (0, start, 2 * steps + 9):
    np.testing.assert_array_equal(pipeline[t]["image"], fresh[t]["image"])


@needs_fmnist
def test_two_process_shards_concatenate_to_the_single_process_batch():
  """Guarantee: for every step t, concat(batch_t of process 0, batch_t of process 1)
  (each with batch_size=b) == batch_t of one process with batch_size=2b, same seed,
  bit for bit including augmentation; the two shards hold disjoint examples."""
  b, seed = 32, 11
  single = input_lib.load(
      "fashion_mnist", train_subset=1000, process_index=0, process_count=1
  )
  shards = [
      input_lib.load(
          "fashion_mnist", train_subset=1000, process_index=p, process_count=2
      )
      for p in range(2)
  ]
  steps = single.steps_per_epoch(2 * b)
  assert steps == 15 and all(s.steps_per_epoch(b) == steps for s in shards)
  n = steps + 3  # crosses an epoch boundary
  global_batches = _take(single.train_batches(2 * b, seed=seed), n)
  shard_batches = [_take(s.train_batches(b, seed=seed), n) for s in shards]
  orders = [s.train_order(b, seed=seed) for s in shards]
  single_order = single.train_order(2 * b, seed=seed)
  for t in range(n):
    i0, i1 = orders[0][t], orders[1][t]
    assert not set(i0) & set(i1)
    np.testing.assert_array_equal(np.concatenate([i0, i1]), single_order[t])
    for key in ("image", "label"):
      np.testing.assert_array_equal(
          np.concatenate([shard_batches[0][t][key], shard_batches[1][t][key]]),
          global_batches[t][key],
      )
  # Evaluation: same number of batches on both processes, each test example once.
  assert (
      shards[0].num_eval_batches(1000) == shards[1].num_eval_batches(1000) == 5
  )
  labels, images = [], []
  for shard in shards:
    for batch in shard.eval_batches(1000):
      keep = batch["mask"] > 0
      labels.append(batch["label"][keep])
      images.append(batch["image"][keep])
  full = list(single.eval_batches(1000))
  np.testing.assert_array_equal(
      np.concatenate(labels), np.concatenate([x["label"] for x in full])
  )
  np.testing.assert_array_equal(
      np.concatenate(images), np.concatenate([x["image"] for x in full])
  )


# ---------------------------------------------------------------- files and errors


def test_load_from_data_dir(tmp_path):
  arrays = _make_idx_dir(tmp_path, n_train=12, n_test=6)
  ds = input_lib.load(
      "fashion_mnist", data_dir=str(tmp_path), process_index=0, process_count=1
  )
  assert ds.info == DatasetInfo("fashion_mnist", (28, 28, 1), 10, 12, 6)
  batches = list(ds.eval_batches(4))
  assert len(batches) == 2 and batches[1]["mask"].tolist() == [1, 1, 0, 0]
  np.testing.assert_array_equal(
      np.concatenate([x["label"] for x in batches])[:6],
      arrays["t10k-labels-idx1-ubyte"],
  )
  np.testing.assert_allclose(
      np.concatenate([x["image"] for x in batches])[:6],
      _normalize(ds, arrays["t10k-images-idx3-ubyte"][..., None]),
      atol=1e-5,
  )
  expected = arrays["train-images-idx3-ubyte"] / 255.0
  assert ds.mean[0] == pytest.approx(expected.mean()) and ds.std[
      0
  ] == pytest.approx(expected.std())
  assert ds.steps_per_epoch(5) == 2
  batch = next(ds.train_batches(5, seed=0))
  assert batch["image"].shape == (5, 28, 28, 1)


def test_uncompressed_idx_files_are_accepted(tmp_path):
  arrays = _make_idx_dir(tmp_path)
  os.remove(tmp_path / "train-labels-idx1-ubyte.gz")
  _write(
      tmp_path / "train-labels-idx1-ubyte",
      _idx_bytes(arrays["train-labels-idx1-ubyte"]),
      False,
  )
  ds = input_lib.load(
      "fashion_mnist", data_dir=str(tmp_path), process_index=0, process_count=1
  )
  assert ds.info.num_train == 12


def test_missing_directory(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(DataError) as err:
    input_lib.load(
        "fashion_mnist", data_dir=str(missing), process_index=0, process_count=1
    )
  message = str(err.value)
  assert str(missing) in message
  assert (
      "apt-get install dataset-fashion-mnist" in message
      and "--data-dir" in message
  )


def test_missing_file(tmp_path):
  _make_idx_dir(tmp_path)
  os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
  with pytest.raises(DataError) as err:
    input_lib.load(
        "fashion_mnist",
        data_dir=str(tmp_path),
        process_index=0,
        process_count=1,
    )
  message = str(err.value)
  assert str(tmp_path / "t10k-labels-idx1-ubyte.gz") in message
  assert (
      "apt-get install dataset-fashion-mnist" in message
      and "--data-dir" in message
  )


def _corrupt(kind: str, directory) -> tuple[str, str]:
  """Corrupts one file of a valid directory; returns (file name, expected message part)."""
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (12, 28, 28))
  labels = rng.integers(0, 10, (12,))
  if kind == "bad_gzip":
    _write(
        directory / "train-images-idx3-ubyte.gz",
        b"this is not gzip data",
        False,
    )
    return "train-images-idx3-ubyte.gz", "gzip"
  if kind == "truncated_gzip":
    path = directory / "train-images-idx3-ubyte.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    return "train-images-idx3-ubyte.gz", "gzip"
  if kind == "wrong_magic":  # an image file where the labels should be
    _write(directory / "t10k-labels-idx1-ubyte.gz", _idx_bytes(images))
    return "t10k-labels-idx1-ubyte.gz", "magic"
  if kind == "not_ubyte":  # IDX type code 0x0D (float) instead of 0x08
    _write(
        directory / "train-labels-idx1-ubyte.gz",
        _idx_bytes(labels, magic=0x0D01),
    )
    return "train-labels-idx1-ubyte.gz", "magic"
  if kind == "truncated_data":  # header says 12 images, only 11 present
    _write(
        directory / "train-images-idx3-ubyte.gz",
        _idx_bytes(images[:11], dims=(12, 28, 28)),
    )
    return "train-images-idx3-ubyte.gz", "truncated"
  if kind == "truncated_header":
    _write(directory / "train-images-idx3-ubyte.gz", _idx_bytes(images)[:10])
    return "train-images-idx3-ubyte.gz", "truncated"
  if kind == "empty":
    _write(directory / "t10k-images-idx3-ubyte.gz", b"")
    return "t10k-images-idx3-ubyte.gz", "truncated"
  if kind == "trailing_bytes":
    _write(
        directory / "train-labels-idx1-ubyte.gz", _idx_bytes(labels) + b"\0\0"
    )
    return "train-labels-idx1-ubyte.gz", "trailing"
  if kind == "wrong_dims":
    _write(
        directory / "train-images-idx3-ubyte.gz",
        _idx_bytes(np.zeros((12, 32, 32))),
    )
    return "train-images-idx3-ubyte.gz", "dimensions"
  if kind == "count_mismatch":
    _write(directory / "train-labels-idx1-ubyte.gz", _idx_bytes(labels[:11]))
    return "train-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz"
  if kind == "label_out_of_range":
    bad = labels.copy()
    bad[5] = 10
    _write(directory / "t10k-labels-idx1-ubyte.gz", _idx_bytes(bad[:6]))
    return "t10k-labels-idx1-ubyte.gz", "outside 0..9"
  raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "bad_gzip",
        "truncated_gzip",
        "wrong_magic",
        "not_ubyte",
        "truncated_data",
        "truncated_header",
        "empty",
        "trailing_bytes",
        "wrong_dims",
        "count_mismatch",
        "label_out_of_range",
    ],
)
def test_corrupt_files_raise_data_error(tmp_path, kind):
  _make_idx_dir(tmp_path)
  name, expected = _corrupt(kind, tmp_path)
  with pytest.raises(DataError) as err:
    input_lib.load(
        "fashion_mnist",
        data_dir=str(tmp_path),
        process_index=0,
        process_count=1,
    )
  message = str(err.value)
  assert str(tmp_path / name) in message
  assert expected in message
  assert isinstance(err.value, ValueError)


def test_unknown_dataset():
  with pytest.raises(ValueError) as err:
    input_lib.load("mnist", process_index=0, process_count=1)
  assert not isinstance(err.value, DataError)
  message = str(err.value)
  assert "'mnist'" in message
  for name in input_lib.KNOWN_DATASETS:
    assert name in message


def test_bad_arguments(tmp_path):
  _make_idx_dir(tmp_path, n_train=12)
  with pytest.raises(ValueError, match="process_index"):
    input_lib.load(
        "fashion_mnist",
        data_dir=str(tmp_path),
        process_index=2,
        process_count=2,
    )
  with pytest.raises(ValueError, match="train_subset"):
    input_lib.load(
        "fashion_mnist",
        data_dir=str(tmp_path),
        train_subset=13,
        process_index=0,
        process_count=1,
    )
  ds = input_lib.load(
      "fashion_mnist", data_dir=str(tmp_path), process_index=0, process_count=1
  )
  with pytest.raises(ValueError, match="larger than the training set"):
    next(ds.train_batches(13, seed=0))
  with pytest.raises(ValueError, match="batch_size"):
    ds.steps_per_epoch(0)
  with pytest.raises(ValueError, match="start_step"):
    ds.train_batches(4, seed=0, start_step=-1)


def test_process_defaults_come_from_jax(tmp_path):
  import jax

  _make_idx_dir(tmp_path)
  ds = input_lib.load("fashion_mnist", data_dir=str(tmp_path))
  assert (ds.process_index, ds.process_count) == (
      jax.process_index(),
      jax.process_count(),
  )


def test_fashion_mnist_tfds_fallback(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.setattr(
      input_lib.idx, "FASHION_MNIST_DIR", str(tmp_path / "not-installed")
  )
  with tfds.testing.mock_data(num_examples=24):
    ds = input_lib.load("fashion_mnist", process_index=0, process_count=1)
  assert ds.info == DatasetInfo("fashion_mnist", (28, 28, 1), 10, 24, 24)
  batch = next(ds.train_batches(8, seed=0))
  assert (
      batch["image"].shape == (8, 28, 28, 1)
      and batch["label"].dtype == np.int32
  )


def test_fashion_mnist_not_found_anywhere(tmp_path, monkeypatch):
  def no_network():
    raise OSError("no internet")

  monkeypatch.setattr(
      input_lib.idx, "FASHION_MNIST_DIR", str(tmp_path / "not-installed")
  )
  monkeypatch.setattr(
      input_lib.tfds_sources, "fashion_mnist_arrays", no_network
  )
  with pytest.raises(DataError) as err:
    input_lib.load("fashion_mnist", process_index=0, process_count=1)
  message = str(err.value)
  assert (
      "apt-get install dataset-fashion-mnist" in message
      and "no internet" in message
  )


# ---------------------------------------------------------------- TFDS datasets (mocked)


@pytest.mark.parametrize(
    "name, num_classes", [("cifar100", 100), ("cifar10", 10)]
)
def test_cifar_under_mock_data(name, num_classes):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=10):
    ds = input_lib.load(name, process_index=0, process_count=1)
    assert ds.info == DatasetInfo(name, (32, 32, 3), num_classes, 10, 10)
    assert ds.steps_per_epoch(4) == 2
    train = _take(ds.train_batches(4, seed=0), 3)  # crosses an epoch boundary
    evals = list(ds.eval_batches(4))
  for batch in train:
    assert set(batch) == {"image", "label"}
    assert (
        batch["image"].shape == (4, 32, 32, 3)
        and batch["image"].dtype == np.float32
    )
    assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
    assert 0 <= batch["label"].min() and batch["label"].max() < num_classes
    assert np.isfinite(batch["image"]).all()
  assert len(evals) == ds.num_eval_batches(4) == 3
  for batch in evals:
    assert (
        batch["image"].shape == (4, 32, 32, 3)
        and batch["image"].dtype == np.float32
    )
    assert batch["label"].dtype == np.int32 and batch["mask"].shape == (4,)
  assert (
      np.concatenate([b["mask"] for b in evals]).tolist() == [1] * 10 + [0] * 2
  )
  # Evaluation is normalisation only: the (random uint8) mock images map back
  # to integers in 0..255.
  pixels = evals[0]["image"] * np.asarray(ds.std) + np.asarray(ds.mean)
  np.testing.assert_allclose(pixels * 255, np.round(pixels * 255), atol=1e-3)


def test_cifar_resume_under_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=20):
    ds = input_lib.load("cifar10", process_index=0, process_count=1)
    steps = ds.steps_per_epoch(4)
    assert steps == 5
    fresh = _take(ds.train_batches(4, seed=5), 2 * steps + 2)
    resumed = _take(
        ds.train_batches(4, seed=5, start_step=steps - 1), steps + 3
    )
    other = _take(ds.train_batches(4, seed=6), 1)
  for a, b in zip(fresh[steps - 1 :], resumed, strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert not np.array_equal(fresh[0]["image"], other[0]["image"])
  # Epochs are different permutations of the same 20 examples.
  epoch0 = np.concatenate([b["label"] for b in fresh[:steps]])
  epoch1 = np.concatenate([b["label"] for b in fresh[steps : 2 * steps]])
  assert sorted(epoch0) == sorted(epoch1) and not np.array_equal(epoch0, epoch1)


def test_imagenet_under_mock_data():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=4):
    ds = input_lib.load("imagenet2012", process_index=0, process_count=1)
    assert ds.info == DatasetInfo("imagenet2012", (224, 224, 3), 1000, 4, 4)
    train = next(ds.train_batches(2, seed=0))
    evals = list(ds.eval_batches(3))
  assert (
      train["image"].shape == (2, 224, 224, 3)
      and train["image"].dtype == np.float32
  )
  assert train["label"].shape == (2,) and train["label"].dtype == np.int32
  assert np.isfinite(train["image"]).all()
  assert len(evals) == 2
  for batch in evals:
    assert (
        batch["image"].shape == (3, 224, 224, 3)
        and batch["image"].dtype == np.float32
    )
    assert np.isfinite(batch["image"]).all()
  assert np.concatenate([b["mask"] for b in evals]).tolist() == [
      1,
      1,
      1,
      1,
      0,
      0,
  ]


# ---------------------------------------------------------------- TFDS on real (tiny) files


def _build_tiny_cifar10(data_dir, file_format, n_train=44, n_test=11):
  """Prepares a real TFDS `cifar10` in ``data_dir`` with constant images.

  Example ``k`` (train: k = 0..n_train-1, test: k = 100..) is a constant image
  of value ``k`` with label ``k % 10``, so it can be identified after
  augmentation from its centre pixel.  TFDS's own generation (which shuffles
  records) is run with the download step stubbed out (no network; the stub
  also sidesteps tfds needing `importlib_resources` to find checksums).
  """
  tfds = pytest.importorskip("tensorflow_datasets")
  from unittest import mock

  builder = tfds.builder("cifar10", data_dir=data_dir, file_format=file_format)

  def examples(ids):
    for k in ids:
      image = np.full((32, 32, 3), k, np.uint8)
      yield k, {"id": f"ex{k}", "image": image, "label": k % 10}

  splits = {
      "train": examples(range(n_train)),
      "test": examples(range(100, 100 + n_test)),
  }
  try:
    with (
        mock.patch.object(
            type(builder),
            "_make_download_manager",
            lambda self, **kw: mock.MagicMock(),
        ),
        mock.patch.object(
            type(builder), "_split_generators", lambda self, dl_manager: splits
        ),
    ):
      builder.download_and_prepare()
  except Exception as e:  # tfds internals changed: not a failure of ours
    pytest.skip(f"could not build a tiny TFDS cifar10: {type(e).__name__}: {e}")
  return str(data_dir)


@pytest.fixture(scope="module")
def tiny_cifar10_dir(tmp_path_factory):
  """44 train / 11 test records in array_record, read through a data source."""
  return _build_tiny_cifar10(tmp_path_factory.mktemp("tfds"), "array_record")


def _ids(ds, batch):
  """Identifies the constant images of tiny_cifar10_dir from their centre pixel."""
  pixel = batch["image"][:, 16, 16, 0] * ds.std[0] + ds.mean[0]
  return np.round(pixel * 255).astype(int)


def test_tfds_real_files_two_processes(tiny_cifar10_dir):
  single, *shards = [
      input_lib.load(
          "cifar10", data_dir=tiny_cifar10_dir, process_index=p, process_count=n
      )
      for p, n in ((0, 1), (0, 2), (1, 2))
  ]
  global_batches = _take(single.train_batches(8, seed=1), 15)  # three epochs
  per_process = []
  for ds in shards:
    assert ds.info == DatasetInfo("cifar10", (32, 32, 3), 10, 44, 11)
    assert ds.steps_per_epoch(4) == 5  # 44 // 8: 4 examples unused an epoch
    batches = _take(ds.train_batches(4, seed=1), 15)
    ids = np.stack([_ids(ds, b) for b in batches])
    labels = np.stack([b["label"] for b in batches])
    # labels stay with their images
    np.testing.assert_array_equal(labels, ids % 10)
    assert ids.min() >= 0 and ids.max() < 44
    per_process.append((ids, batches))
  for t in range(15):
    # The processes' batches are disjoint and make the single-process batch.
    assert not set(per_process[0][0][t]) & set(per_process[1][0][t])
    for key in ("image", "label"):
      np.testing.assert_array_equal(
          np.concatenate(
              [per_process[0][1][t][key], per_process[1][1][t][key]]
          ),
          global_batches[t][key],
      )
  epochs = np.concatenate([per_process[0][0], per_process[1][0]], 1)
  epochs = epochs.reshape(3, 40)
  assert all(len(set(e)) == 40 for e in epochs)  # no repeats within an epoch
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch

  # Evaluation: same number of batches everywhere, every test example once.
  assert shards[0].num_eval_batches(4) == shards[1].num_eval_batches(4) == 2
  covered = []
  for ds in shards:
    batches = list(ds.eval_batches(4))
    assert len(batches) == 2
    for batch in batches:
      keep = batch["mask"] > 0
      covered.extend(_ids(ds, batch)[keep].tolist())
      np.testing.assert_array_equal(
          batch["label"][keep], _ids(ds, batch)[keep] % 10
      )
  assert sorted(covered) == list(range(100, 111))


def test_tfds_real_files_resume(tiny_cifar10_dir):
  ds = input_lib.load(
      "cifar10",
      data_dir=tiny_cifar10_dir,
      train_subset=40,
      process_index=0,
      process_count=1,
  )
  assert ds.info.num_train == 40 and ds.steps_per_epoch(8) == 5
  fresh = _take(ds.train_batches(8, seed=2), 12)
  resumed = _take(ds.train_batches(8, seed=2, start_step=4), 8)
  for a, b in zip(fresh[4:], resumed, strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  ids = np.stack([_ids(ds, b) for b in fresh[:10]]).reshape(2, 40)
  assert sorted(ids[0]) == sorted(
      ids[1]
  )  # train_subset: the same 40 examples each epoch
  with pytest.raises(ValueError, match="train_subset"):
    input_lib.load(
        "cifar10",
        data_dir=tiny_cifar10_dir,
        train_subset=45,
        process_index=0,
        process_count=1,
    )


def test_tfds_prepared_without_random_access_is_a_data_error(tmp_path):
  data_dir = _build_tiny_cifar10(tmp_path, "tfrecord", n_train=4, n_test=2)
  with pytest.raises(DataError) as err:
    input_lib.load(
        "cifar10", data_dir=data_dir, process_index=0, process_count=1
    )
  message = str(err.value)
  assert data_dir in message and "tfds convert_format" in message
  assert "--file_format=array_record" in message


# ---------------------------------------------------------------- reads


class _CountingSource:
  """A source that records the keys of each read."""

  def __init__(self, source):
    self.source, self.reads = source, []

  def __len__(self):
    return len(self.source)

  def read(self, keys):
    self.reads.append(np.array(keys))
    return self.source.read(keys)


def test_resume_reads_no_batch_before_start_step(tmp_path):
  _make_idx_dir(tmp_path, n_train=12)
  ds = input_lib.load(
      "fashion_mnist", data_dir=str(tmp_path), process_index=0, process_count=1
  )
  batch_size, seed = 2, 4
  steps = ds.steps_per_epoch(batch_size)
  start = 10 * steps + 3  # 63 batches before it
  expected = _take(ds.train_batches(batch_size, seed=seed), start + 3)[start:]
  order = ds.train_order(batch_size, seed=seed)
  ds.train_source = counting = _CountingSource(ds.train_source)

  # Without prefetching (in-memory data has none) the count is exact: one
  # read of one batch per step.
  assert ds.read_options.num_threads == 0
  resumed = _take(ds.train_batches(batch_size, seed=seed, start_step=start), 3)
  assert len(counting.reads) == 3
  for t, keys in enumerate(counting.reads):
    np.testing.assert_array_equal(keys, order[start + t])
  for a, b in zip(expected, resumed, strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
  # Random access to one step reads that step's records only.
  counting.reads.clear()
  batch = ds.train_dataset(batch_size, seed=seed)[start + 1]
  assert len(counting.reads) == 1
  np.testing.assert_array_equal(batch["image"], expected[1]["image"])

  # Prefetching reads a few steps ahead, never one before start.
  counting.reads.clear()
  prefetch = grain.ReadOptions(num_threads=2, prefetch_buffer_size=3)
  ds.read_options = prefetch
  it = ds.train_batches(batch_size, seed=seed, start_step=start)
  assert np.array_equal(next(it)["image"], expected[0]["image"])
  it.close()
  ahead = 1 + prefetch.prefetch_buffer_size
  reads = list(counting.reads)
  assert 1 <= len(reads) <= ahead + 1
  allowed = [order[t] for t in range(start, start + ahead + 1)]
  assert all(any(np.array_equal(k, a) for a in allowed) for k in reads)


# ---------------------------------------------------------------- streamed JPEG records


def _jpeg(value, height, width):
  from PIL import Image

  out = io.BytesIO()
  image = np.full((height, width, 3), value, np.uint8)
  Image.fromarray(image).save(out, "JPEG", quality=95)
  return out.getvalue()


class _Records(list):
  """JPEG records in a list (a TFDS data source's interface), reads counted."""

  reads = 0

  def __getitem__(self, key):
    self.reads += 1
    return super().__getitem__(key)


def _jpeg_records(ids):
  # Constant images of value 6k (k < 40) in three shapes, label k % 10.
  shapes = ((24, 40), (40, 24), (30, 30))
  return _Records(
      {"image": _jpeg(6 * k, *shapes[k % 3]), "label": np.int64(k % 10)}
      for k in ids
  )


def _jpeg_dataset(train, test, process_index=0, process_count=1):
  mean, std = (0.5,) * 3, (0.25,) * 3
  normalize = input_lib.transforms.Normalize(mean, std)
  return input_lib.Dataset(
      DatasetInfo("jpegs", (16, 16, 3), 10, len(train), len(test)),
      train=input_lib.tfds_sources.RecordSource(train, "fake train"),
      test=input_lib.tfds_sources.RecordSource(test, "fake test"),
      train_transform=input_lib.transforms.InceptionCrop(16, normalize),
      eval_transform=input_lib.transforms.CentreCrop(16, 20, normalize),
      mean=mean,
      std=std,
      shard=grain.sharding.ShardOptions(process_index, process_count),
      read_options=input_lib.tfds_sources.STREAM_READ,
  )


def _jpeg_ids(batch):
  pixel = batch["image"][:, 8, 8, :].mean(-1) * 0.25 + 0.5
  return np.round(pixel * 255 / 6).astype(int)


def test_streamed_jpeg_records_resume_shard_and_evaluate():
  train, test = _jpeg_records(range(20)), _jpeg_records(range(30, 35))
  ds = _jpeg_dataset(train, test)
  assert ds.steps_per_epoch(4) == 5
  fresh = _take(ds.train_batches(4, seed=3), 7)
  for batch in fresh:
    assert batch["image"].shape == (4, 16, 16, 3)
    assert (
        batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
    )
    np.testing.assert_array_equal(batch["label"], _jpeg_ids(batch) % 10)
  epoch = np.concatenate([_jpeg_ids(b) for b in fresh[:5]])
  assert sorted(epoch) == list(range(20))

  # Resuming at step 6 reads the records of step 6 only (no prefetching here).
  # A source of its own: the prefetch threads of the iterator above may still
  # be reading from `train`.
  own = _jpeg_records(range(20))
  resumer = _jpeg_dataset(own, test)
  resumer.read_options = grain.ReadOptions(
      num_threads=0, prefetch_buffer_size=0
  )
  resumed = next(resumer.train_batches(4, seed=3, start_step=6))
  assert own.reads == 4
  for key in ("image", "label"):
    np.testing.assert_array_equal(resumed[key], fresh[6][key])

  # Two processes: halves of the single-process batch, bit for bit.
  halves = [_jpeg_dataset(train, test, p, 2) for p in range(2)]
  for t, batches in enumerate(
      zip(*(_take(h.train_batches(2, seed=3), 7) for h in halves))
  ):
    for key in ("image", "label"):
      np.testing.assert_array_equal(
          np.concatenate([b[key] for b in batches]), fresh[t][key]
      )

  # Evaluation: the centre crop of every test record once, padded.
  evals = list(ds.eval_batches(2))
  assert len(evals) == ds.num_eval_batches(2) == 3
  mask = np.concatenate([b["mask"] for b in evals])
  assert mask.tolist() == [1, 1, 1, 1, 1, 0]
  ids = np.concatenate([_jpeg_ids(b) for b in evals])[:5]
  assert ids.tolist() == list(range(30, 35))


def test_corrupt_jpeg_record_names_the_record():
  train = _jpeg_records(range(8))
  train[5] = {"image": b"\xff\xd8 not a jpeg", "label": np.int64(5)}
  ds = _jpeg_dataset(train, _jpeg_records(range(2)))
  with pytest.raises(DataError, match="fake train record 5: cannot decode"):
    _take(ds.train_batches(8, seed=0), 1)


def test_inception_box_area_aspect_and_fallback():
  box = input_lib.transforms.inception_box
  gen = np.random.default_rng(0)
  for _ in range(200):
    width, height = gen.integers(1, 400, size=2)
    left, top, right, bottom = box(width, height, gen.random((10, 4)))
    assert 0 <= left < right <= width and 0 <= top < bottom <= height
    w, h = right - left, bottom - top
    if (w, h) != (width, height):
      area = w * h / (width * height)
      assert 0.08 - 0.02 <= area <= 1.0 and 3 / 4 - 0.1 <= w / h <= 4 / 3 + 0.1
  # No attempt fits a 1-pixel-high strip: the whole image.
  assert box(300, 1, np.full((10, 4), 0.5)) == (0, 0, 300, 1)
