"""Newton's method on g(z) = z - f(z), for small states."""

from __future__ import annotations

import dataclasses
import functools
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

  With `linear_solver="gmres"` each sample's Newton system is solved
  matrix-free by GMRES (one batched Jacobian-vector product of f per inner
  iteration, until every sample's residual is below `gmres_tol` relative to
  its right-hand side, at most `gmres_restart` iterations) instead of by LU;
  `jacobian` is then not used. For the 100-wide tanh cell that replaces a
  batched 100x100 LU by a few matmuls.

  Attributes:
    tol: residual tolerance per sample.
    max_steps: most Newton steps.
    jacobian: optional closed-form Jacobian of g, (z, args) -> (batch, d, d)
      (dense solver only).
    linear_solver: "dense" (batched LU) or "gmres" (matrix-free).
    gmres_tol: relative tolerance of each inner GMRES solve.
    gmres_restart: most inner GMRES iterations (its Krylov dimension).

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
    # One linearisation per Newton step: each inner iteration then costs one
    # tangent product of f (for the tanh cell one matmul for the whole batch).
    _, f_jvp = jax.linearize(lambda y: f(y, args), z)

    def matvec(v):
      return v - f_jvp(v.reshape(z.shape)).reshape(batch, -1)

    solve = functools.partial(batched_gmres, tol=self.gmres_tol,
                              max_iters=self.gmres_restart)
    # custom_linear_solve differentiates the solve implicitly (a transposed
    # GMRES solve), never through the Krylov iterations.
    return jax.lax.custom_linear_solve(matvec, g, solve=solve,
                                       transpose_solve=solve)

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


def batched_gmres(matvec: Callable[[jax.Array], jax.Array], b: jax.Array, *,
                  tol: float = 1e-5, max_iters: int = 20) -> jax.Array:
  """Solves A_i x_i = b_i for every row i by GMRES from x = 0, matrix-free.

  `matvec` applies every sample's own matrix at once, (batch, n) -> (batch, n)
  (block-diagonal: row i of the output depends only on row i of the input).
  Each sample gets its own Krylov basis and Givens rotations; the loop stops
  once every sample's residual is below `tol * ||b_i||` or after `max_iters`
  iterations (classical Gram-Schmidt, applied twice for stability).

  Args:
    matvec: the batched linear map.
    b: (batch, n) right-hand sides.
    tol: relative residual at which a sample is solved.
    max_iters: Krylov dimension (no restarts).

  Returns:
    (batch, n) approximate solutions.

  Example:
    >>> import jax.numpy as jnp
    >>> from jaxdeq._src.solvers.newton import batched_gmres
    >>> a = jnp.array([[[2., 1.], [0., 3.]], [[1., 0.], [1., 1.]]])
    >>> x = batched_gmres(lambda v: jnp.einsum("bij,bj->bi", a, v),
    ...                   jnp.ones((2, 2)))
    >>> bool(jnp.allclose(x, jnp.array([[1 / 3, 1 / 3], [1.0, 0.0]]),
    ...                   atol=1e-5))
    True
  """
  batch, n = b.shape
  k = max_iters
  dtype = b.dtype
  beta = jnp.linalg.norm(b, axis=1)
  # (batch, k+1, n): with the batch leading, the Gram-Schmidt products are
  # batched matrix-vector dots, which XLA:CPU runs ~4x faster than the same
  # products over a (k+1, batch, n) basis.
  basis = jnp.zeros((batch, k + 1, n), dtype).at[:, 0].set(
      b / jnp.where(beta > 0, beta, 1)[:, None])
  upper_t = jnp.zeros((batch, k, k), dtype)  # transposed: column j is row j
  # The product of the Givens rotations so far, as one (k+1)x(k+1) matrix per
  # sample: applying it to a new Hessenberg column is one batched product
  # instead of a sequential sweep. beta * rotations[:, :, 0] is the rotated
  # right-hand side; its entry j is the residual after j iterations.
  rotations = jnp.broadcast_to(jnp.eye(k + 1, dtype=dtype), (batch, k + 1, k + 1))
  threshold = tol * beta
  rows = jnp.arange(k + 1, dtype=jnp.int32)

  def cond(carry):
    j, _, _, rotations = carry
    residual = beta * jnp.abs(
        jax.lax.dynamic_index_in_dim(rotations[:, :, 0], j, 1, False))
    return (j < k) & jnp.any(residual > threshold)

  def body(carry):
    j, basis, upper_t, rotations = carry
    w = matvec(jax.lax.dynamic_index_in_dim(basis, j, 1, False))
    h = jnp.einsum("bkn,bn->bk", basis, w)  # zero above j
    w = w - jnp.einsum("bkn,bk->bn", basis, h)
    h_again = jnp.einsum("bkn,bn->bk", basis, w)
    w = w - jnp.einsum("bkn,bk->bn", basis, h_again)
    h = h + h_again
    norm = jnp.linalg.norm(w, axis=1)
    basis = jax.lax.dynamic_update_index_in_dim(
        basis, (w / jnp.where(norm > 0, norm, 1)[:, None])[:, None], j + 1, 1)
    h = jnp.where(rows == j + 1, norm[:, None], h)
    h = jnp.einsum("bij,bj->bi", rotations, h)
    hj = jax.lax.dynamic_index_in_dim(h, j, 1, False)
    radius = jnp.hypot(hj, norm)
    safe = jnp.where(radius > 0, radius, 1)
    c = jnp.where(radius > 0, hj / safe, 1)[:, None]
    s = jnp.where(radius > 0, norm / safe, 0)[:, None]
    column = jnp.where(rows == j, radius[:, None], jnp.where(rows < j, h, 0))
    upper_t = jax.lax.dynamic_update_index_in_dim(
        upper_t, column[:, None, :k], j, 1)
    row_j = jax.lax.dynamic_index_in_dim(rotations, j, 1, False)
    row_next = jax.lax.dynamic_index_in_dim(rotations, j + 1, 1, False)
    rotations = jax.lax.dynamic_update_index_in_dim(
        rotations, (c * row_j + s * row_next)[:, None], j, 1)
    rotations = jax.lax.dynamic_update_index_in_dim(
        rotations, (c * row_next - s * row_j)[:, None], j + 1, 1)
    return j + 1, basis, upper_t, rotations

  steps, basis, upper_t, rotations = jax.lax.while_loop(
      cond, body, (jnp.zeros((), jnp.int32), basis, upper_t, rotations))
  upper = jnp.swapaxes(upper_t, 1, 2)
  # Columns never built, or built after a sample's exact breakdown, have a
  # zero diagonal: make them identity rows so that their coefficient is zero.
  diagonal = jnp.diagonal(upper, axis1=1, axis2=2)
  unused = (jnp.arange(k, dtype=jnp.int32) >= steps) | (diagonal == 0)
  upper = jnp.where(unused[:, :, None] & jnp.eye(k, dtype=bool), 1, upper)
  rhs = jnp.where(unused, 0, beta[:, None] * rotations[:, :k, 0])
  coefficients = jax.scipy.linalg.solve_triangular(
      upper, rhs[..., None], lower=False)[..., 0]
  # The unused last basis vector gets a zero coefficient: slicing it off
  # would copy the whole basis.
  coefficients = jnp.pad(coefficients, ((0, 0), (0, 1)))
  return jnp.einsum("bkn,bk->bn", basis, coefficients)
