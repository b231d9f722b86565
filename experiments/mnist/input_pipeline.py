"""MNIST / Fashion-MNIST input: offline IDX files or tfds, scaled to [0, 1]."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from experiments.common import data

DATASETS = ("mnist", "fashion_mnist")


def load(name: str, data_dir: str | None) -> data.Dataset:
  """The data set as uint8 arrays (see `experiments.common.data.load`)."""
  if name not in DATASETS:
    raise data.DataError(f"unknown --dataset {name!r}; choose one of"
                         f" {', '.join(DATASETS)}")
  return data.load(name, data_dir)


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 (B, 28, 28, 1) -> float32 (B, 784) in [0, 1], like ToTensor()."""
  return images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0
