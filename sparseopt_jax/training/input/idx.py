"""Fashion-MNIST from its IDX files (offline: Debian's ``dataset-fashion-mnist``)."""

from __future__ import annotations

import gzip
import math
import os
import zlib

import numpy as np

from sparseopt_jax.training.input.dataset import DataError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

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


def fashion_mnist_arrays(
    data_dir: str | None,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """(train, test) uint8 (images [N, 28, 28, 1], labels [N]).

  From ``data_dir`` if given, else ``FASHION_MNIST_DIR``, else TFDS.
  """
  if data_dir is not None:
    if not os.path.isdir(data_dir):
      raise DataError(
          f"Fashion-MNIST data directory not found: {data_dir}; {_FMNIST_HINT}"
      )
    directory = data_dir
  elif os.path.isdir(FASHION_MNIST_DIR):
    directory = FASHION_MNIST_DIR
  else:
    from sparseopt_jax.training.input import tfds_sources

    try:
      return tfds_sources.fashion_mnist_arrays()
    except Exception as e:  # no network, tfds missing, ...
      raise DataError(
          f"Fashion-MNIST not found: {FASHION_MNIST_DIR} does not exist and"
          f" TFDS's fashion_mnist failed ({type(e).__name__}: {e});"
          f" {_FMNIST_HINT}"
      ) from e
  return (
      _read_fashion_mnist_split(directory, "train"),
      _read_fashion_mnist_split(directory, "test"),
  )
