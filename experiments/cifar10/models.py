"""The tutorial's CIFAR-10 model (64,842 parameters)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import jaxdeq
from experiments.common import layers
from jaxdeq.nnx import DEQ, ResNetCell

CHANNELS = 48


def batch_norm(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
  # PyTorch's BatchNorm2d: momentum 0.1 (flax counts the other way), eps 1e-5.
  return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, rngs=rngs)


class CifarDEQ(nnx.Module):
  """conv 3->48 + BN, DEQ(ResNetCell(48, 64)), BN, 8x8 avg pool, 768->10.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> CifarDEQ(nnx.Rngs(0))(jnp.zeros((2, 32, 32, 3))).shape
    (2, 10)
  """

  def __init__(self, rngs: nnx.Rngs):
    self.stem = layers.conv(3, CHANNELS, 3, rngs)
    self.norm_in = batch_norm(CHANNELS, rngs)
    self.deq = DEQ(ResNetCell(CHANNELS, 64, kernel_size=3, rngs=rngs),
                   jaxdeq.Anderson(tol=1e-2, max_steps=25, m=5),
                   jaxdeq.ImplicitAdjoint())
    self.norm_out = batch_norm(CHANNELS, rngs)
    self.head = layers.linear(CHANNELS * 4 * 4, 10, rngs)

  def features(self, images: jax.Array) -> jax.Array:
    """The DEQ layer's input x."""
    return self.norm_in(self.stem(images))

  def __call__(self, images: jax.Array) -> jax.Array:
    z = self.norm_out(self.deq(self.features(images)))
    return self.head(average_pool_8x8(z).reshape(z.shape[0], -1))


def average_pool_8x8(z: jax.Array) -> jax.Array:
  """Non-overlapping 8x8 mean pooling of NHWC maps.

  (`nnx.avg_pool` divides by an integer count, which strict dtype promotion
  refuses.)

  Example:
    >>> import jax.numpy as jnp
    >>> average_pool_8x8(jnp.ones((2, 32, 32, 3))).shape
    (2, 4, 4, 3)
  """
  batch, height, width, channels = z.shape
  blocks = z.reshape(batch, height // 8, 8, width // 8, 8, channels)
  return jnp.mean(blocks, axis=(2, 4))
