"""PyTorch-default initialisation, so that our tables compare with torch's."""

from __future__ import annotations

import math

import jax
from flax import nnx


def torch_uniform(fan_in: int):
  """U(+-1/sqrt(fan_in)): nn.Linear / nn.Conv2d defaults (kernel and bias)."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jax.numpy.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def linear(in_features: int, out_features: int, rngs: nnx.Rngs) -> nnx.Linear:
  """`nnx.Linear` initialised as `torch.nn.Linear`."""
  init = torch_uniform(in_features)
  return nnx.Linear(in_features, out_features, kernel_init=init,
                    bias_init=init, rngs=rngs)


def conv(in_channels: int, out_channels: int, kernel_size: int,
         rngs: nnx.Rngs) -> nnx.Conv:
  """'SAME' `nnx.Conv` with bias, initialised as `torch.nn.Conv2d`."""
  init = torch_uniform(in_channels * kernel_size * kernel_size)
  return nnx.Conv(in_channels, out_channels, (kernel_size, kernel_size),
                  padding="SAME", kernel_init=init, bias_init=init, rngs=rngs)
