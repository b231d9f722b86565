"""Newton's method on g(z) = z - f(z), for small states."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxdeq._src import control
from jaxdeq._src import linear_solve
from jaxdeq._src.solvers import base

Jacobian = Callable[[jax.Array, Any], jax.Array]
_LINEAR_SOLVERS = ("dense", "gmres")


class NewtonState(NamedTuple):
  """Newton keeps no state between steps."""


@dataclasses.dataclass(frozen=True)
class Newton(base.FixedPointSolver):
  """Newton steps z <- z - J_g(z)^{-1} (z - f(z)), per sample.

  J_g = I - df/dz is a closed form when one is offered -- `jacobian` here,
  or else the map's `residual_jacobian(z, args)` method (the protocol
  `jaxdeq.nnx.TanhCell` implements: I - diag(sech^2(zW + x)) W^T) -- each
  returning (batch, d, d) in the per-sample raveled state; otherwise it is
  built from d forward-mode products of f (all samples at once). Either way
  the Jacobian is dense: Newton is for small states. Half-precision states
  are solved in float32 (LAPACK has no bfloat16).

  With `linear_solver="gmres"` each sample's Newton system is solved
  matrix-free by GMRES (one batched Jacobian-vector product of f per inner
  iteration, until every sample's residual is below `gmres_tol` relative to
  its right-hand side, at most `gmres_krylov_dim` iterations) instead of by
  LU; no Jacobian is formed. For the 100-wide tanh cell that replaces a
  batched 100x100 LU by a few matmuls. Inner tolerances of 1e-4 and looser
  (inexact Newton) orthogonalise the Krylov basis with one classical
  Gram-Schmidt pass, tighter ones with two (the second pass costs about as
  much as the inner iteration's Jacobian-vector product).

  Attributes:
    tol: residual tolerance per sample.
    max_steps: most Newton steps.
    jacobian: optional closed-form Jacobian of g, (z, args) -> (batch, d, d)
      (dense solver only); `fixed_point` hands it to the solve as the map's
      `residual_jacobian`.
    linear_solver: "dense" (batched LU) or "gmres" (matrix-free).
    gmres_tol: relative tolerance of each inner GMRES solve.
    gmres_krylov_dim: most inner GMRES iterations (its Krylov dimension; no
      restarts).

  Examples:
    >>> import jax.numpy as jnp, jaxdeq
    >>> sol = jaxdeq.fixed_point(lambda z, a: jnp.cos(z), jnp.zeros((2, 1)),
    ...                          None, solver=jaxdeq.Newton(tol=1e-6))
    >>> int(sol.stats.num_steps) <= 6
    True
  """

  jacobian: Optional[Jacobian] = None
  linear_solver: str = "dense"
  gmres_tol: float = 1e-3
  gmres_krylov_dim: int = 20

  def __post_init__(self):
    super().__post_init__()
    if self.jacobian is not None and not callable(self.jacobian):
      raise TypeError(
          f"Newton: jacobian must be callable (z, args) -> (batch, d, d), got"
          f" {self.jacobian!r}")
    if self.linear_solver not in _LINEAR_SOLVERS:
      raise ValueError(
          f"Newton: linear_solver must be one of {_LINEAR_SOLVERS}, got"
          f" {self.linear_solver!r}")
    base.check_number(self, "gmres_tol", positive=True, finite=True)
    base.check_int(self, "gmres_krylov_dim", minimum=1)

  def init(self, f, z, fz, args) -> NewtonState:
    return NewtonState()

  def step(self, f, z, fz, args, state, step_index):
    g = z - fz
    if self.linear_solver == "dense":
      delta = dense_solve(self._jacobian(f, z, args), g)
    else:
      delta = self._gmres(f, z, args, g)
    return z - delta, state

  def _jacobian(self, f, z, args) -> jax.Array:
    batch, size = z.shape
    closed_form = self.jacobian or getattr(f, "residual_jacobian", None)
    if closed_form is not None:
      jac = closed_form(z, args)
      if jac.shape != (batch, size, size):
        raise ValueError(
            f"Newton: the Jacobian of g(z) = z - f(z) must have shape"
            f" (batch, d, d) = {(batch, size, size)} for the raveled state of"
            f" shape {z.shape}, got {jac.shape}")
      return jac.astype(z.dtype)
    basis = jnp.eye(size, dtype=z.dtype)
    zeros = control.full(z.shape, 0, z.dtype, control.spec_of(z))

    def column(e):
      tangent = zeros + e[None]
      return jax.jvp(lambda y: f(y, args), (z,), (tangent,))[1]

    # Samples are independent, so one tangent e_j for every sample at once
    # yields column j of every sample's Jacobian.
    columns = jax.vmap(column)(basis)  # (d, batch, d)
    return basis[None] - jnp.moveaxis(columns, 0, 2)

  def _gmres(self, f, z, args, g):
    # One linearisation per Newton step: each inner iteration then costs one
    # tangent product of f (for the tanh cell one matmul for the whole batch).
    _, f_jvp = jax.linearize(lambda y: f(y, args), z)

    def matvec(v):
      return v - f_jvp(v)

    solve = functools.partial(linear_solve.batched_gmres, tol=self.gmres_tol,
                              max_iters=self.gmres_krylov_dim,
                              reorthogonalize=self.gmres_tol < 1e-4)
    # custom_linear_solve differentiates the solve implicitly (a transposed
    # GMRES solve), never through the Krylov iterations.
    return jax.lax.custom_linear_solve(matvec, g, solve=solve,
                                       transpose_solve=solve)


@jax.custom_vjp
def dense_solve(jac: jax.Array, rhs: jax.Array) -> jax.Array:
  """Batched J^{-1} rhs, (batch, d, d) x (batch, d) -> (batch, d).

  Its VJP reuses the forward LU factors: one transposed solve and an outer
  product per sample.
  """
  return jnp.linalg.solve(jac, rhs[..., None])[..., 0]


def _dense_solve_fwd(jac, rhs):
  factors = jax.scipy.linalg.lu_factor(jac)
  delta = jax.scipy.linalg.lu_solve(factors, rhs[..., None])[..., 0]
  return delta, (factors, delta)


def _dense_solve_bwd(residuals, cotangent):
  factors, delta = residuals
  # d(J^{-1} b) = J^{-1} (db - dJ J^{-1} b): with u = J^{-T} ct,
  # ct_b = u and ct_J = -u delta^T.
  u = jax.scipy.linalg.lu_solve(factors, cotangent[..., None], trans=1)[..., 0]
  return -u[:, :, None] * delta[:, None, :], u


dense_solve.defvjp(_dense_solve_fwd, _dense_solve_bwd)
