"""Regularised Anderson acceleration, batched over the leading axis."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdeq._src import control
from jaxdeq._src.solvers import base


class AndersonState(NamedTuple):
  """History of the last `m` residuals and images, and their Gram matrix.

  Attributes:
    g_history: (batch, m, d) residuals f(z) - z of the flattened iterates;
      slot k % m holds step k. Kept rather than the iterates: the Gram
      row reads it directly (no (batch, m, d) subtraction per step).
    f_history: (batch, m, d) the images f(z).
    gram: (batch, m, m) inner products of the stored residuals (zero for
      unfilled slots). Each step computes only the new residual's row: m
      dot products of length d instead of m * m.
  """

  g_history: jax.Array
  f_history: jax.Array
  gram: jax.Array


@dataclasses.dataclass(frozen=True)
class Anderson(base.FixedPointSolver):
  """Anderson acceleration with Tikhonov regularisation.

  Each step mixes the last n = min(k + 1, m) images with weights alpha that
  minimise ||sum_i alpha_i (f(z_i) - z_i)||^2 + lam ||alpha||^2 subject to
  sum_i alpha_i = 1, per sample. With one stored pair the step is a damped
  plain iteration. Should the system be singular (lam = 0 and repeated
  iterates), the step falls back to the newest image instead of returning
  NaN.

  Attributes:
    tol: residual tolerance per sample.
    max_steps: most steps.
    m: history length (>= 1).
    lam: Tikhonov regularisation of the Gram matrix (>= 0).
    beta: mixing: z = beta * sum alpha f(z_i) + (1 - beta) * sum alpha z_i.
    lam_relative: scale `lam` by the mean diagonal of the Gram matrix (the
      default). An absolute `lam` swamps the Gram matrix once residuals are
      small, and Anderson then decays to averaging, slower than plain
      iteration; a relative `lam` keeps its acceleration down to the
      tolerance. The "Deep Implicit Layers" tutorial's (and torchdeq's)
      settings are `Anderson(m=5, lam=1e-4, lam_relative=False)`.

  Examples:
    >>> import jax.numpy as jnp, jaxdeq
    >>> W = 0.5 * jnp.eye(3)
    >>> sol = jaxdeq.fixed_point(lambda z, x: z @ W + x, jnp.zeros((2, 3)),
    ...                          jnp.ones((2, 3)),
    ...                          solver=jaxdeq.Anderson(tol=1e-6, max_steps=50))
    >>> bool(jnp.allclose(sol.value, 2.0, atol=1e-4))
    True
  """

  m: int = 5
  lam: float = 1e-6
  beta: float = 1.0
  lam_relative: bool = True

  def __post_init__(self):
    super().__post_init__()
    base.check_int(self, "m", minimum=1)
    base.check_number(self, "lam", positive=False)
    base.check_number(self, "beta", positive=True)

  def init(self, f, z, fz, args) -> AndersonState:
    batch, size = z.shape
    # Unfilled slots are never weighted (alpha is 0 there), so any finite
    # fill will do; two different fills keep XLA from merging them into one
    # broadcast that it then copies into the second loop-carried history.
    spec = control.batch_spec(z)
    spec = None if spec is None else spec + (None, None)
    shape = (batch, self.m, size)
    return AndersonState(control.full(shape, 0, z.dtype, spec),
                         control.full(shape, 1, z.dtype, spec),
                         control.full((batch, self.m, self.m), 0, z.dtype,
                                      spec))

  def step(self, f, z, fz, args, state, step_index):
    g = fz - z
    slot = step_index % self.m
    slots = jnp.arange(self.m, dtype=step_index.dtype)
    is_slot = (slots == slot)[None]
    # The histories are read before the new pair is written into them, the
    # newest pair's part added separately: reading the updated buffers made
    # XLA copy both (batch, m, d) histories up to four times per step.
    # row[i] = <g_i, g> = g_i^H g: the Gram matrix is Hermitian for complex
    # states (conj is the identity on real ones).
    row = jnp.where(is_slot, jnp.sum(jnp.conj(g) * g, axis=1, keepdims=True),
                    jnp.einsum("bmd,bd->bm", jnp.conj(state.g_history), g))
    gram = jnp.where(is_slot[:, :, None], jnp.conj(row)[:, None, :],
                     state.gram)
    gram = jnp.where(is_slot[:, None, :], row[:, :, None], gram)
    valid = slots <= step_index  # slots filled so far
    alpha = _mixing_weights(gram, valid, self.lam, slot, self.lam_relative)
    alpha_new = jnp.sum(jnp.where(is_slot, alpha, 0), axis=1, keepdims=True)
    alpha_old = jnp.where(is_slot, 0, alpha)
    mix = lambda history, new: (
        jnp.einsum("bm,bmd->bd", alpha_old, history) + alpha_new * new)
    z_next = mix(state.f_history, fz)
    if self.beta != 1.0:
      # sum alpha z = sum alpha f - sum alpha g
      z_next = z_next - (1 - self.beta) * mix(state.g_history, g)
    g_history = jax.lax.dynamic_update_index_in_dim(
        state.g_history, g, slot, axis=1)
    f_history = jax.lax.dynamic_update_index_in_dim(
        state.f_history, fz, slot, axis=1)
    return z_next, AndersonState(g_history, f_history, gram)


def _mixing_weights(gram: jax.Array, valid: jax.Array, lam: float,
                    newest: jax.Array, lam_relative: bool) -> jax.Array:
  """Anderson weights alpha, shape (batch, m), per sample.

  The constrained problem min ||alpha G||^2 + lam ||alpha||^2, sum alpha = 1
  (the tutorial's bordered system) has the solution alpha = w / sum(w) with
  (G G^T + lam I) w = 1. That m x m system is symmetric positive definite for
  lam > 0 and is solved by Gaussian elimination unrolled over the static m,
  vectorised over the batch: XLA:CPU's batched LU on thousands of 6 x 6
  systems cost more than the rest of the step.
  """
  m = gram.shape[1]
  dtype = gram.dtype
  pair_valid = (valid[:, None] & valid[None, :])[None]
  eye = jnp.eye(m, dtype=dtype)[None]
  if lam_relative:
    diagonal = jnp.where(valid, jnp.real(jnp.diagonal(gram, axis1=1, axis2=2)),
                         0)
    scale = jnp.sum(diagonal, axis=1) / jnp.sum(valid).astype(diagonal.dtype)
    lam = (lam * (scale + jnp.finfo(dtype).tiny)[:, None, None]).astype(dtype)
  # Unfilled slots become identity rows with a zero right-hand side: w = 0.
  system = jnp.where(pair_valid, gram + lam * eye, eye)
  rhs = jnp.broadcast_to(valid.astype(dtype), gram.shape[:2])
  w = _solve_unrolled(system, rhs)
  total = jnp.sum(w, axis=1, keepdims=True)
  alpha = w / total
  fallback = jax.nn.one_hot(newest, m, dtype=dtype)[None]
  ok = jnp.all(jnp.isfinite(alpha), axis=1, keepdims=True) & (total != 0)
  return jnp.where(ok, alpha, fallback)


def _solve_unrolled(a: jax.Array, b: jax.Array) -> jax.Array:
  """Solves a x = b for (batch, n, n) SPD `a` without pivoting, n static."""
  n = a.shape[-1]
  rows = [a[:, i, :] for i in range(n)]
  rhs = [b[:, i] for i in range(n)]
  for k in range(n):
    for i in range(k + 1, n):
      factor = rows[i][:, k] / rows[k][:, k]
      rows[i] = rows[i] - factor[:, None] * rows[k]
      rhs[i] = rhs[i] - factor * rhs[k]
  x = [None] * n
  for i in reversed(range(n)):
    acc = rhs[i]
    for j in range(i + 1, n):
      acc = acc - rows[i][:, j] * x[j]
    x[i] = acc / rows[i][:, i]
  return jnp.stack(x, axis=1)
