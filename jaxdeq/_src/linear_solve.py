"""The linear-solve layer: per-sample solves of A x = b, one protocol.

A linear solver is an object with `tol` and `solve(operator, rhs, *,
matrix=None, x0=None) -> (x, SolverStats)`: `operator` applies every
sample's own A at once, (batch, n) -> (batch, n) (row i of the output
depends only on row i of the input); `matrix`, when the caller has one, is
A as (batch, n, n) (a closed-form Jacobian a cell provides); `x0` is a
starting guess. `differentiable_solve` is the solve autodiff differentiates
implicitly (`jax.lax.custom_linear_solve`), never through its iterations.

`Newton(linear_solver=...)`, `ImplicitAdjoint(linear_solver=...)` and
`SHINEAdjoint(linear_solver=...)` take the same objects: `GMRES()`,
`DenseLU()`, a fixed-point solver (the linear system iterated as
x <- x - A x + b with it), or any lineax solver when lineax is installed.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Optional

import jax
import jax.numpy as jnp

from jaxdeq._src import control
from jaxdeq._src import loop
from jaxdeq._src import solution as solution_lib
from jaxdeq._src.solvers import base

Operator = Callable[[jax.Array], jax.Array]


class AbstractLinearSolver:
  """Base of jaxdeq's linear solvers (see the module's protocol).

  `uses_matrix`: the solver works on A as a dense matrix, which callers
  that can form it cheaply (a closed-form Jacobian) pass as `matrix`.
  """

  tol: float
  uses_matrix: ClassVar[bool] = False

  def solve(self, operator: Optional[Operator], rhs: jax.Array, *,
            matrix: Optional[jax.Array] = None,
            x0: Optional[jax.Array] = None
            ) -> tuple[jax.Array, solution_lib.SolverStats]:
    raise NotImplementedError

  def differentiable_solve(self, operator: Operator, rhs: jax.Array, *,
                           matrix: Optional[jax.Array] = None) -> jax.Array:
    """x with A x = rhs, differentiated as the solution of the system."""
    del matrix  # the transposed solve works on the transposed operator
    solve = lambda op, b: self.solve(op, b)[0]
    return jax.lax.custom_linear_solve(operator, rhs, solve=solve,
                                       transpose_solve=solve)


def _relative_residual(operator, matrix, rhs, x) -> jax.Array:
  """||rhs - A x|| / ||rhs|| per sample (the norm itself where rhs = 0)."""
  applied = (jnp.einsum("bij,bj->bi", matrix, x) if matrix is not None
             else operator(x))
  return _relative(rhs - applied, jnp.linalg.norm(rhs, axis=1))


def _relative(r: jax.Array, rhs_norm: jax.Array) -> jax.Array:
  """||r|| / ||rhs|| per sample, from the residual vectors r."""
  norm = jnp.linalg.norm(r, axis=1)
  return jnp.where(rhs_norm > 0,
                   norm / jnp.where(rhs_norm > 0, rhs_norm, 1), norm)


def _stats(residual, tol, steps, like) -> solution_lib.SolverStats:
  """`SolverStats` of a linear solve that took `steps` (a scalar)."""
  converged = residual <= tol
  per_sample = lambda value: control.full(
      (like.shape[0],), 0, jnp.int32, control.batch_spec(like)) + value
  return solution_lib.SolverStats(
      num_steps=jnp.asarray(steps, jnp.int32),
      residual=residual,
      converged=converged,
      trace=residual[None],
      status=solution_lib.batch_status(converged, ~jnp.isfinite(residual)),
      sample_steps=per_sample(jnp.asarray(steps, jnp.int32)),
      best_step=per_sample(jnp.asarray(steps, jnp.int32)),
  )


@dataclasses.dataclass(frozen=True)
class GMRES(AbstractLinearSolver):
  """Restarted GMRES, per sample and matrix-free.

  For `ImplicitAdjoint(linear_solver=jaxdeq.GMRES())`: the backward system
  (I - df/dz)^T u = g (and the forward-mode one) is solved by GMRES on the
  VJP (JVP) operator instead of by iterating u <- u df/dz + g, which barely
  moves when df/dz has an eigenvalue near 1 (or -1). For
  `Newton(linear_solver=jaxdeq.GMRES(tol=1e-3, max_restarts=0))`: each
  Newton system solved inexactly with Jacobian-vector products, no
  Jacobian formed. Tolerances below 1e-4 orthogonalise the Krylov basis
  with two classical Gram-Schmidt passes, looser ones with one.

  Attributes:
    tol: relative residual ||b - A x|| / ||b|| at which a sample is solved.
    krylov_dim: Krylov basis size per cycle (matrix-vector products per
      cycle).
    max_restarts: most cycles after the first.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdeq
    >>> adjoint = jaxdeq.ImplicitAdjoint(linear_solver=jaxdeq.GMRES(tol=1e-6))
    >>> f = lambda z, c: -0.9996 * z + c  # df/dz ~ -1: iteration crawls
    >>> grad = jax.grad(lambda c: jaxdeq.fixed_point(
    ...     f, jnp.zeros((1, 1)), c, solver=jaxdeq.Anderson(tol=1e-6),
    ...     adjoint=adjoint).value.sum())
    >>> round(float(grad(jnp.ones((1, 1)))[0, 0]), 4)
    0.5001
  """

  tol: float = 1e-6
  krylov_dim: int = 20
  max_restarts: int = 4

  def __post_init__(self):
    base.check_number(self, "tol", positive=True, finite=True)
    base.check_int(self, "krylov_dim", minimum=1)
    base.check_int(self, "max_restarts", minimum=0)

  def solve(self, operator, rhs, *, matrix=None, x0=None):
    """x with A x = b per row of b (batch, n), and `SolverStats`.

    `num_steps` counts matrix-vector products of the Krylov cycles, the
    residual is relative to ||b|| per sample (0 for b = 0).
    """
    del matrix
    if x0 is not None:
      shift = operator(x0)
      x, stats = self.solve(operator, rhs - shift)
      return x0 + x, stats._replace(
          residual=_relative_residual(operator, None, rhs, x0 + x))
    reorthogonalize = self.tol < 1e-4
    if self.max_restarts == 0:
      # One cycle: its own residual estimate, no extra product of A.
      x, steps, estimate = _gmres_cycle(
          operator, rhs, tol=self.tol, max_iters=self.krylov_dim,
          reorthogonalize=reorthogonalize)
      return x, _stats(estimate, self.tol, steps, rhs)
    b_norm = jnp.linalg.norm(rhs, axis=1)
    relative = lambda r: _relative(r, b_norm)

    def cond(carry):
      cycle, _, r, _ = carry
      return (cycle <= self.max_restarts) & jnp.any(~(relative(r) <= self.tol))

    def body(carry):
      cycle, x, r, steps = carry
      # Each cycle's tolerance is relative to its own right-hand side r: ask
      # for the overall tolerance against ||b||.
      scale = jnp.where(b_norm > 0, relative(r), 1)
      tol = self.tol / jnp.maximum(scale, self.tol)
      dx, taken, _ = _gmres_cycle(operator, r, tol=tol,
                                  max_iters=self.krylov_dim,
                                  reorthogonalize=reorthogonalize)
      x = x + dx
      return cycle + 1, x, rhs - operator(x), steps + taken

    zero = jnp.zeros((), jnp.int32)
    _, x, r, steps = control.while_loop(
        cond, body, (zero, jnp.zeros_like(rhs), rhs, zero))
    return x, _stats(relative(r), self.tol, steps, rhs)


@dataclasses.dataclass(frozen=True)
class DenseLU(AbstractLinearSolver):
  """A batched LU solve of each sample's dense (n, n) system.

  Uses the caller's matrix when there is one (`Newton` passes a closed-form
  Jacobian) and otherwise forms A from n products of the operator (all
  samples at once): for small states. Its derivative reuses the LU factors.

  Attributes:
    tol: relative residual above which a solve is reported as failed (an LU
      solve is exact up to rounding and the matrix's conditioning).

  Examples:
    >>> import jax.numpy as jnp, jaxdeq
    >>> a = jnp.array([[[2., 1.], [0., 3.]]])
    >>> x, stats = jaxdeq.DenseLU().solve(None, jnp.ones((1, 2)), matrix=a)
    >>> bool(jnp.allclose(x, 1 / 3)), bool(stats.converged[0])
    (True, True)
  """

  tol: float = 1e-4
  uses_matrix: ClassVar[bool] = True

  def __post_init__(self):
    base.check_number(self, "tol", positive=True, finite=True)

  def solve(self, operator, rhs, *, matrix=None, x0=None):
    del x0
    matrix = self._matrix(operator, rhs, matrix)
    x = dense_solve(matrix, rhs)
    residual = _relative_residual(None, matrix, rhs, x)
    return x, _stats(residual, self.tol, 1, rhs)

  def differentiable_solve(self, operator, rhs, *, matrix=None):
    return dense_solve(self._matrix(operator, rhs, matrix), rhs)

  @staticmethod
  def _matrix(operator, rhs, matrix):
    if matrix is not None:
      return matrix.astype(rhs.dtype)
    size = rhs.shape[1]
    basis = jnp.eye(size, dtype=rhs.dtype)
    zeros = control.zeros_like(rhs)
    # Samples are independent: one e_j for every sample at once yields
    # column j of every sample's matrix.
    columns = jax.vmap(lambda e: operator(zeros + e[None]))(basis)
    return jnp.moveaxis(columns, 0, 2)


@dataclasses.dataclass(frozen=True)
class _Iterated(AbstractLinearSolver):
  """x <- x - A x + b, iterated by a fixed-point solver (its settings)."""

  solver: base.FixedPointSolver

  @property
  def tol(self) -> float:
    return self.solver.tol

  def solve(self, operator, rhs, *, matrix=None, x0=None):
    solver = self.solver
    if solver.stop_active:
      # A compacted forward phase's early stop is no rule for a linear
      # solve: every sample's system is solved.
      solver = dataclasses.replace(solver, stop_active=0)
    linear_map = base.Map(
        lambda x, b: x - operator(x) + b,
        None if matrix is None else lambda x, b: matrix)
    fx0 = None
    if x0 is None:
      # The map at zero is the right-hand side: not evaluating it saves one
      # application of the operator (a VJP of the cell in the backward).
      x0, fx0 = jnp.zeros_like(rhs), rhs
    sol = loop.solve(linear_map, x0, rhs, solver, fz0=fx0)[0]
    return sol.value, sol.stats


@dataclasses.dataclass(frozen=True)
class _Lineax(AbstractLinearSolver):
  """A lineax solver on the batch's block-diagonal system."""

  solver: Any

  @property
  def tol(self) -> float:
    return float(getattr(self.solver, "rtol", 1e-5) or 1e-5)

  def solve(self, operator, rhs, *, matrix=None, x0=None):
    import lineax

    shape, dtype = rhs.shape, rhs.dtype
    if matrix is not None:
      operator = lambda v: jnp.einsum("bij,bj->bi", matrix, v)
    flat = lineax.FunctionLinearOperator(
        lambda v: operator(v.reshape(shape)).reshape(-1),
        jax.ShapeDtypeStruct((rhs.size,), dtype))
    options = {} if x0 is None else {"y0": x0.reshape(-1)}
    sol = lineax.linear_solve(flat, rhs.reshape(-1), self.solver,
                              options=options, throw=False)
    x = sol.value.reshape(shape)
    steps = sol.stats.get("num_steps", 1) if isinstance(sol.stats, dict) else 1
    residual = _relative_residual(operator, None, rhs, x)
    return x, _stats(residual, self.tol, steps, rhs)


def _is_lineax_solver(solver: Any) -> bool:
  module = type(solver).__module__ or ""
  return module.split(".")[0] == "lineax" and hasattr(solver, "compute")


def as_linear_solver(solver: Any, default: Optional[base.FixedPointSolver]
                     = None) -> AbstractLinearSolver:
  """The `AbstractLinearSolver` for `solver` (None: iterate with `default`,
  the forward solver); a TypeError for anything else."""
  if solver is None:
    solver = default
  if isinstance(solver, AbstractLinearSolver):
    return solver
  if isinstance(solver, base.FixedPointSolver):
    return _Iterated(solver)
  if _is_lineax_solver(solver):
    return _Lineax(solver)
  raise TypeError(
      f"a linear solver must be jaxdeq.GMRES(), jaxdeq.DenseLU(), a jaxdeq"
      f" fixed-point solver or a lineax solver, got {solver!r}")


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
                  tol=1e-5, max_iters: int = 20,
                  reorthogonalize: bool = True) -> jax.Array:
  """Solves A_i x_i = b_i for every row i by GMRES from x = 0, matrix-free.

  `matvec` applies every sample's own matrix at once, (batch, n) -> (batch, n)
  (block-diagonal: row i of the output depends only on row i of the input).
  Each sample gets its own Krylov basis and Givens rotations; the loop stops
  once every sample's residual is below `tol * ||b_i||` or after `max_iters`
  iterations (classical Gram-Schmidt, applied twice unless
  `reorthogonalize=False`).

  Args:
    matvec: the batched linear map.
    b: (batch, n) right-hand sides.
    tol: relative residual at which a sample is solved (a number, or a
      (batch,) array of per-sample tolerances).
    max_iters: Krylov dimension (no restarts).
    reorthogonalize: Gram-Schmidt twice (orthogonal to working precision)
      rather than once (orthogonality degrades as the residual falls; enough
      for loose tolerances at half the cost per iteration).

  Returns:
    (batch, n) approximate solutions.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxdeq._src.linear_solve import batched_gmres
    >>> a = jnp.array([[[2., 1.], [0., 3.]], [[1., 0.], [1., 1.]]])
    >>> x = batched_gmres(lambda v: jnp.einsum("bij,bj->bi", a, v),
    ...                   jnp.ones((2, 2)))
    >>> bool(jnp.allclose(x, jnp.array([[1 / 3, 1 / 3], [1.0, 0.0]]),
    ...                   atol=1e-5))
    True
  """
  return _gmres_cycle(matvec, b, tol=tol, max_iters=max_iters,
                      reorthogonalize=reorthogonalize)[0]


