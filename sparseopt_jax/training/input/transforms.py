"""Augmentation, normalisation and decoding of batches, in numpy.

* Small images held in memory (Fashion-MNIST, CIFAR): zero-pad random crop and
  horizontal flip, vectorised over the batch (``PadCropFlip``); evaluation
  normalises only (``NormalizeOnly``).
* JPEG records (ImageNet): Inception-style random resized crop to ``size``
  (area 0.08-1, aspect 3/4-4/3, 10 attempts, else the whole image) and flip
  (``InceptionCrop``); evaluation resizes the shorter side to ``resize`` and
  crops the centre ``size`` (``CentreCrop``). Decoded with PIL, one example at a
  time; JPEG DCT scaling (``Image.draft``) decodes large images at a reduced
  size that still covers the crop.

A train transform draws its random parameters for ``n`` examples from a numpy
generator (``draw``) and applies them to a batch of records (``__call__``);
``Dataset`` draws them for the global batch and gives each process its slice.
"""

from __future__ import annotations

import io
import math

import grain
import numpy as np

from sparseopt_jax.training.input.dataset import (
    ArraySource,
    DataError,
    Dataset,
    DatasetInfo,
)


class Normalize:
  """uint8 [..., C] -> float32 ``(x / 255 - mean) / std`` per channel."""

  def __init__(self, mean, std):
    mean, std = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    self.scale = (1.0 / (255.0 * std)).astype(np.float32)
    self.shift = (-mean / std).astype(np.float32)

  def __call__(self, images: np.ndarray) -> np.ndarray:
    out = images.astype(np.float32, order="C")
    if out.shape[-1] == 1:
      out *= self.scale[0]
      out += self.shift[0]
    else:  # over rows of W*C values: numpy is slow over an inner axis of 3
      rows = out.reshape(-1, out.shape[-2] * out.shape[-1])
      rows *= np.tile(self.scale, out.shape[-2])
      rows += np.tile(self.shift, out.shape[-2])
    return out


def pixel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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


def labels_int32(records: dict) -> np.ndarray:
  return np.asarray(records["label"]).astype(np.int32)


# --------------------------------------------------------------------------
# small images in memory


def crop_flip(
    images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, pad: int
) -> np.ndarray:
  """Zero-pads by ``pad``, crops back to HxW at ``offsets`` [B, 2] (y, x), mirrors where ``flips``."""
  b, h, w, c = images.shape
  padded = np.zeros((b, h + 2 * pad, w + 2 * pad, c), images.dtype)
  padded[:, pad : pad + h, pad : pad + w] = images
  # One gather of B windows (a [B, C, H, W] copy) instead of an index per pixel.
  windows = np.lib.stride_tricks.sliding_window_view(padded, (h, w), (1, 2))
  out = np.moveaxis(windows[np.arange(b), offsets[:, 0], offsets[:, 1]], 1, -1)
  out[flips] = out[flips, :, ::-1]
  return out


class PadCropFlip:
  """Training: ``pad``-pixel zero-pad random crop + horizontal flip, then normalise."""

  def __init__(self, pad: int, normalize: Normalize):
    self.pad, self.normalize = pad, normalize

  def draw(self, gen: np.random.Generator, n: int):
    offsets = gen.integers(0, 2 * self.pad + 1, size=(n, 2))
    flips = gen.random(n) < 0.5
    return offsets, flips

  def __call__(self, records: dict, params) -> dict:
    offsets, flips = params
    images = crop_flip(records["image"], offsets, flips, self.pad)
    return {"image": self.normalize(images), "label": labels_int32(records)}


class NormalizeOnly:
  """Evaluation of small images: normalisation only."""

  def __init__(self, normalize: Normalize):
    self.normalize = normalize

  def __call__(self, records: dict) -> dict:
    return {
        "image": self.normalize(records["image"]),
        "label": labels_int32(records),
    }


# --------------------------------------------------------------------------
# JPEG records

_ATTEMPTS = 10
_AREA = (0.08, 1.0)
_LOG_ASPECT = (math.log(3 / 4), math.log(4 / 3))


