"""Flax NNX cells f(z, x) for equilibrium layers."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.custom_derivatives import SymbolicZero

from jaxdeq._src.nnx.conv import conv2d_same


@jax.custom_jvp
def _matmul(z: jax.Array, kernel: jax.Array) -> jax.Array:
  """z @ kernel, whose kernel cotangent is a row-major product.

  JAX differentiates z @ W into z^T g for W's cotangent: a product that
  contracts z's leading (batch) axis, which XLA:CPU's YNNPACK declines and
  Eigen runs slower than a row-major product. The rule below keeps z^T as
  the residual instead, so the reverse pass reads it row-major.
  """
  return z @ kernel


def _matmul_jvp(primals, tangents):
  z, kernel = primals
  dz, dkernel = tangents
  out = z @ kernel
  parts = []
  if not isinstance(dz, SymbolicZero):
    parts.append(dz @ kernel)
  if not isinstance(dkernel, SymbolicZero):
    z_t = z.reshape(-1, z.shape[-1]).T
    parts.append(jax.lax.dot_general(
        z_t, dkernel, (((0,), (0,)), ((), ()))).reshape(out.shape))
  if not parts:
    return out, jnp.zeros_like(out)
  return out, sum(parts[1:], parts[0])


_matmul.defjvp(_matmul_jvp, symbolic_zeros=True)


class TanhCell(nnx.Module):
  """z -> tanh(z W + x), W without bias: the tutorial's tanh layer.

  W is initialised as PyTorch's `nn.Linear` is, U(+-1/sqrt(features)). The
  cell offers `residual_jacobian`, the closed-form Jacobian of
  g(z) = z - f(z) that `Newton` uses. Its product zW has a JVP rule of its
  own (forward, reverse and higher-order autodiff all go through it) that
  keeps z^T for W's cotangent, a product XLA:CPU runs faster row-major.

  Args:
    features: width of z and x.
    rngs: `nnx.Rngs` for the initialisation.
    param_dtype: dtype of W.

  Examples:
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
    return jnp.tanh(_matmul(z, self.kernel[...].astype(z.dtype)) + x)

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

  Examples:
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

  Same result as `nnx.GroupNorm` (one-pass variance, as its default), and
  faster forward and backward on XLA:CPU: reducing over the spatial axes
  first leaves XLA a plain row reduction instead of a grouped one.
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


