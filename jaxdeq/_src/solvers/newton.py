"""Newton's method on g(z) = z - f(z), for small states."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxdeq._src.solvers import base

Jacobian = Callable[[jax.Array, Any], jax.Array]
_LINEAR_SOLVERS = ("dense", "gmres")


class NewtonState(NamedTuple):
  """Newton keeps no state between steps."""


@dataclasses.dataclass(frozen=True)
class Newton(base.FixedPointSolver):
  """Newton steps z <- z - J_g(z)^{-1} (z - f(z)), per sample.

  J_g = I - df/dz is either a user-supplied closed form `jacobian(z, args)`
  returning (batch, d, d) (for the tanh cell: I - diag(sech^2(Wz + x)) W), or
  built from d forward-mode products of f (all samples at once). Either way the
  Jacobian is dense: Newton is for small states.

  With `linear_solver="gmres"` the Newton system is solved matrix-free (one
  Jacobian-vector product per inner iteration, to a relative accuracy of
  `gmres_tol`) instead of by LU; `jacobian`, if given, is then applied as a
  matrix and the forward-mode products are not needed at all.

  Attributes:
    tol: residual tolerance per sample.
    max_steps: most Newton steps.
    jacobian: optional closed-form Jacobian of g, (z, args) -> (batch, d, d).
    linear_solver: "dense" (batched LU) or "gmres" (matrix-free).
    gmres_tol: relative tolerance of each inner GMRES solve.
    gmres_restart: Krylov dimension of the inner GMRES solve.

  Example:
    >>> import jax.numpy as jnp, jaxdeq
    >>> sol = jaxdeq.fixed_point(lambda z, a: jnp.cos(z), jnp.zeros((2, 1)),
    ...                          None, solver=jaxdeq.Newton(tol=1e-8))
    >>> int(sol.stats.num_steps) <= 6
    True
  """

  jacobian: Optional[Jacobian] = None
  linear_solver: str = "dense"
  gmres_tol: float = 1e-3
  gmres_restart: int = 20

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
    base.check_number(self, "gmres_tol", positive=True)
    base.check_int(self, "gmres_restart", minimum=1)

  def init(self, f, z, fz, args) -> NewtonState:
    return NewtonState()

  def step(self, f, z, fz, args, state, step_index):
    batch = z.shape[0]
    g = (z - fz).reshape(batch, -1)
    if self.linear_solver == "dense":
      delta = dense_solve(self._jacobian(f, z, args), g)
    else:
      delta = self._gmres(f, z, args, g)
    return (z.reshape(batch, -1) - delta).reshape(z.shape), state

  def _jacobian(self, f, z, args) -> jax.Array:
    batch = z.shape[0]
    if self.jacobian is not None:
      jac = self.jacobian(z, args)
      size = z[0].size
      if jac.shape != (batch, size, size):
        raise ValueError(
            f"Newton: jacobian(z, args) must return shape {(batch, size, size)}"
            f" for z of shape {z.shape}, got {jac.shape}")
      return jac
    size = z[0].size
    basis = jnp.eye(size, dtype=z.dtype)

    def column(e):
      tangent = jnp.broadcast_to(e.reshape(z.shape[1:]), z.shape)
      return jax.jvp(lambda y: f(y, args), (z,), (tangent,))[1]

    # Samples are independent, so one tangent e_j for every sample at once
    # yields column j of every sample's Jacobian.
    columns = jax.vmap(column)(basis)  # (d, batch, ...)
    jac_f = jnp.moveaxis(columns.reshape(size, batch, size), 0, 2)
    return basis - jac_f

  def _gmres(self, f, z, args, g):
    batch = z.shape[0]
    if self.jacobian is not None:
      jac = self._jacobian(f, z, args)
      matvec = lambda v: jnp.einsum("bij,bj->bi", jac, v)
    else:
      _, f_jvp = jax.linearize(lambda y: f(y, args), z)
      matvec = lambda v: v - f_jvp(v.reshape(z.shape)).reshape(batch, -1)
    delta, _ = jax.scipy.sparse.linalg.gmres(
        matvec, g, x0=g, tol=self.gmres_tol, atol=0.0,
        restart=self.gmres_restart, maxiter=1, solve_method="batched")
    return delta

  def adjoint_solver(self) -> "Newton":
    if self.jacobian is None:
      return self
    jacobian = self.jacobian
    # Backward args are (z_star, args, cotangent); the backward system's
    # Jacobian is the transpose of the forward one at z_star.
    return dataclasses.replace(
        self,
        jacobian=lambda u, bargs: jnp.swapaxes(jacobian(bargs[0], bargs[1]),
                                               1, 2))


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
