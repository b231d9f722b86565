"""MNIST / Fashion-MNIST input, read by `experiments.common.data.load`."""

from __future__ import annotations

import jax
import jax.numpy as jnp

DATASETS = ("mnist", "fashion_mnist")


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 (B, 28, 28, 1) -> float32 (B, 784) in [0, 1], like ToTensor()."""
  return images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0
