"""Flax NNX cells f(z, x) for equilibrium layers."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdeq._src.nnx.conv import conv2d_same


class TanhCell(nnx.Module):
  """z -> tanh(z W + x), W without bias: the tutorial's tanh layer.

  W is initialised as PyTorch's `nn.Linear` is, U(+-1/sqrt(features)). The
  cell offers `residual_jacobian`, the closed-form Jacobian of
  g(z) = z - f(z) that `Newton` uses.

  Args:
    features: width of z and x.
    rngs: `nnx.Rngs` for the initialisation.
    param_dtype: dtype of W.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxdeq.nnx import TanhCell
    >>> cell = TanhCell(4, rngs=nnx.Rngs(0))
    >>> cell(jnp.zeros((2, 4)), jnp.ones((2, 4))).shape
    (2, 4)
  """

  def __init__(self, features: int, *, rngs: nnx.Rngs,
               param_dtype: Any = jnp.float32):
    if not isinstance(features, int) or features < 1:
      raise ValueError(f"TanhCell: features must be a positive int, got"
                       f" {features!r}")
    bound = 1.0 / math.sqrt(features)
    self.features = features
    self.kernel = nnx.Param(jax.random.uniform(
        rngs.params(), (features, features), param_dtype, -bound, bound))

  def __call__(self, z: jax.Array, x: jax.Array) -> jax.Array:
    return jnp.tanh(z @ self.kernel[...].astype(z.dtype) + x)

  def residual_jacobian(self, z: jax.Array, x: jax.Array) -> jax.Array:
    """Jacobian of g(z) = z - f(z, x): I - diag(sech^2(zW + x)) W^T.

    Returns:
      (batch, features, features).
    """
    kernel = self.kernel[...].astype(z.dtype)
    sech2 = 1 - jnp.tanh(z @ kernel + x) ** 2
    return (jnp.eye(self.features, dtype=z.dtype)[None]
            - sech2[:, :, None] * kernel.T[None])


class ResNetCell(nnx.Module):
  """The tutorial's ResNetLayer, NHWC: conv -> ReLU -> GroupNorm, residual.

  y = GN1(relu(conv1(z))); f(z, x) = GN3(relu(z + GN2(x + conv2(y)))).
  Convolutions have no bias, weights ~ N(0, 0.01^2), and a loop-friendly VJP
  (see `conv2d_same`). GroupNorm uses PyTorch's epsilon 1e-5.

  Args:
    channels: channels of z and x.
    inner_channels: channels of y.
    kernel_size: odd spatial size of both convolutions.
    num_groups: groups of every GroupNorm (must divide both channel counts).
    rngs: `nnx.Rngs` for the initialisation.
    param_dtype: dtype of the parameters.

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxdeq.nnx import ResNetCell
    >>> cell = ResNetCell(8, 16, rngs=nnx.Rngs(0))
    >>> cell(jnp.zeros((2, 5, 5, 8)), jnp.ones((2, 5, 5, 8))).shape
    (2, 5, 5, 8)
  """

  def __init__(self, channels: int, inner_channels: int, kernel_size: int = 3,
               num_groups: int = 8, *, rngs: nnx.Rngs,
               param_dtype: Any = jnp.float32):
    if kernel_size % 2 != 1:
      raise ValueError(f"ResNetCell: kernel_size must be odd, got"
                       f" {kernel_size}")
    for name, count in (("channels", channels),
                        ("inner_channels", inner_channels)):
      if count % num_groups:
        raise ValueError(f"ResNetCell: num_groups={num_groups} must divide"
                         f" {name}={count}")
    shape1 = (kernel_size, kernel_size, channels, inner_channels)
    shape2 = (kernel_size, kernel_size, inner_channels, channels)
    self.conv1 = nnx.Param(
        0.01 * jax.random.normal(rngs.params(), shape1, param_dtype))
    self.conv2 = nnx.Param(
        0.01 * jax.random.normal(rngs.params(), shape2, param_dtype))

    def norm(features):
      return nnx.GroupNorm(features, num_groups=num_groups, epsilon=1e-5,
                           param_dtype=param_dtype, rngs=rngs)

    self.norm1 = norm(inner_channels)
    self.norm2 = norm(channels)
    self.norm3 = norm(channels)

  def __call__(self, z: jax.Array, x: jax.Array) -> jax.Array:
    conv1 = self.conv1[...].astype(z.dtype)
    conv2 = self.conv2[...].astype(z.dtype)
    y = group_norm(jax.nn.relu(conv2d_same(z, conv1)), self.norm1)
    return group_norm(
        jax.nn.relu(z + group_norm(x + conv2d_same(y, conv2), self.norm2)),
        self.norm3)


def group_norm(x: jax.Array, norm: nnx.GroupNorm) -> jax.Array:
  """`norm(x)` for NHWC `x`, with the statistics as per-channel sums.

  Same result as `nnx.GroupNorm` (one-pass variance, as its default), ~5x
  faster forward and ~2.5x faster VJP on XLA:CPU for a 10 x 32 x 32 x 64 map:
  reducing over the spatial axes first leaves XLA a plain row reduction
  instead of a grouped one.
  """
  batch, channels = x.shape[0], x.shape[-1]
  groups = norm.num_groups
  per_group = channels // groups
  flat = x.reshape(batch, -1, channels)
  count = flat.shape[1] * per_group
  mean = jnp.sum(flat, axis=1).reshape(batch, groups, per_group).sum(-1) / count
  mean_sq = jnp.sum(flat * flat, axis=1).reshape(batch, groups,
                                                  per_group).sum(-1) / count
  inv = jax.lax.rsqrt(jnp.maximum(mean_sq - mean * mean, 0) + norm.epsilon)
  scale = (jnp.repeat(inv, per_group, axis=1)
           * norm.scale[...].astype(x.dtype)[None])
  shift = (norm.bias[...].astype(x.dtype)[None]
           - jnp.repeat(mean, per_group, axis=1) * scale)
  return x * scale[:, None, None, :] + shift[:, None, None, :]
