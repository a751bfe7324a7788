"""Training configurations and the named presets of the paper's experiments."""

from __future__ import annotations

import dataclasses

from sparseopt_jax import budgets
from sparseopt_jax import structure as structure_lib
from sparseopt_jax.checks import check_choice, check_fraction, check_int
from sparseopt_jax.composite import GROW_WITH
from sparseopt_jax.skew import SKEW_MODES
from sparseopt_jax.topology import TOPOLOGIES
from sparseopt_jax.training import models
from sparseopt_jax.training.input import KNOWN_DATASETS


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a training run depends on; every field is a command-line flag."""

  dataset: str = "fashion_mnist"
  model: str = "resnet20"
  width: int | None = (
      None  # channels of the first stage (None: the model's own)
  )
  data_dir: str | None = None
  train_subset: int | None = None  # first N training examples only
  test_subset: int | None = None  # evaluate on the first N test examples only
  batch_size: int = 128  # global, over all devices and processes
  epochs: float = 1.0
  steps: int | None = None  # overrides epochs
  learning_rate: float = 0.1
  optimizer: str = "sgd"  # "sgd" (with momentum) | "adamw"
  warmup_epochs: float = 0.0
  momentum: float = 0.9
  nesterov: bool = False
  weight_decay: float = 5e-4
  label_smoothing: float = 0.0
  dense: bool = False  # plain SGD on the dense model, no sparseopt
  sparsity: float = 0.9
  distribution: str = "erk"
  topology: str = "rigl"
  skew: str | None = "density"  # "density" | "bn" | None
  grow_with: str = "raw"
  structure: str | None = None  # None | "fan_in" | "N:M" (e.g. "2:4")
  update_every: int = 100
  drop_fraction: float = 0.3
  end_fraction: float = 0.75  # no mask updates after this fraction of training
  dense_stem: bool = False  # keep the first conv dense (RigL's ImageNet recipe)
  ham: bool = False  # HAM's hyperbolic step after SGD (so.ham)
  ham_alpha: float = 200.0  # HAM's gradient-sign coupling alpha
  ham_beta: float = 1e-3  # HAM's decay beta
  dtype: str = "float32"  # computation dtype of the model
  model_parallel: int = (
      1  # devices on the mesh's 'model' axis (kernels' output axis)
  )
  seed: int = 0
  eval_every: int = 500
  checkpoint_every: int = 1000
  log_every: int = 10

  def __post_init__(self):
    check_choice("dataset", self.dataset, KNOWN_DATASETS)
    if models.model_key(self.model) not in models.MODELS:
      raise ValueError(
          f"unknown model {self.model!r}; known models: {sorted(models.MODELS)}"
      )
    for name in ("width", "train_subset", "test_subset"):
      if getattr(self, name) is not None:
        check_int(name, getattr(self, name), 1)
    budgets.check_sparsity(self.sparsity)
    budgets.check_distribution(self.distribution)
    check_choice("topology", self.topology, TOPOLOGIES)
    check_choice("skew", self.skew, (*SKEW_MODES, None))
    check_choice("grow_with", self.grow_with, GROW_WITH)
    if not self.dense:
      structure_lib.check_budget(
          structure_lib.parse(self.structure), self.sparsity, self.distribution
      )
    check_choice("dtype", self.dtype, ("float32", "bfloat16"))
    check_choice("optimizer", self.optimizer, ("sgd", "adamw"))
    check_fraction("end_fraction", self.end_fraction, closed=True)
    check_fraction("drop_fraction", self.drop_fraction, closed=True)
    for name in (
        "batch_size",
        "update_every",
        "eval_every",
        "checkpoint_every",
        "log_every",
        "model_parallel",
    ):
      check_int(name, getattr(self, name), 1)
    if self.steps is not None:
      check_int("steps", self.steps, 1)
    if not self.epochs > 0:
      raise ValueError(f"epochs must be > 0, got {self.epochs!r}")
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}")
    for name in ("ham_alpha", "ham_beta"):
      if not getattr(self, name) >= 0:
        raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")


PRESETS: dict[str, TrainConfig] = {
    # The offline default: a short real run on 2 CPU cores (about 3 minutes).
    "fashion_mnist_resnet20": TrainConfig(
        dataset="fashion_mnist",
        model="resnet20",
        batch_size=128,
        steps=300,
        learning_rate=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        sparsity=0.9,
        distribution="erk",
        topology="rigl",
        update_every=25,
        drop_fraction=0.3,
        end_fraction=0.75,
        eval_every=50,
        checkpoint_every=100,
    ),
    # The paper's CIFAR-100 set-up (sec. 5; 90/95/97% with --sparsity, 100-500 epochs).
    "cifar100_resnet20": TrainConfig(
        dataset="cifar100",
        model="resnet20",
        batch_size=128,
        epochs=100,
        learning_rate=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        sparsity=0.9,
        distribution="erk",
        topology="rigl",
        update_every=100,
        drop_fraction=0.3,
        end_fraction=0.75,
        eval_every=1000,
        checkpoint_every=2000,
    ),
    # The paper's ImageNet set-up: RigL's ResNet-50 recipe, first conv dense.
    "imagenet_resnet50": TrainConfig(
        dataset="imagenet2012",
        model="resnet50",
        batch_size=1024,
        epochs=90,
        learning_rate=0.4,
        warmup_epochs=5,
        momentum=0.9,
        nesterov=True,
        weight_decay=1e-4,
        label_smoothing=0.1,
        sparsity=0.9,
        distribution="erk",
        topology="rigl",
        update_every=100,
        drop_fraction=0.3,
        end_fraction=0.75,
        dense_stem=True,
        dtype="bfloat16",
        eval_every=5000,
        checkpoint_every=5000,
    ),
    # A sparse ViT on Fashion-MNIST: pre-LN blocks with QK-norm, width 128, 4
    # blocks, 7x7 patches; the attention and MLP kernels sparse, the embeddings
    # and head dense; AdamW with warm-up and cosine decay; the LayerNorm
    # correction (docs/layernorm_skew.md). 1200 steps (2.6 epochs): 78.7% test
    # accuracy, 5.4 minutes of training on 2 shared CPU cores at load 5.
    "fashion_mnist_vit": TrainConfig(
        dataset="fashion_mnist",
        model="vit_qknorm",
        batch_size=128,
        steps=1200,
        optimizer="adamw",
        learning_rate=1e-3,
        warmup_epochs=0.2,
        weight_decay=0.05,
        sparsity=0.9,
        distribution="erk",
        topology="rigl",
        skew="layernorm",
        update_every=50,
        drop_fraction=0.3,
        end_fraction=0.75,
        eval_every=300,
        checkpoint_every=600,
    ),
    # The same ViT with SGD and momentum instead of AdamW, for comparison.
    "fashion_mnist_vit_sgd": TrainConfig(
        dataset="fashion_mnist",
        model="vit_qknorm",
        batch_size=128,
        steps=1200,
        optimizer="sgd",
        learning_rate=0.05,
        momentum=0.9,
        warmup_epochs=0.2,
        weight_decay=1e-4,
        sparsity=0.9,
        distribution="erk",
        topology="rigl",
        skew="layernorm",
        update_every=50,
        drop_fraction=0.3,
        end_fraction=0.75,
        eval_every=300,
        checkpoint_every=600,
    ),
}


def get_preset(name: str, **overrides) -> TrainConfig:
  """The preset ``name`` with ``overrides`` (field -> value) applied."""
  if name not in PRESETS:
    raise ValueError(
        f"unknown preset {name!r}; known presets: {sorted(PRESETS)}"
    )
  unknown = sorted(
      set(overrides) - {f.name for f in dataclasses.fields(TrainConfig)}
  )
  if unknown:
    raise ValueError(f"unknown config fields {unknown}")
  return dataclasses.replace(PRESETS[name], **overrides)
