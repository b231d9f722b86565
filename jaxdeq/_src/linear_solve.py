"""Per-sample matrix-free linear solves: batched GMRES with restarts."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from jaxdeq._src import control
from jaxdeq._src import solution as solution_lib
from jaxdeq._src.solvers import base


@dataclasses.dataclass(frozen=True)
class GMRES:
  """Restarted GMRES, per sample and matrix-free, as a linear solver config.

  For `ImplicitAdjoint(solver=jaxdeq.GMRES())`: the backward system
  (I - df/dz)^T u = g (and the forward-mode one) is solved by GMRES on the
  VJP (JVP) operator instead of by iterating u <- u df/dz + g, which barely
  moves when df/dz has an eigenvalue near 1 (or -1).

  Attributes:
    tol: relative residual ||b - A x|| / ||b|| at which a sample is solved.
    krylov_dim: Krylov basis size per cycle (matrix-vector products per
      cycle).
    max_restarts: most cycles after the first.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdeq
    >>> adjoint = jaxdeq.ImplicitAdjoint(solver=jaxdeq.GMRES(tol=1e-6))
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

  def solve(self, matvec: Callable[[jax.Array], jax.Array], b: jax.Array
            ) -> tuple[jax.Array, solution_lib.SolverStats]:
    """x with A x = b per row of b (batch, n), and `SolverStats`.

    `num_steps` counts matrix-vector products of the Krylov cycles, the
    residual is relative to ||b|| per sample (0 for b = 0).
    """
    batch = b.shape[0]
    b_norm = jnp.linalg.norm(b, axis=1)
    safe_b_norm = jnp.where(b_norm > 0, b_norm, 1)

    def relative(r):
      norm = jnp.linalg.norm(r, axis=1)
      return jnp.where(b_norm > 0, norm / safe_b_norm, norm)

    def cond(carry):
      cycle, _, r = carry
      return (cycle <= self.max_restarts) & jnp.any(~(relative(r) <= self.tol))

    def body(carry):
      cycle, x, r = carry
      # Each cycle's tolerance is relative to its own right-hand side r: ask
      # for the overall tolerance against ||b||.
      scale = jnp.where(b_norm > 0, relative(r), 1)
      tol = self.tol / jnp.maximum(scale, self.tol)
      x = x + batched_gmres(matvec, r, tol=tol, max_iters=self.krylov_dim)
      return cycle + 1, x, b - matvec(x)

    cycles, x, r = control.while_loop(
        cond, body, (jnp.zeros((), jnp.int32), jnp.zeros_like(b), b))
    res = relative(r)
    converged = res <= self.tol
    trace = res[None]
    per_sample = lambda value: control.full((batch,), value, jnp.int32,
                                            control.batch_spec(b))
    stats = solution_lib.SolverStats(
        num_steps=cycles * self.krylov_dim,
        residual=res,
        converged=converged,
        trace=trace,
        status=solution_lib.batch_status(converged, ~jnp.isfinite(res)),
        sample_steps=per_sample(cycles * self.krylov_dim),
        best_step=per_sample(cycles),
    )
    return x, stats


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
  return jnp.einsum("bkn,bk->bn", basis, coefficients)