class MultiscaleCell(nnx.Module):
  """An MDEQ-style multi-resolution cell; its state is a tuple of maps.

  Branch i works at 1/2^i of the input resolution with `channels[i]`
  channels (MDEQ-small: (24, 48)). Each step runs one block per branch,
  GN(relu(GN(x_i + conv(relu(GN(conv(z_i))))))), then fuses the branches:
  every
  output branch sums its own map, the upsampled (1x1 conv + GroupNorm +
  nearest neighbour) lower-resolution maps and the downsampled (3x3 conv +
  GroupNorm + 2x2 mean pool) higher-resolution maps, then ReLU and
  GroupNorm (Bai et al., 2020, "Multiscale deep equilibrium models").
  All convolutions are stride 1 (`conv2d_same`, fast inside solver loops);
  downsampling pools after the convolution. Unlike MDEQ's blocks, z_i has
  no identity skip: through the GroupNorms it kept the map's spectral radius
  at ~1.0 at initialisation (the solve stalled at a 2e-2 residual), without
  it ~0.1.

  z = (z_0, z_1, ...) and x = (x_0, x_1, ...), z_i and x_i of shape
  (batch, H / 2^i, W / 2^i, channels[i]); `cell(z, x)` returns that tuple.

  Args:
    channels: channels per branch, finest first (2 or more branches).
    num_groups: GroupNorm groups (must divide every channel count).
    rngs: `nnx.Rngs`.
    param_dtype: parameter dtype.

  Examples:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxdeq.nnx import MultiscaleCell
    >>> cell = MultiscaleCell((8, 16), num_groups=4, rngs=nnx.Rngs(0))
    >>> z = (jnp.zeros((2, 8, 8, 8)), jnp.zeros((2, 4, 4, 16)))
    >>> [v.shape for v in cell(z, z)]
    [(2, 8, 8, 8), (2, 4, 4, 16)]
  """

  def __init__(self, channels: tuple[int, ...] = (24, 48), num_groups: int = 4,
               *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32):
    channels = tuple(channels)
    if len(channels) < 2 or any(
        not isinstance(c, int) or c < 1 for c in channels):
      raise ValueError(f"MultiscaleCell: channels must be 2 or more positive"
                       f" ints, got {channels!r}")
    for c in channels:
      if c % num_groups:
        raise ValueError(f"MultiscaleCell: num_groups={num_groups} must divide"
                         f" every channel count, got {channels}")
    self.channels = channels

    def kernel(size, c_in, c_out):
      # He-style scale, damped so that the cell starts contractive.
      std = 0.1 * math.sqrt(2.0 / (size * size * c_in))
      return nnx.Param(std * jax.random.normal(
          rngs.params(), (size, size, c_in, c_out), param_dtype))

    def norm(c):
      return nnx.GroupNorm(c, num_groups=num_groups, epsilon=1e-5,
                           param_dtype=param_dtype, rngs=rngs)

    self.block_conv1 = nnx.List([kernel(3, c, c) for c in channels])
    self.block_conv2 = nnx.List([kernel(3, c, c) for c in channels])
    self.block_norm1 = nnx.List([norm(c) for c in channels])
    self.block_norm2 = nnx.List([norm(c) for c in channels])
    self.block_norm3 = nnx.List([norm(c) for c in channels])
    # fuse_conv[i][j] brings branch j to branch i (None on the diagonal).
    self.fuse_conv = nnx.List([
        nnx.List([kernel(1 if j > i else 3, channels[j], channels[i])
                  for j in range(len(channels)) if j != i])
        for i in range(len(channels))])
    self.fuse_norm = nnx.List([
        nnx.List([norm(channels[i]) for j in range(len(channels)) if j != i])
        for i in range(len(channels))])
    self.out_norm = nnx.List([norm(c) for c in channels])

  def __call__(self, z: tuple, x: tuple) -> tuple:
    if len(z) != len(self.channels) or len(x) != len(self.channels):
      raise ValueError(f"MultiscaleCell: z and x must be tuples of"
                       f" {len(self.channels)} maps, got {len(z)} and {len(x)}")
    dtype = z[0].dtype
    blocks = []
    for i, (z_i, x_i) in enumerate(zip(z, x)):
      y = jax.nn.relu(group_norm(
          conv2d_same(z_i, self.block_conv1[i][...].astype(dtype)),
          self.block_norm1[i]))
      y = group_norm(conv2d_same(y, self.block_conv2[i][...].astype(dtype))
                     + x_i, self.block_norm2[i])
      blocks.append(group_norm(jax.nn.relu(y), self.block_norm3[i]))
    out = []
    for i in range(len(blocks)):
      total = blocks[i]
      others = [j for j in range(len(blocks)) if j != i]
      for k, j in enumerate(others):
        moved = group_norm(
            conv2d_same(blocks[j], self.fuse_conv[i][k][...].astype(dtype)),
            self.fuse_norm[i][k])
        total = total + _resample(moved, i - j)
      out.append(group_norm(jax.nn.relu(total), self.out_norm[i]))
    return tuple(out)


def _resample(x: jax.Array, levels: int) -> jax.Array:
  """Nearest-neighbour upsampling (levels < 0) or 2x2-mean downsampling
  (levels > 0) by 2^|levels| in each spatial axis."""
  factor = 2 ** abs(levels)
  if levels < 0:
    return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)
  if levels > 0:
    batch, height, width, channels = x.shape
    blocks = x.reshape(batch, height // factor, factor, width // factor,
                       factor, channels)
    return jnp.mean(blocks, axis=(2, 4))
  return x
