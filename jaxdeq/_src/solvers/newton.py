"""Newton's method on g(z) = z - f(z), for small states."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax

from jaxdeq._src import linear_solve
from jaxdeq._src.solvers import base

Jacobian = Callable[[jax.Array, Any], jax.Array]
# Kept importable from here: the dense solve Newton's steps use by default.
dense_solve = linear_solve.dense_solve


class NewtonState(NamedTuple):
  """Newton keeps no state between steps."""


@dataclasses.dataclass(frozen=True)
class Newton(base.FixedPointSolver):
  """Newton steps z <- z - J_g(z)^{-1} (z - f(z)), per sample.

  Each step solves J_g(z) delta = z - f(z) with `linear_solver`:

  - `jaxdeq.DenseLU()` (the default): a batched LU of the dense Jacobian.
    J_g = I - df/dz is a closed form when one is offered -- `jacobian`
    here, or else the map's `residual_jacobian(z, args)` method (the
    protocol `jaxdeq.nnx.TanhCell` implements: I - diag(sech^2(zW + x)) W^T)
    -- each returning (batch, d, d) in the per-sample raveled state;
    otherwise it is built from d forward-mode products of f (all samples at
    once). Newton is then for small states. Half-precision states are solved
    in float32 (LAPACK has no bfloat16).
  - `jaxdeq.GMRES(tol=1e-3, max_restarts=0)` (inexact Newton): each system
    solved matrix-free, one batched Jacobian-vector product of f per inner
    iteration; no Jacobian is formed. For the 100-wide tanh cell that
    replaces a batched 100x100 LU by a few matmuls.
  - any lineax solver (lineax installed), on the batch's block-diagonal
    system.

  Each inner solve is differentiated as the solution of its system, never
  through its iterations.

  Attributes:
    tol: residual tolerance per sample.
    max_steps: most Newton steps.
    jacobian: optional closed-form Jacobian of g, (z, args) -> (batch, d, d),
      for solvers that use a matrix; `fixed_point` hands it to the solve as
      the map's `residual_jacobian`.
    linear_solver: solver of each Newton system (default `DenseLU()`).

  Examples:
    >>> import jax.numpy as jnp, jaxdeq
    >>> sol = jaxdeq.fixed_point(lambda z, a: jnp.cos(z), jnp.zeros((2, 1)),
    ...                          None, solver=jaxdeq.Newton(tol=1e-6))
    >>> int(sol.stats.num_steps) <= 6
    True
    >>> inexact = jaxdeq.Newton(tol=1e-6, linear_solver=jaxdeq.GMRES(
    ...     tol=1e-3, krylov_dim=10, max_restarts=0))
  """

  jacobian: Optional[Jacobian] = None
  linear_solver: Any = None

  def __post_init__(self):
    super().__post_init__()
    if self.jacobian is not None and not callable(self.jacobian):
      raise TypeError(
          f"Newton: jacobian must be callable (z, args) -> (batch, d, d), got"
          f" {self.jacobian!r}")
    if isinstance(self.linear_solver, (str, base.FixedPointSolver)):
      raise TypeError(
          f"Newton: linear_solver must be jaxdeq.DenseLU(), jaxdeq.GMRES() or"
          f" a lineax solver, got {self.linear_solver!r}")
    if self.linear_solver is not None:
      try:
        linear_solve.as_linear_solver(self.linear_solver)
      except TypeError as error:
        raise TypeError(f"Newton: {error}") from None

  def _linear(self) -> linear_solve.AbstractLinearSolver:
    if self.linear_solver is None:
      return linear_solve.DenseLU()
    return linear_solve.as_linear_solver(self.linear_solver)

  def init(self, f, z, fz, args) -> NewtonState:
    return NewtonState()

  def step(self, f, z, fz, args, state, step_index):
    g = z - fz
    solver = self._linear()
    matrix = self._closed_form(f, z, args) if solver.uses_matrix else None
    if matrix is not None:
      delta = solver.differentiable_solve(None, g, matrix=matrix)
    else:
      # One linearisation per Newton step: each product then costs one
      # tangent product of f (for the tanh cell one matmul for the batch).
      _, f_jvp = jax.linearize(lambda y: f(y, args), z)
      delta = solver.differentiable_solve(lambda v: v - f_jvp(v), g)
    return z - delta, state

  def _closed_form(self, f, z, args) -> Optional[jax.Array]:
    batch, size = z.shape
    closed_form = self.jacobian or getattr(f, "residual_jacobian", None)
    if closed_form is None:
      return None
    jac = closed_form(z, args)
    if jac.shape != (batch, size, size):
      raise ValueError(
          f"Newton: the Jacobian of g(z) = z - f(z) must have shape"
          f" (batch, d, d) = {(batch, size, size)} for the raveled state of"
          f" shape {z.shape}, got {jac.shape}")
    return jac.astype(z.dtype)
