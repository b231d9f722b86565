"""CIFAR-10 input: official python batches or tfds, scaled to [0, 1]."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 (B, H, W, C) -> float32 in [0, 1], like ToTensor()."""
  return images.astype(jnp.float32) / 255.0
