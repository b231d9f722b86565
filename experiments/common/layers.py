"""Layers the experiments share: PyTorch-default initialisation (so that our
tables compare with torch's) and the DEQ options of the command line."""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdeq.nnx import VariationalDropout


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


class DeqOptions(NamedTuple):
  """The DEQ stabilisers an experiment's command line switches on.

  Attributes:
    jacobian_penalty: the penalty's loss weight (0: off).
    record_steps: fixed-point correction: supervise the iterates after
      these steps too.
    normalization: None, "weight" or "spectral" (the cell's kernels).
    dropout: variational dropout rate on the cell's output (0: off).
    eval_max_steps: the solver's step cap in evaluation (None: the same).
  """

  jacobian_penalty: float = 0.0
  record_steps: tuple[int, ...] = ()
  normalization: Optional[str] = None
  dropout: float = 0.0
  eval_max_steps: Optional[int] = None

  def deq_kwargs(self, rngs: nnx.Rngs) -> dict:
    """Keyword arguments of `jaxdeq.nnx.DEQ` for these options."""
    return dict(eval_max_steps=self.eval_max_steps,
                record_steps=self.record_steps,
                jacobian_penalty=self.jacobian_penalty > 0,
                normalization=self.normalization, rngs=rngs)

  def cell(self, cell: nnx.Module, rngs: nnx.Rngs,
           broadcast_dims: tuple[int, ...] = ()) -> nnx.Module:
    """`cell`, with variational dropout on its output when asked."""
    if not self.dropout:
      return cell
    return DroppedCell(cell, self.dropout, broadcast_dims, rngs)


class DroppedCell(nnx.Module):
  """f(z, x) = mask * cell(z, x), one mask per solve (variational dropout).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxdeq.nnx import TanhCell
    >>> cell = DroppedCell(TanhCell(4, rngs=nnx.Rngs(0)), 0.5, (),
    ...                    nnx.Rngs(1))
    >>> cell(jnp.zeros((2, 4)), jnp.ones((2, 4))).shape
    (2, 4)
  """

  def __init__(self, cell: nnx.Module, rate: float,
               broadcast_dims: tuple[int, ...], rngs: nnx.Rngs):
    self.inner = cell
    self.dropout = VariationalDropout(rate, broadcast_dims=broadcast_dims,
                                      rngs=rngs)

  def __call__(self, z, x):
    out = self.inner(z, x)
    if isinstance(out, tuple):
      return tuple(self.dropout(v) for v in out)
    return self.dropout(out)


def warm_start_z0(layer, x, warm):
  """z0 for a batch: each example's stored z* where it has one, else the
  layer's own initial state (`warm` = (stored rows, seen mask) or None)."""
  if warm is None:
    return None
  stored, seen = warm
  default = layer.initial_state(x)
  return jax.tree.map(
      lambda s, d: jnp.where(seen.reshape((-1,) + (1,) * (d.ndim - 1)),
                             s.astype(d.dtype), d), stored, default)
