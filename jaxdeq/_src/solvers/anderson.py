"""Regularised Anderson acceleration, batched over the leading axis."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdeq._src.solvers import base


class AndersonState(NamedTuple):
  """History of the last `m` iterates and their images.

  Attributes:
    z_history: (batch, m, d) flattened iterates, slot k % m holds step k.
    f_history: (batch, m, d) their images f(z).
  """

  z_history: jax.Array
  f_history: jax.Array


@dataclasses.dataclass(frozen=True)
class Anderson(base.FixedPointSolver):
  """Anderson acceleration with Tikhonov regularisation (the tutorial's).

  Each step mixes the last n = min(k + 1, m) images with weights alpha that
  minimise ||sum_i alpha_i (f(z_i) - z_i)||^2 + lam ||alpha||^2 subject to
  sum_i alpha_i = 1, per sample. With one stored pair the step is a damped
  plain iteration. Should the bordered system still be singular (lam = 0 and
  repeated iterates), the step falls back to the newest image instead of
  returning NaN.

  Attributes:
    tol: residual tolerance per sample.
    max_steps: most steps.
    m: history length (>= 1).
    lam: Tikhonov regularisation of the Gram matrix (>= 0).
    beta: mixing: z = beta * sum alpha f(z_i) + (1 - beta) * sum alpha z_i.

  Example:
    >>> import jax.numpy as jnp, jaxdeq
    >>> W = 0.5 * jnp.eye(3)
    >>> sol = jaxdeq.fixed_point(lambda z, x: z @ W + x, jnp.zeros((2, 3)),
    ...                          jnp.ones((2, 3)),
    ...                          solver=jaxdeq.Anderson(tol=1e-6, max_steps=50))
    >>> bool(jnp.allclose(sol.value, 2.0, atol=1e-4))
    True
  """

  m: int = 5
  lam: float = 1e-4
  beta: float = 1.0

  def __post_init__(self):
    super().__post_init__()
    base.check_int(self, "m", minimum=1)
    base.check_number(self, "lam", positive=False)
    base.check_number(self, "beta", positive=True)

  def init(self, f, z, fz, args) -> AndersonState:
    batch = z.shape[0]
    zeros = jnp.zeros((batch, self.m, z[0].size), z.dtype)
    return AndersonState(zeros, zeros)

  def step(self, f, z, fz, args, state, step_index):
    batch = z.shape[0]
    slot = step_index % self.m
    z_history = jax.lax.dynamic_update_index_in_dim(
        state.z_history, z.reshape(batch, -1), slot, axis=1)
    f_history = jax.lax.dynamic_update_index_in_dim(
        state.f_history, fz.reshape(batch, -1), slot, axis=1)
    valid = jnp.arange(self.m, dtype=step_index.dtype) <= step_index  # slots filled so far
    alpha = _mixing_weights(f_history - z_history, valid, self.lam, slot)
    mixed_f = jnp.einsum("bm,bmd->bd", alpha, f_history)
    if self.beta == 1.0:
      z_next = mixed_f
    else:
      mixed_z = jnp.einsum("bm,bmd->bd", alpha, z_history)
      z_next = self.beta * mixed_f + (1 - self.beta) * mixed_z
    return z_next.reshape(z.shape), AndersonState(z_history, f_history)


def _mixing_weights(residuals: jax.Array, valid: jax.Array, lam: float,
                    newest: jax.Array) -> jax.Array:
  """Solves the bordered least-squares system for alpha, shape (batch, m)."""
  batch, m, _ = residuals.shape
  dtype = residuals.dtype
  gram = jnp.einsum("bid,bjd->bij", residuals, residuals)
  pair_valid = valid[:, None] & valid[None, :]
  # Unfilled slots become identity rows with a zero border: their alpha is 0.
  eye = jnp.eye(m, dtype=dtype)
  gram = jnp.where(pair_valid, gram + lam * eye, eye)
  border = valid.astype(dtype)
  top = jnp.concatenate([jnp.zeros((1,), dtype), border])
  bordered = jnp.concatenate(
      [jnp.broadcast_to(top, (batch, 1, m + 1)),
       jnp.concatenate(
           [jnp.broadcast_to(border[:, None], (batch, m, 1)), gram], axis=2)],
      axis=1)
  rhs = jnp.zeros((batch, m + 1), dtype).at[:, 0].set(1)
  alpha = jnp.linalg.solve(bordered, rhs[..., None])[:, 1:, 0]
  fallback = jax.nn.one_hot(newest, m, dtype=dtype)
  ok = jnp.all(jnp.isfinite(alpha), axis=1, keepdims=True)
  return jnp.where(ok, alpha, fallback)
