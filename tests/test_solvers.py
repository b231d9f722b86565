"""Forward solves: known fixed points, batching, transforms, stopping rules."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdeq
from jaxdeq._src.linear_solve import batched_gmres

COS_FIXED_POINT = 0.7390851332151607

SOLVERS = {
    "fixed_point_iteration": lambda tol, n: jaxdeq.FixedPointIteration(tol, n),
    "damped_iteration": lambda tol, n: jaxdeq.FixedPointIteration(
        tol, n, damping=0.7),
    "anderson": lambda tol, n: jaxdeq.Anderson(tol, n),
    "anderson_beta": lambda tol, n: jaxdeq.Anderson(tol, n, m=3, beta=0.8),
    "anderson_relative": lambda tol, n: jaxdeq.Anderson(tol, n,
                                                        lam_relative=True),
    "broyden": lambda tol, n: jaxdeq.Broyden(tol, n),
    "newton": lambda tol, n: jaxdeq.Newton(tol, n),
    "newton_gmres": lambda tol, n: jaxdeq.Newton(
        tol, n, linear_solver=jaxdeq.GMRES(tol=1e-3, max_restarts=0)),
}


def cos_map(z, args):
  del args
  return jnp.cos(z)


def linear_problem(batch, dim, dtype, seed=0):
  """z = z A^T + b with ||A|| < 1 per sample; exact solution by LU."""
  key_a, key_b = jax.random.split(jax.random.key(seed))
  a = jax.random.normal(key_a, (batch, dim, dim), dtype)
  a = 0.6 * a / jnp.linalg.norm(a, ord=2, axis=(1, 2), keepdims=True)
  b = jax.random.normal(key_b, (batch, dim), dtype)
  exact = jnp.linalg.solve(jnp.eye(dim, dtype=dtype)[None] - a,
                           b[..., None])[..., 0]
  return (a, b), exact


def linear_map(z, args):
  a, b = args
  return jnp.einsum("bij,bj->bi", a, z) + b


@pytest.mark.parametrize("name", SOLVERS)
def test_cos_unbatched(name, x64, strict_promotion):
  sol = jaxdeq.fixed_point(cos_map, jnp.zeros((), jnp.float64), None,
                           solver=SOLVERS[name](1e-10, 300), batched=False)
  chex.assert_shape(sol.value, ())
  np.testing.assert_allclose(sol.value, COS_FIXED_POINT, rtol=1e-8)
  assert bool(sol.stats.converged)
  assert int(sol.stats.status) == jaxdeq.Status.SUCCESSFUL
  chex.assert_shape(sol.stats.trace, (300,))


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_linear_contraction_batched(name, dtype, x64):
  tol = 1e-5 if dtype == jnp.float32 else 1e-11
  args, exact = linear_problem(6, 4, dtype)
  sol = jaxdeq.fixed_point(linear_map, jnp.zeros((6, 4), dtype), args,
                           solver=SOLVERS[name](tol, 500))
  assert sol.value.dtype == dtype
  chex.assert_shape(sol.stats.residual, (6,))
  assert bool(jnp.all(sol.stats.converged)), sol.stats.residual
  np.testing.assert_allclose(sol.value, exact,
                             atol=1e-3 if dtype == jnp.float32 else 1e-8)


@pytest.mark.parametrize("name", ["fixed_point_iteration", "anderson",
                                  "broyden"])
def test_nhwc_state(name):
  key = jax.random.key(1)
  x = jax.random.normal(key, (3, 4, 4, 2))
  f = lambda z, x: 0.5 * jnp.tanh(z) + x
  sol = jaxdeq.fixed_point(f, jnp.zeros_like(x), x,
                           solver=SOLVERS[name](1e-6, 200))
  chex.assert_shape(sol.value, (3, 4, 4, 2))
  chex.assert_trees_all_close(sol.value, f(sol.value, x), atol=1e-5)


@pytest.mark.parametrize("name", SOLVERS)
def test_jit_and_vmap(name):
  args, exact = linear_problem(4, 3, jnp.float32)
  solver = SOLVERS[name](1e-6, 300)
  solve = lambda args: jaxdeq.fixed_point(
      linear_map, jnp.zeros((4, 3)), args, solver=solver).value
  chex.assert_trees_all_close(jax.jit(solve)(args), exact, atol=1e-4)
  # vmap over an extra leading axis of problems.
  stacked = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), args)
  stacked = (stacked[0] / 2, stacked[1])
  out = jax.vmap(solve)(stacked)
  chex.assert_shape(out, (2, 4, 3))
  chex.assert_trees_all_close(out[0], solve((args[0] / 2, args[1])),
                              atol=1e-5)


def test_converged_sample_is_frozen():
  # Sample 0 starts at its fixed point, sample 1 needs many steps.
  x = jnp.array([[0.0], [5.0]])
  f = lambda z, x: 0.9 * z + 0.1 * x
  sol = jaxdeq.fixed_point(f, jnp.array([[0.0], [0.0]]), x,
                           solver=jaxdeq.FixedPointIteration(1e-4, 500),
                           adjoint=jaxdeq.ImplicitAdjoint())
  np.testing.assert_array_equal(sol.stats.sample_steps, [0, sol.stats.num_steps])
  assert float(sol.value[0, 0]) == 0.0
  trace = np.asarray(sol.stats.trace)
  steps = int(sol.stats.num_steps)
  assert np.all(trace[:steps, 0] == 0.0)  # frozen: residual stays put
  assert np.all(np.isnan(trace[steps:]))  # NaN past the last step
  assert np.all(np.isfinite(trace[:steps]))


def test_frozen_sample_does_not_change_while_others_iterate():
  x = jnp.array([[0.1], [3.0]])
  f = lambda z, x: 0.5 * jnp.sin(z) + x
  loose = jaxdeq.fixed_point(f, jnp.zeros((2, 1)), x,
                             solver=jaxdeq.FixedPointIteration(1e-2, 100))
  # Same first sample alone: it stops at the same step with the same value.
  alone = jaxdeq.fixed_point(f, jnp.zeros((1, 1)), x[:1],
                             solver=jaxdeq.FixedPointIteration(1e-2, 100))
  np.testing.assert_array_equal(loose.value[0], alone.value[0])
  assert int(loose.stats.sample_steps[0]) == int(alone.stats.num_steps)


def test_best_iterate_returned_when_not_converged():
  # z -> 2 z + 1 diverges from z0 = 0: the absolute residual |z + 1| grows at
  # every step, so the best iterate is z0 itself.
  f = lambda z, a: 2.0 * z + 1.0
  sol = jaxdeq.fixed_point(
      f, jnp.zeros((1, 1)), None,
      solver=jaxdeq.FixedPointIteration(1e-6, 10, relative=False))
  assert int(sol.stats.status) == jaxdeq.Status.MAX_STEPS_REACHED
  assert not bool(sol.stats.converged[0])
  assert int(sol.stats.num_steps) == 10
  trace = np.asarray(sol.stats.trace[:, 0])
  assert np.all(np.diff(trace) > 0) and trace[0] > 1.0
  np.testing.assert_allclose(sol.stats.residual[0], 1.0)
  np.testing.assert_allclose(sol.value[0, 0], 0.0)


def test_nan_is_flagged_not_converged():
  def f(z, a):
    # Finite for a few steps, then NaN for sample 1 only.
    blown = jnp.where(z > 2.5, jnp.nan, z + 1.0)
    return jnp.where(jnp.arange(2)[:, None] == 1, blown, 0.5 * z)

  sol = jaxdeq.fixed_point(f, jnp.ones((2, 1)), None,
                           solver=jaxdeq.FixedPointIteration(1e-6, 100))
  assert int(sol.stats.status) == jaxdeq.Status.NONFINITE
  assert not bool(sol.stats.converged[1])
  assert bool(sol.stats.converged[0])
  chex.assert_tree_all_finite(sol.value)
  # z = 3 maps to NaN; z = 2 was the last iterate with a finite residual.
  assert float(sol.value[1, 0]) == 2.0


def test_throw_raises_readable_error():
  f = lambda z, a: 2.0 * z + 1.0
  with pytest.raises(jaxdeq.FixedPointError, match="max_steps"):
    jaxdeq.fixed_point(f, jnp.zeros((3, 1)), None, throw=True,
                       solver=jaxdeq.FixedPointIteration(1e-6, 5))


def test_throw_under_jit_raises_when_run():
  f = lambda z, a: 2.0 * z + a
  solve = jax.jit(lambda a: jaxdeq.fixed_point(
      f, jnp.zeros((3, 1)), a, throw=True,
      solver=jaxdeq.FixedPointIteration(1e-6, 5)).value)
  with pytest.raises(Exception, match="max_steps was reached"):
    jax.block_until_ready(solve(jnp.ones((3, 1))))
  # A converging call under the same jit raises nothing.
  ok = jax.jit(lambda a: jaxdeq.fixed_point(
      lambda z, a: 0.5 * z + a, jnp.zeros((3, 1)), a, throw=True).value)
  jax.block_until_ready(ok(jnp.ones((3, 1))))


def test_stops_early_and_trace_shape():
  sol = jaxdeq.fixed_point(cos_map, jnp.zeros((5, 2)), None,
                           solver=jaxdeq.Anderson(1e-5, 1000))
  steps = int(sol.stats.num_steps)
  assert 0 < steps < 60
  chex.assert_shape(sol.stats.trace, (1000, 5))
  assert np.all(np.isnan(np.asarray(sol.stats.trace)[steps:]))


def test_anderson_singular_gram_does_not_crash():
  # lam = 0 and a map with an exact fixed point at the start: every stored
  # residual is zero, the bordered system is singular.
  f = lambda z, a: jnp.zeros_like(z)
  sol = jaxdeq.fixed_point(f, jnp.full((2, 3), 1e-30), None,
                           solver=jaxdeq.Anderson(1e-12, 10, lam=0.0),
                           adjoint=jaxdeq.ImplicitAdjoint())
  chex.assert_tree_all_finite(sol.value)
  f2 = lambda z, a: z  # every point is a fixed point; G = 0 always
  sol2 = jaxdeq.fixed_point(f2, jnp.ones((2, 3)), None,
                            solver=jaxdeq.Anderson(1e-12, 10, lam=0.0))
  chex.assert_tree_all_finite(sol2.value)
  assert bool(jnp.all(sol2.stats.converged))


def test_anderson_lam_zero_on_duplicate_history():
  # Steps repeat the same point after convergence on sample 0 while sample 1
  # keeps going: the history of sample 0 fills with duplicates.
  x = jnp.array([[0.0, 0.0], [2.0, -1.0]])
  f = lambda z, x: 0.5 * jnp.tanh(z) + x
  sol = jaxdeq.fixed_point(f, jnp.zeros((2, 2)), x,
                           solver=jaxdeq.Anderson(1e-7, 100, lam=0.0))
  chex.assert_tree_all_finite(sol.value)
  assert bool(jnp.all(sol.stats.converged))


@pytest.mark.parametrize("beta", [1.0, 0.7])
def test_anderson_step_matches_the_recomputed_gram(beta, x64):
  # The step keeps the Gram matrix up to date one row at a time and mixes
  # from the histories before writing into them; after more steps than the
  # history holds, both must still equal the textbook step: the Gram matrix
  # recomputed from the stored residuals, weights from the bordered system,
  # mixing over the updated histories.
  m, lam = 3, 1e-3
  solver = jaxdeq.Anderson(1e-12, 20, m=m, lam=lam, beta=beta,
                           lam_relative=False)
  key_a, key_x = jax.random.split(jax.random.key(3))
  a = 0.4 * jax.random.normal(key_a, (6, 6), jnp.float64) / np.sqrt(6)
  x = jax.random.normal(key_x, (2, 6), jnp.float64)
  f = lambda z, x: jnp.tanh(z @ a) + x
  z = jnp.zeros((2, 6), jnp.float64)
  state = solver.init(f, z, f(z, x), x)
  g_rows, f_rows = [], []
  for step in range(2 * m + 1):
    fz = f(z, x)
    z_next, state = solver.step(f, z, fz, x, state, jnp.asarray(step))
    g_rows, f_rows = (g_rows + [fz - z])[-m:], (f_rows + [fz])[-m:]
    g = np.stack(g_rows, axis=1)
    gram = np.einsum("bid,bjd->bij", g, g)
    np.testing.assert_allclose(
        _gram_in_step_order(np.asarray(state.gram), step, m, len(g_rows)),
        gram, rtol=1e-12, atol=1e-14)
    w = np.linalg.solve(gram + lam * np.eye(len(g_rows)),
                        np.ones((2, len(g_rows), 1)))[..., 0]
    alpha = w / w.sum(axis=1, keepdims=True)
    expected = np.einsum("bm,bmd->bd", alpha,
                         np.stack(f_rows, 1) - (1 - beta) * g)
    np.testing.assert_allclose(np.asarray(z_next), expected, rtol=1e-10,
                               atol=1e-12)
    z = z_next


def _gram_in_step_order(gram, step, m, filled):
  """The stored (batch, m, m) Gram matrix reordered oldest step first
  (slot k % m holds step k)."""
  slots = np.arange(step - filled + 1, step + 1) % m
  return gram[:, slots][:, :, slots]


def test_absolute_residual():
  x = jnp.full((2, 3), 1000.0)
  f = lambda z, x: 0.5 * z + x
  rel = jaxdeq.fixed_point(f, jnp.zeros_like(x), x,
                           solver=jaxdeq.FixedPointIteration(1e-3, 200))
  absolute = jaxdeq.fixed_point(
      f, jnp.zeros_like(x), x,
      solver=jaxdeq.FixedPointIteration(1e-3, 200, relative=False))
  assert int(absolute.stats.num_steps) > int(rel.stats.num_steps)
  assert float(jnp.max(jnp.abs(f(absolute.value, x) - absolute.value))) < 1e-3


def test_work_stops_with_steps_taken_not_max_steps():
  calls = []

  def f(z, a):
    jax.debug.callback(lambda: calls.append(1))
    return 0.5 * z + a

  jaxdeq.fixed_point(f, jnp.zeros((1, 1)), jnp.ones((1, 1)),
                     solver=jaxdeq.FixedPointIteration(1e-3, 10_000))
  jax.effects_barrier()
  assert len(calls) < 30  # one evaluation per step taken, plus f(z0)


# ------------------------------------------------------------- bad input ---


@pytest.mark.parametrize("make, error, match", [
    (lambda: jaxdeq.Anderson(tol=0.0), ValueError, "tol must be > 0"),
    (lambda: jaxdeq.Anderson(tol=-1e-3), ValueError, "tol must be > 0"),
    (lambda: jaxdeq.Anderson(max_steps=0), ValueError, "max_steps"),
    (lambda: jaxdeq.Anderson(max_steps=2.5), TypeError, "max_steps"),
    (lambda: jaxdeq.Anderson(m=0), ValueError, "m must be >= 1"),
    (lambda: jaxdeq.Anderson(lam=-1.0), ValueError, "lam"),
    (lambda: jaxdeq.Broyden(memory=0), ValueError, "memory"),
    (lambda: jaxdeq.FixedPointIteration(damping=1.5), ValueError, "damping"),
    (lambda: jaxdeq.FixedPointIteration(tol="1e-3"), TypeError, "tol"),
    (lambda: jaxdeq.Newton(linear_solver="gmres"), TypeError, "linear_solver"),
    (lambda: jaxdeq.Newton(linear_solver=jaxdeq.Anderson()), TypeError,
     "linear_solver"),
    (lambda: jaxdeq.Newton(jacobian=3), TypeError, "jacobian"),
    (lambda: jaxdeq.PhantomAdjoint(steps=0), ValueError, "steps"),
    (lambda: jaxdeq.ImplicitAdjoint(linear_solver="anderson"), TypeError,
     "linear solver must be"),
    (lambda: jaxdeq.SHINEAdjoint(linear_solver=3), TypeError,
     "linear solver must be"),
])
def test_bad_options(make, error, match):
  with pytest.raises(error, match=match):
    make()


def test_shape_mismatch():
  with pytest.raises(ValueError, match=r"shape \(2, 3\).*\(2, 4\)"):
    jaxdeq.fixed_point(lambda z, a: jnp.zeros((2, 4)), jnp.zeros((2, 3)))


def test_dtype_mismatch(x64):
  with pytest.raises(ValueError, match=r"dtype float64 for z of dtype float32"):
    jaxdeq.fixed_point(lambda z, a: a, jnp.zeros((2, 3), jnp.float32),
                       jnp.ones((2, 3), jnp.float64))


def test_integer_state():
  with pytest.raises(TypeError, match="floating"):
    jaxdeq.fixed_point(lambda z, a: z, jnp.zeros((2, 3), jnp.int32))


def test_scalar_state_needs_unbatched():
  with pytest.raises(ValueError, match="batched=False"):
    jaxdeq.fixed_point(cos_map, jnp.zeros(()))


def test_bad_solver_and_adjoint_objects():
  with pytest.raises(TypeError, match="solver"):
    jaxdeq.fixed_point(cos_map, jnp.zeros((1,)), solver="anderson")
  with pytest.raises(TypeError, match="adjoint"):
    jaxdeq.fixed_point(cos_map, jnp.zeros((1,)), adjoint="implicit")


def test_bad_newton_jacobian_shape():
  solver = jaxdeq.Newton(jacobian=lambda z, a: jnp.ones((2, 3)))
  with pytest.raises(ValueError, match="Jacobian of g"):
    jaxdeq.fixed_point(cos_map, jnp.zeros((2, 3)), solver=solver)


def test_anderson_relative_lam_keeps_accelerating():
  # With residuals far below sqrt(lam), the absolute lam turns Anderson into
  # averaging; the relative one keeps it fast down to the tolerance.
  key_w, key_x = jax.random.split(jax.random.key(0))
  w = 0.9 * jax.random.normal(key_w, (100, 100)) / 10
  x = 0.1 * jax.random.normal(key_x, (8, 100))
  f = lambda z, a: jnp.tanh(z @ a[0] + a[1])
  steps = {}
  for relative in (False, True):
    sol = jaxdeq.fixed_point(f, jnp.zeros_like(x), (w, x),
                             solver=jaxdeq.Anderson(1e-5, 200,
                                                    lam_relative=relative))
    assert bool(sol.stats.converged.all())
    steps[relative] = int(sol.stats.num_steps)
  assert steps[True] < steps[False], steps


def _block_diagonal_problem(batch=4, n=12, seed=0, dtype=jnp.float64):
  key_a, key_b = jax.random.split(jax.random.key(seed))
  a = jnp.eye(n, dtype=dtype)[None] + 0.4 * jax.random.normal(
      key_a, (batch, n, n), dtype) / np.sqrt(n)
  b = jax.random.normal(key_b, (batch, n), dtype)
  return a, b, lambda v: jnp.einsum("bij,bj->bi", a, v)


def test_batched_gmres_solves_each_sample(x64):
  a, b, matvec = _block_diagonal_problem()
  x = batched_gmres(matvec, b, tol=1e-12, max_iters=12)
  chex.assert_trees_all_close(x, jnp.linalg.solve(a, b[..., None])[..., 0],
                              atol=1e-9)


@pytest.mark.parametrize("reorthogonalize", [True, False])
def test_batched_gmres_stops_at_tolerance_per_sample(x64, reorthogonalize):
  a, b, matvec = _block_diagonal_problem(batch=6, n=30)
  x = batched_gmres(matvec, b, tol=1e-3, max_iters=30,
                    reorthogonalize=reorthogonalize)
  relative = (jnp.linalg.norm(matvec(x) - b, axis=1)
              / jnp.linalg.norm(b, axis=1))
  assert jnp.all(relative <= 1e-3), relative
  # Stopped early: not solved to machine precision.
  assert jnp.any(relative > 1e-10), relative


def test_newton_gmres_with_loose_inner_tolerance_converges():
  # GMRES tol 1e-3: one Gram-Schmidt pass per inner iteration (float32).
  w = jax.random.uniform(jax.random.key(0), (100, 100), jnp.float32, -0.1,
                         0.1)
  x = jax.random.normal(jax.random.key(1), (16, 100), jnp.float32)
  f = lambda z, x: jnp.tanh(z @ w + x)
  loose = jaxdeq.fixed_point(
      f, jnp.zeros_like(x), x,
      solver=jaxdeq.Newton(1e-5, 20, linear_solver=jaxdeq.GMRES(
          tol=1e-3, krylov_dim=10, max_restarts=0)))
  assert bool(jnp.all(loose.stats.converged)), loose.stats.residual
  assert int(loose.stats.num_steps) <= 6
  chex.assert_trees_all_close(f(loose.value, x), loose.value, atol=1e-4)


def test_batched_gmres_zero_rhs_and_exact_breakdown(x64):
  # Sample 0 has b = 0; the identity makes every sample break down after one
  # iteration: no NaN either way.
  b = jnp.stack([jnp.zeros(5), jnp.arange(1.0, 6.0)])
  x = batched_gmres(lambda v: v, b, tol=0.0, max_iters=4)
  chex.assert_tree_all_finite(x)
  chex.assert_trees_all_close(x, b, atol=1e-12)


def test_batched_gmres_jit_and_vmap(x64):
  a, b, _ = _block_diagonal_problem(batch=3, n=6)
  solve = lambda a, b: batched_gmres(
      lambda v: jnp.einsum("bij,bj->bi", a, v), b, tol=1e-12, max_iters=6)
  stacked_a, stacked_b = jnp.stack([a, 2 * a]), jnp.stack([b, b])
  x = jax.jit(jax.vmap(solve))(stacked_a, stacked_b)
  chex.assert_trees_all_close(x[1], 0.5 * x[0], atol=1e-9)
  chex.assert_trees_all_close(x[0], solve(a, b), atol=1e-9)


def test_newton_gmres_matches_dense_newton_per_sample(x64):
  w = jax.random.uniform(jax.random.key(0), (20, 20), jnp.float64, -0.3, 0.3)
  x = jax.random.normal(jax.random.key(1), (8, 20), jnp.float64)
  f = lambda z, x: jnp.tanh(z @ w + x)
  dense = jaxdeq.fixed_point(f, jnp.zeros_like(x), x,
                             solver=jaxdeq.Newton(1e-10, 30))
  gmres = jaxdeq.fixed_point(f, jnp.zeros_like(x), x,
                             solver=jaxdeq.Newton(1e-10, 30,
                                                  linear_solver=jaxdeq.GMRES(
                                                      tol=1e-6,
                                                      max_restarts=0)))
  assert bool(jnp.all(gmres.stats.converged))
  chex.assert_trees_all_close(gmres.value, dense.value, atol=1e-9)
  # Inexact inner solves cost at most a couple of extra Newton steps.
  assert int(gmres.stats.num_steps) <= int(dense.stats.num_steps) + 3


def test_broyden_full_memory_restarts_instead_of_diverging():
  # z = z A + b with A symmetric, eigenvalues spread over [0, 0.98]: with a
  # ring of the latest rank-one updates Broyden blew up to inf here; with a
  # restart when its memory is full it converges.
  q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (100, 100)))
  a = (q * jnp.linspace(0.0, 0.98, 100)[None]) @ q.T
  b = jax.random.normal(jax.random.key(1), (16, 100))
  sol = jaxdeq.fixed_point(lambda z, a: z @ a + b, jnp.zeros_like(b), a,
                           solver=jaxdeq.Broyden(1e-4, 500))
  assert bool(jnp.all(sol.stats.converged)), sol.stats.residual
  assert int(sol.stats.status) == jaxdeq.Status.SUCCESSFUL
  chex.assert_trees_all_close(sol.value @ (jnp.eye(100) - a), b, atol=1e-2)
