"""The CIFAR-10 models: the tutorial's (64,842 parameters) and MDEQ-small."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx

import jaxdeq
from experiments.common import layers
from jaxdeq.nnx import DEQ, MultiscaleCell, ResNetCell

CHANNELS = 48
MDEQ_CHANNELS = (24, 48)


def batch_norm(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
  # PyTorch's BatchNorm2d: momentum 0.1 (flax counts the other way), eps 1e-5.
  return nnx.BatchNorm(features, momentum=0.9, epsilon=1e-5, rngs=rngs)


class CifarDEQ(nnx.Module):
  """conv 3->48 + BN, DEQ(ResNetCell(48, 64)), BN, 8x8 avg pool, 768->10.

  `in_channels=1` takes MNIST-format images (28x28: 7x7 pooling, the same
  4x4 grid of features).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> CifarDEQ(nnx.Rngs(0))(jnp.zeros((2, 32, 32, 3))).shape
    (2, 10)
    >>> CifarDEQ(nnx.Rngs(0), in_channels=1)(jnp.zeros((2, 28, 28, 1))).shape
    (2, 10)
  """

  def __init__(self, rngs: nnx.Rngs,
               options: Optional[layers.DeqOptions] = None,
               in_channels: int = 3):
    options = options or layers.DeqOptions()
    self.stem = layers.conv(in_channels, CHANNELS, 3, rngs)
    self.norm_in = batch_norm(CHANNELS, rngs)
    cell = options.cell(ResNetCell(CHANNELS, 64, kernel_size=3, rngs=rngs),
                        rngs, broadcast_dims=(1, 2))
    self.deq = DEQ(cell, jaxdeq.Anderson(tol=1e-2, max_steps=25, m=5,
                                   lam=1e-4, lam_relative=False),
                   jaxdeq.ImplicitAdjoint(), **options.deq_kwargs(rngs))
    self.norm_out = batch_norm(CHANNELS, rngs)
    self.head = layers.linear(CHANNELS * 4 * 4, 10, rngs)

  def features(self, images: jax.Array) -> jax.Array:
    """The DEQ layer's input x."""
    return self.norm_in(self.stem(images))

  def classify(self, z: jax.Array) -> jax.Array:
    return self.head(average_pool_to_4x4(self.norm_out(z)).reshape(
        z.shape[0], -1))

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.classify(self.deq(self.features(images)))

  def forward(self, images: jax.Array, warm=None):
    """(logits, logits of the correction states, z*)."""
    x = self.features(images)
    sol = self.deq.solve(x, z0=layers.warm_start_z0(self.deq, x, warm))
    extra = []
    if sol.states:
      # The correction states go through the same BatchNorm with batch
      # statistics, without moving its running averages.
      saved = jax.tree.map(jnp.copy, nnx.state(self.norm_out, nnx.BatchStat))
      extra = [self.classify(s) for s in sol.states]
      nnx.update(self.norm_out, saved)
    return self.classify(sol.value), extra, sol.value


class CifarMDEQ(nnx.Module):
  """MDEQ-small: a 2-branch `MultiscaleCell` (24 ch at 32x32, 48 at 16x16).

  Stem: conv 3->24 + BN for the full-resolution injection, then conv 24->48,
  2x2 mean pool and BN for the half-resolution one. Head: global average
  pool of each branch, concatenated (72), linear to 10.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> CifarMDEQ(nnx.Rngs(0))(jnp.zeros((2, 32, 32, 3))).shape
    (2, 10)
  """

  def __init__(self, rngs: nnx.Rngs,
               options: Optional[layers.DeqOptions] = None,
               in_channels: int = 3):
    options = options or layers.DeqOptions()
    fine, coarse = MDEQ_CHANNELS
    self.stem = layers.conv(in_channels, fine, 3, rngs)
    self.norm_fine = batch_norm(fine, rngs)
    self.down = layers.conv(fine, coarse, 3, rngs)
    self.norm_coarse = batch_norm(coarse, rngs)
    cell = options.cell(MultiscaleCell(MDEQ_CHANNELS, num_groups=4,
                                       rngs=rngs), rngs,
                        broadcast_dims=(1, 2))
    self.deq = DEQ(cell, jaxdeq.Anderson(tol=1e-2, max_steps=25, m=5,
                                   lam=1e-4, lam_relative=False),
                   jaxdeq.ImplicitAdjoint(), **options.deq_kwargs(rngs))
    self.head = layers.linear(fine + coarse, 10, rngs)

  def features(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The DEQ layer's input x: one injection per branch."""
    fine = self.norm_fine(self.stem(images))
    coarse = self.norm_coarse(_mean_pool_2x2(self.down(jax.nn.relu(fine))))
    return fine, coarse

  def classify(self, z: tuple) -> jax.Array:
    pooled = [jnp.mean(v, axis=(1, 2)) for v in z]
    return self.head(jnp.concatenate(pooled, axis=1))

  def __call__(self, images: jax.Array) -> jax.Array:
    return self.classify(self.deq(self.features(images)))

  def forward(self, images: jax.Array, warm=None):
    """(logits, logits of the correction states, z*)."""
    x = self.features(images)
    sol = self.deq.solve(x, z0=layers.warm_start_z0(self.deq, x, warm))
    return (self.classify(sol.value),
            [self.classify(s) for s in sol.states or ()], sol.value)


MODELS = {"deq_resnet": CifarDEQ, "mdeq_small": CifarMDEQ}


def _mean_pool_2x2(z: jax.Array) -> jax.Array:
  batch, height, width, channels = z.shape
  return jnp.mean(z.reshape(batch, height // 2, 2, width // 2, 2, channels),
                  axis=(2, 4))


def average_pool_to_4x4(z: jax.Array) -> jax.Array:
  """Non-overlapping mean pooling of NHWC maps to a 4x4 grid (8x8 blocks for
  32x32 maps, 7x7 for 28x28).

  (`nnx.avg_pool` divides by an integer count, which strict dtype promotion
  refuses.)

  Example:
    >>> import jax.numpy as jnp
    >>> average_pool_to_4x4(jnp.ones((2, 32, 32, 3))).shape
    (2, 4, 4, 3)
    >>> average_pool_to_4x4(jnp.ones((2, 28, 28, 3))).shape
    (2, 4, 4, 3)
  """
  batch, height, width, channels = z.shape
  if height % 4 or width % 4:
    raise ValueError(f"maps of {height}x{width} do not pool to 4x4")
  bh, bw = height // 4, width // 4
  blocks = z.reshape(batch, 4, bh, 4, bw, channels)
  return jnp.mean(blocks, axis=(2, 4))