def _gmres_cycle(matvec, b, *, tol, max_iters, reorthogonalize):
  """`batched_gmres`, with the iterations taken and each sample's residual
  estimate (relative to ||b_i||, from the Givens rotations)."""
  batch, n = b.shape
  k = max_iters
  dtype = b.dtype
  beta = jnp.linalg.norm(b, axis=1)
  # (batch, k+1, n): with the batch leading, the Gram-Schmidt products are
  # batched matrix-vector dots, which XLA:CPU runs faster than the same
  # products over a (k+1, batch, n) basis.
  spec = control.batch_spec(b)
  spec = None if spec is None else spec + (None, None)
  basis = control.full((batch, k + 1, n), 0, dtype, spec).at[:, 0].set(
      b / jnp.where(beta > 0, beta, 1)[:, None].astype(dtype))
  # transposed: column j is row j
  upper_t = control.full((batch, k, k), 0, dtype, spec)
  # The product of the Givens rotations so far, as one (k+1)x(k+1) matrix per
  # sample: applying it to a new Hessenberg column is one batched product
  # instead of a sequential sweep. beta * rotations[:, :, 0] is the rotated
  # right-hand side; its entry j is the residual after j iterations.
  rotations = control.full((batch, k + 1, k + 1), 0, dtype, spec) + jnp.eye(
      k + 1, dtype=dtype)[None]
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
    # Inner products <q_k, w> = q_k^H w (conj: the identity on real states).
    conj_basis = jnp.conj(basis)
    h = jnp.einsum("bkn,bn->bk", conj_basis, w)  # zero above j
    w = w - jnp.einsum("bkn,bk->bn", basis, h)
    if reorthogonalize:
      h_again = jnp.einsum("bkn,bn->bk", conj_basis, w)
      w = w - jnp.einsum("bkn,bk->bn", basis, h_again)
      h = h + h_again
    norm = jnp.linalg.norm(w, axis=1)
    basis = jax.lax.dynamic_update_index_in_dim(
        basis, (w / jnp.where(norm > 0, norm, 1)[:, None].astype(dtype)
                )[:, None], j + 1, 1)
    h = jnp.where(rows[None] == j + 1, norm[:, None].astype(dtype), h)
    h = jnp.einsum("bij,bj->bi", rotations, h)
    hj = jax.lax.dynamic_index_in_dim(h, j, 1, False)
    # The rotation [[conj(c), s], [-s, c]] (unitary; s and the radius real)
    # takes (hj, norm) to (radius, 0).
    radius = jnp.hypot(jnp.abs(hj), norm)
    safe = jnp.where(radius > 0, radius, 1)
    c = jnp.where(radius > 0, hj / safe.astype(dtype), 1)[:, None]
    s = jnp.where(radius > 0, norm / safe, 0).astype(dtype)[:, None]
    column = jnp.where(rows[None] == j, radius[:, None].astype(dtype),
                       jnp.where(rows[None] < j, h, 0))
    upper_t = jax.lax.dynamic_update_index_in_dim(
        upper_t, column[:, None, :k], j, 1)
    row_j = jax.lax.dynamic_index_in_dim(rotations, j, 1, False)
    row_next = jax.lax.dynamic_index_in_dim(rotations, j + 1, 1, False)
    rotations = jax.lax.dynamic_update_index_in_dim(
        rotations, (jnp.conj(c) * row_j + s * row_next)[:, None], j, 1)
    rotations = jax.lax.dynamic_update_index_in_dim(
        rotations, (c * row_next - s * row_j)[:, None], j + 1, 1)
    return j + 1, basis, upper_t, rotations

  steps, basis, upper_t, rotations = control.while_loop(
      cond, body, (jnp.zeros((), jnp.int32), basis, upper_t, rotations))
  upper = jnp.swapaxes(upper_t, 1, 2)
  # Columns never built, or built after a sample's exact breakdown, have a
  # zero diagonal: make them identity rows so that their coefficient is zero.
  diagonal = jnp.diagonal(upper, axis1=1, axis2=2)
  unused = (jnp.arange(k, dtype=jnp.int32)[None] >= steps) | (diagonal == 0)
  upper = jnp.where(unused[:, :, None] & jnp.eye(k, dtype=bool)[None], 1,
                    upper)
  rhs = jnp.where(unused, 0,
                  beta[:, None].astype(dtype) * rotations[:, :k, 0])
  coefficients = jax.scipy.linalg.solve_triangular(
      upper, rhs[..., None], lower=False)[..., 0]
  # The unused last basis vector gets a zero coefficient: slicing it off
  # would copy the whole basis.
  coefficients = jnp.pad(coefficients, ((0, 0), (0, 1)))
  estimate = jnp.where(beta > 0, jnp.abs(jax.lax.dynamic_index_in_dim(
      rotations[:, :, 0], steps, 1, False)), 0).astype(beta.dtype)
  return jnp.einsum("bkn,bk->bn", basis, coefficients), steps, estimate
