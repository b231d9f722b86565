"""The linear-solve layer: one protocol for Newton's systems and the
implicit backward, jaxdeq's solvers, lineax's, and one defined here."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdeq
from jaxdeq._src import linear_solve
from jaxdeq._src import solution as solution_lib
from tests.helpers import small_tanh_problem, tanh_map


def _system(batch=3, n=5, seed=0):
  """Per-sample well-conditioned A = I - 0.3 M (M of norm ~1) and b."""
  m = jax.random.normal(jax.random.key(seed), (batch, n, n)) / np.sqrt(n)
  a = jnp.eye(n)[None] - 0.3 * m
  b = jax.random.normal(jax.random.key(seed + 1), (batch, n))
  operator = lambda v: jnp.einsum("bij,bj->bi", a, v)
  return a, b, operator


@dataclasses.dataclass(frozen=True)
class Richardson(jaxdeq.AbstractLinearSolver):
  """A linear solver defined outside the library: x <- x + (b - A x),
  a fixed number of times (converges when ||I - A|| < 1)."""

  tol: float = 1e-8
  steps: int = 200

  def solve(self, operator, rhs, *, matrix=None, x0=None):
    x = jnp.zeros_like(rhs) if x0 is None else x0
    x = jax.lax.fori_loop(0, self.steps,
                          lambda _, x: x + rhs - operator(x), x)
    residual = jnp.linalg.norm(rhs - operator(x), axis=1) / jnp.linalg.norm(
        rhs, axis=1)
    converged = residual <= self.tol
    steps = jnp.full(rhs.shape[:1], self.steps, jnp.int32)
    return x, solution_lib.SolverStats(
        num_steps=jnp.asarray(self.steps, jnp.int32), residual=residual,
        converged=converged, trace=residual[None],
        status=solution_lib.batch_status(converged, ~jnp.isfinite(residual)),
        sample_steps=steps, best_step=steps)


def _solvers():
  solvers = {
      "gmres": jaxdeq.GMRES(tol=1e-12),
      "gmres_one_cycle": jaxdeq.GMRES(tol=1e-12, krylov_dim=5,
                                      max_restarts=0),
      "dense_lu": jaxdeq.DenseLU(),
      "anderson": jaxdeq.Anderson(tol=1e-12, max_steps=200),
      "richardson": Richardson(),
  }
  lineax = pytest.importorskip("lineax")
  solvers["lineax_lu"] = lineax.LU()
  solvers["lineax_gmres"] = lineax.GMRES(rtol=1e-12, atol=1e-12)
  return solvers


@pytest.mark.parametrize("name", ["gmres", "gmres_one_cycle", "dense_lu",
                                  "anderson", "richardson", "lineax_lu",
                                  "lineax_gmres"])
def test_every_linear_solver_solves_the_batch(name, x64):
  solver = linear_solve.as_linear_solver(_solvers()[name])
  a, b, operator = _system()
  expected = jnp.linalg.solve(a, b[..., None])[..., 0]
  x, stats = solver.solve(operator, b)
  chex.assert_trees_all_close(x, expected, atol=1e-9)
  assert bool(jnp.all(stats.converged)) and stats.residual.shape == (3,)
  # From a starting guess, and jitted.
  x, _ = jax.jit(lambda b, x0: solver.solve(operator, b, x0=x0))(
      b, expected + 0.1)
  chex.assert_trees_all_close(x, expected, atol=1e-9)


@pytest.mark.parametrize("name", ["gmres", "gmres_one_cycle", "dense_lu",
                                  "richardson", "lineax_lu", "lineax_gmres"])
def test_newton_takes_any_linear_solver(name, x64):
  w, x = small_tanh_problem()
  newton = jaxdeq.Newton(tol=1e-11, max_steps=30,
                         linear_solver=_solvers()[name])
  reference = jaxdeq.fixed_point(tanh_map, jnp.zeros_like(x), (w, x),
                                 solver=jaxdeq.Newton(tol=1e-11, max_steps=30))
  sol = jax.jit(lambda w, x: jaxdeq.fixed_point(
      tanh_map, jnp.zeros_like(x), (w, x), solver=newton))(w, x)
  assert bool(jnp.all(sol.stats.converged))
  chex.assert_trees_all_close(sol.value, reference.value, atol=1e-9)


@pytest.mark.parametrize("name", [None, "gmres", "dense_lu", "anderson",
                                  "richardson", "lineax_lu", "lineax_gmres"])
def test_implicit_adjoint_takes_any_linear_solver(name, x64):
  w, x = small_tanh_problem()
  linear = None if name is None else _solvers()[name]
  adjoint = jaxdeq.ImplicitAdjoint(linear_solver=linear)

  def loss(w, x, adjoint):
    z = jaxdeq.fixed_point(tanh_map, jnp.zeros_like(x), (w, x),
                           solver=jaxdeq.Anderson(tol=1e-12, max_steps=200),
                           adjoint=adjoint).value
    return jnp.sum(z ** 2)

  exact = jax.grad(loss, argnums=(0, 1))(
      w, x, jaxdeq.ImplicitAdjoint(linear_solver=jaxdeq.DenseLU()))
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(
      w, x, adjoint)
  chex.assert_trees_all_close(grads, exact, atol=1e-9)
  # Forward mode through the same linear solver, and under vmap.
  tangent = jax.jvp(lambda w: loss(w, x, adjoint), (w,), (jnp.ones_like(w),))
  np.testing.assert_allclose(tangent[1], jnp.sum(exact[0]), rtol=1e-8)
  batched = jax.vmap(lambda x: loss(w, x[None], adjoint))(x)
  chex.assert_shape(batched, (4,))


def test_a_linear_solver_defined_outside_the_library_trains_a_deq(x64):
  from flax import nnx
  from jaxdeq.nnx import DEQ, TanhCell
  deq = DEQ(TanhCell(6, rngs=nnx.Rngs(0)),
            jaxdeq.Newton(tol=1e-10, max_steps=30,
                          linear_solver=Richardson()),
            jaxdeq.ImplicitAdjoint(linear_solver=Richardson()))
  x = jax.random.normal(jax.random.key(2), (4, 6))
  grads = nnx.grad(lambda deq: jnp.sum(deq(x) ** 2))(deq)
  reference = DEQ(TanhCell(6, rngs=nnx.Rngs(0)),
                  jaxdeq.Newton(tol=1e-10, max_steps=30))
  expected = nnx.grad(lambda deq: jnp.sum(deq(x) ** 2))(reference)
  chex.assert_trees_all_close(grads.cell.kernel[...],
                              expected.cell.kernel[...], atol=1e-8)


def test_shine_fallback_takes_a_linear_solver(x64):
  w, x = small_tanh_problem()

  def loss(w, adjoint):
    return jnp.sum(jaxdeq.fixed_point(
        tanh_map, jnp.zeros_like(x), (w, x),
        solver=jaxdeq.Broyden(tol=1e-12, max_steps=100),
        adjoint=adjoint).value)

  exact = jax.grad(loss)(w, jaxdeq.ImplicitAdjoint())
  refined = jax.grad(loss)(w, jaxdeq.SHINEAdjoint(
      fallback_tol=1e-30, linear_solver=jaxdeq.GMRES(tol=1e-12)))
  chex.assert_trees_all_close(refined, exact, atol=1e-9)


@pytest.mark.parametrize("bad", ["gmres", 3, jnp.eye(2)])
def test_what_is_not_a_linear_solver_is_refused(bad):
  with pytest.raises(TypeError, match="a linear solver must be"):
    jaxdeq.ImplicitAdjoint(linear_solver=bad)
  with pytest.raises(TypeError, match="Newton: linear_solver must be"):
    jaxdeq.Newton(linear_solver=bad if isinstance(bad, str)
                  else jaxdeq.Anderson())
