"""Limited-memory good Broyden, as in the original DEQ papers."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdeq._src import control
from jaxdeq._src.solvers import base


class BroydenState(NamedTuple):
  """Low-rank inverse-Jacobian estimate -I + U^T V and the previous point.

  Attributes:
    us: (batch, memory, d) left factors.
    vs: (batch, memory, d) right factors.
    z_prev: (batch, d) previous iterate.
    g_prev: (batch, d) its residual f(z) - z.
  """

  us: jax.Array
  vs: jax.Array
  z_prev: jax.Array
  g_prev: jax.Array


@dataclasses.dataclass(frozen=True)
class Broyden(base.FixedPointSolver):
  """Good Broyden on g(z) = f(z) - z with a rank-`memory` inverse estimate.

  The inverse Jacobian of g starts at -I (so the first step is plain
  iteration) and receives one rank-one update per step in `memory` slots;
  when they are full the estimate restarts from -I (overwriting the oldest
  update instead diverged to inf on a badly conditioned linear map). Updates
  whose denominator vanishes (a frozen sample, a repeated point) are skipped
  rather than divided by zero.

  Attributes:
    tol: residual tolerance per sample.
    max_steps: most steps.
    memory: rank of the inverse-Jacobian estimate (>= 1).

  Examples:
    >>> import jax.numpy as jnp, jaxdeq
    >>> sol = jaxdeq.fixed_point(lambda z, a: jnp.cos(z), jnp.zeros((4, 1)),
    ...                          None, solver=jaxdeq.Broyden(tol=1e-6))
    >>> bool(jnp.allclose(sol.value, 0.739085, atol=1e-4))
    True
  """

  memory: int = 10

  def __post_init__(self):
    super().__post_init__()
    base.check_int(self, "memory", minimum=1)

  def init(self, f, z, fz, args) -> BroydenState:
    batch, size = z.shape
    spec = control.batch_spec(z)
    factors = control.full((batch, self.memory, size), 0, z.dtype,
                           None if spec is None else spec + (None, None))
    return BroydenState(factors, factors, z, jnp.zeros_like(z))

  def step(self, f, z, fz, args, state, step_index):
    flat_z = z
    g = fz - z
    us, vs = state.us, state.vs
    dz = flat_z - state.z_prev
    dg = g - state.g_prev
    # Good Broyden: H += (dz - H dg) dz^H H / (dz^H H dg); the conjugate is
    # the identity on real states.
    v = _rmatvec(us, vs, jnp.conj(dz))
    u_num = dz - _matvec(us, vs, dg)
    denom = jnp.sum(v * dg, axis=1, keepdims=True)
    tiny = jnp.finfo(z.dtype).tiny ** 0.5
    usable = (step_index > 0) & (jnp.abs(denom) > tiny) & jnp.all(
        jnp.isfinite(u_num) & jnp.isfinite(v), axis=1, keepdims=True)
    u = jnp.where(usable, u_num / jnp.where(usable, denom, 1), 0)
    v = jnp.where(usable, v, 0)
    slot = jnp.maximum(step_index - 1, 0) % self.memory
    # A full memory restarts from -I rather than overwriting its oldest
    # update: a ring of the latest updates is no Broyden estimate, and it
    # diverged to inf on a well-posed linear map.
    restart = (slot == 0) & (step_index > 1)
    us = jnp.where(restart, 0, us)
    vs = jnp.where(restart, 0, vs)
    us = jax.lax.dynamic_update_index_in_dim(us, u, slot, axis=1)
    vs = jax.lax.dynamic_update_index_in_dim(vs, v, slot, axis=1)
    z_next = flat_z - _matvec(us, vs, g)
    return z_next, BroydenState(us, vs, flat_z, g)


def _matvec(us, vs, x):
  """(-I + U^T V) x per sample."""
  return -x + jnp.einsum("bm,bmd->bd", jnp.einsum("bmd,bd->bm", vs, x), us)


def _rmatvec(us, vs, x):
  """x^T (-I + U^T V) per sample."""
  return -x + jnp.einsum("bm,bmd->bd", jnp.einsum("bmd,bd->bm", us, x), vs)


def inverse_rmatvec(state: BroydenState, x: jax.Array) -> jax.Array:
  """x^T H per sample, H = -I + U^T V the inverse-Jacobian estimate of
  g(z) = f(z) - z that `state` holds (what SHINE reuses)."""
  return _rmatvec(state.us, state.vs, x)