def inception_box(
    width: int, height: int, u: np.ndarray
) -> tuple[int, int, int, int]:
  """(left, top, right, bottom) of a random resized crop from uniforms ``u`` [attempts, 4]."""
  for a_u, r_u, y_u, x_u in u:
    area = width * height * (_AREA[0] + a_u * (_AREA[1] - _AREA[0]))
    aspect = math.exp(_LOG_ASPECT[0] + r_u * (_LOG_ASPECT[1] - _LOG_ASPECT[0]))
    w = round(math.sqrt(area * aspect))
    h = round(math.sqrt(area / aspect))
    if 0 < w <= width and 0 < h <= height:
      top = int(y_u * (height - h + 1))
      left = int(x_u * (width - w + 1))
      return left, top, left + w, top + h
  return 0, 0, width, height  # no valid box: the whole image


def _decode(
    data: bytes, box, out_size: int, where: str, flip: bool = False
) -> np.ndarray:
  """RGB uint8 [out_size, out_size, 3] of ``box`` (a function of (W, H)) resized."""
  from PIL import Image  # a dependency of tensorflow-datasets' image decoding

  try:
    with Image.open(io.BytesIO(data)) as image:
      width, height = image.size
      left, top, right, bottom = box(width, height)
      # JPEG DCT scaling: decode at the smallest 1/2^k size whose crop still
      # has out_size pixels a side (a no-op for other formats).
      image.draft(
          "RGB",
          (
              math.ceil(width * out_size / (right - left)),
              math.ceil(height * out_size / (bottom - top)),
          ),
      )
      sx, sy = image.size[0] / width, image.size[1] / height
      image = image.convert("RGB").resize(
          (out_size, out_size),
          Image.BILINEAR,  # antialiased when reducing
          box=(left * sx, top * sy, right * sx, bottom * sy),
      )
  except (OSError, SyntaxError, ValueError) as e:  # what PIL raises on bad data
    raise DataError(
        f"{where}: cannot decode the image ({type(e).__name__}: {e})"
    ) from e
  out = np.asarray(image)
  return out[:, ::-1] if flip else out


def _where(records: dict, i: int) -> str:
  return f"{records['source']} record {int(records['key'][i])}"


class InceptionCrop:
  """Training on JPEG records: random resized crop to ``size`` + flip, then normalise."""

  def __init__(self, size: int, normalize: Normalize):
    self.size, self.normalize = size, normalize

  def draw(self, gen: np.random.Generator, n: int):
    return gen.random((n, _ATTEMPTS, 4)), gen.random(n) < 0.5

  def __call__(self, records: dict, params) -> dict:
    u, flips = params
    images = np.stack([
        _decode(
            data,
            lambda w, h, u=u[i]: inception_box(w, h, u),
            self.size,
            _where(records, i),
            flip=bool(flips[i]),
        )
        for i, data in enumerate(records["image"])
    ])
    return {"image": self.normalize(images), "label": labels_int32(records)}


class CentreCrop:
  """Evaluation on JPEG records: shorter side to ``resize``, centre ``size`` crop, normalise."""

  def __init__(self, size: int, resize: int, normalize: Normalize):
    self.size, self.resize, self.normalize = size, resize, normalize

  def _box(self, width: int, height: int):
    side = self.size * min(width, height) / self.resize  # in source pixels
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side

  def __call__(self, records: dict) -> dict:
    images = np.stack([
        _decode(data, self._box, self.size, _where(records, i))
        for i, data in enumerate(records["image"])
    ])
    return {"image": self.normalize(images), "label": labels_int32(records)}


# --------------------------------------------------------------------------
# a dataset of small images held in memory

# No prefetch thread: a batch costs 0.3-0.6 ms of numpy, which JAX's
# asynchronous dispatch already overlaps with the device step, and a thread
# made both passes slower here (Grain recommends none for in-memory data).
IN_MEMORY_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def small_image_dataset(
    name: str,
    num_classes: int,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    *,
    mean,
    std,
    crop_pad: int,
    shard: grain.sharding.ShardOptions,
) -> Dataset:
  """A dataset of uint8 NHWC ``(images, labels)`` arrays augmented by ``PadCropFlip``."""
  normalize = Normalize(mean, std)
  info = DatasetInfo(
      name=name,
      image_shape=tuple(int(d) for d in train[0].shape[1:]),
      num_classes=num_classes,
      num_train=int(train[0].shape[0]),
      num_test=int(test[0].shape[0]),
  )
  return Dataset(
      info,
      train=ArraySource(*train),
      test=ArraySource(*test),
      train_transform=PadCropFlip(crop_pad, normalize),
      eval_transform=NormalizeOnly(normalize),
      mean=mean,
      std=std,
      shard=shard,
      read_options=IN_MEMORY_READ,
  )
