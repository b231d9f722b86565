"""Gradients: finite differences in float64, implicit vs unrolled, phantom."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxdeq
from jaxdeq._src import loop


def tanh_problem(dim=5, batch=3, dtype=jnp.float64, seed=0):
  key_w, key_x = jax.random.split(jax.random.key(seed))
  bound = 1 / np.sqrt(dim)
  w = jax.random.uniform(key_w, (dim, dim), dtype, -bound, bound)
  x = jax.random.normal(key_x, (batch, dim), dtype)
  return w, x


def tanh_map(z, args):
  w, x = args
  return jnp.tanh(z @ w + x)


def tanh_jacobian(z, args):
  w, x = args
  sech2 = 1 - jnp.tanh(z @ w + x) ** 2
  return (jnp.eye(w.shape[0], dtype=z.dtype)[None]
          - sech2[:, :, None] * w.T[None])


def solve_fn(solver, adjoint):
  def solve(w, x):
    sol = jaxdeq.fixed_point(tanh_map, jnp.zeros_like(x), (w, x),
                             solver=solver, adjoint=adjoint)
    # A fixed random readout makes every entry of z* matter.
    return jnp.sum(jnp.sin(3 * sol.value))
  return solve


SOLVERS = {
    "iteration": jaxdeq.FixedPointIteration(1e-10, 500),
    "anderson": jaxdeq.Anderson(1e-10, 200),
    "broyden": jaxdeq.Broyden(1e-10, 200),
    "newton": jaxdeq.Newton(1e-10, 50),
    "newton_closed_form": jaxdeq.Newton(1e-10, 50, jacobian=tanh_jacobian),
    "newton_gmres": jaxdeq.Newton(1e-10, 50, linear_solver=jaxdeq.GMRES(
        tol=1e-12, max_restarts=0)),
}


# The unrolled adjoint's two modes: the tape of VJP residuals (what the
# default budget gives these small problems) and sqrt(max_steps)
# checkpointing.
class TapeThenReplay(jaxdeq.UnrolledAdjoint):
  """The budget's mixed plan: one segment's steps on the tape, the rest
  checkpointed and replayed (whatever the problem's size)."""

  def _plan(self, fn, z0, args, solver):
    every = loop.checkpoint_interval(solver.max_steps)
    return (every, every) if every < solver.max_steps else (
        solver.max_steps, None)


UNROLLED = {"tape": jaxdeq.UnrolledAdjoint(),
            "checkpointed": jaxdeq.UnrolledAdjoint(memory_budget=0),
            "tape_then_replay": TapeThenReplay()}


# The checkpointed replay runs the same steps as the tape: a stateless, a
# history-keeping, a secant and a Newton solver are enough for it.
CASES = [(name, adjoint) for name in SOLVERS
         for adjoint in ("implicit", "tape", "checkpointed",
                         "tape_then_replay")
         if adjoint in ("implicit", "tape")
         or name in ("iteration", "anderson", "broyden", "newton")]


@pytest.mark.parametrize("name, adjoint", CASES,
                         ids=[f"{a}-{n}" for n, a in CASES])
def test_gradient_matches_finite_differences(name, adjoint, x64):
  solver = SOLVERS[name]
  adjoint = (jaxdeq.ImplicitAdjoint() if adjoint == "implicit"
             else UNROLLED[adjoint])
  w, x = tanh_problem()
  check_grads(solve_fn(solver, adjoint), (w, x), order=1, modes=["rev"],
              eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", ["iteration", "anderson", "broyden",
                                  "newton"])
def test_implicit_equals_unrolled_at_convergence(name, x64):
  w, x = tanh_problem(dim=6, batch=4, seed=3)
  solver = SOLVERS[name]
  implicit = jax.grad(solve_fn(solver, jaxdeq.ImplicitAdjoint()),
                      argnums=(0, 1))(w, x)
  unrolled = jax.grad(solve_fn(solver, jaxdeq.UnrolledAdjoint()),
                      argnums=(0, 1))(w, x)
  # Broyden's unrolled gradient also differentiates its secant updates.
  chex.assert_trees_all_close(implicit, unrolled, atol=1e-7, rtol=1e-6)


def test_phantom_close_to_implicit_on_contraction(x64):
  w, x = tanh_problem(dim=6, batch=4, seed=5)
  w = 0.5 * w  # a strong contraction: phantom steps converge quickly
  solver = jaxdeq.Anderson(1e-10, 100)
  implicit = jax.grad(solve_fn(solver, jaxdeq.ImplicitAdjoint()))(w, x)
  phantom = jax.grad(solve_fn(solver, jaxdeq.PhantomAdjoint(
      steps=12, damping=1.0)))(w, x)
  chex.assert_trees_all_close(phantom, implicit, rtol=1e-3, atol=1e-5)
  rough = jax.grad(solve_fn(solver, jaxdeq.PhantomAdjoint()))(w, x)
  cosine = jnp.vdot(rough, implicit) / (jnp.linalg.norm(rough)
                                        * jnp.linalg.norm(implicit))
  assert float(cosine) > 0.95


def test_phantom_value_is_the_fixed_point():
  w, x = tanh_problem(dtype=jnp.float32)
  solver = jaxdeq.Anderson(1e-6, 100)
  exact = jaxdeq.fixed_point(tanh_map, jnp.zeros_like(x), (w, x),
                             solver=solver).value
  phantom = jaxdeq.fixed_point(tanh_map, jnp.zeros_like(x), (w, x),
                               solver=solver,
                               adjoint=jaxdeq.PhantomAdjoint()).value
  np.testing.assert_array_equal(phantom, exact)


def reference_unrolled(f, z0, args, steps):
  """Autodiff through the same number of plain iterations, in Python."""
  z = z0
  for _ in range(steps):
    z = f(z, args)
  return z


def test_unrolled_is_exact_backprop_of_the_steps_taken(x64):
  w, x = tanh_problem(dim=4, batch=1, seed=1)
  solver = jaxdeq.FixedPointIteration(1e-3, 400)  # stops early, far from z*
  z0 = 0.1 * jnp.ones_like(x)
  sol = jaxdeq.fixed_point(tanh_map, z0, (w, x), solver=solver)
  steps = int(sol.stats.num_steps)
  assert bool(jnp.all(sol.stats.sample_steps == steps))

  def ours(z0, w, x):
    return jnp.sum(jnp.sin(jaxdeq.fixed_point(
        tanh_map, z0, (w, x), solver=solver,
        adjoint=jaxdeq.UnrolledAdjoint()).value))

  def theirs(z0, w, x):
    return jnp.sum(jnp.sin(reference_unrolled(tanh_map, z0, (w, x), steps)))

  chex.assert_trees_all_close(
      jax.grad(ours, argnums=(0, 1, 2))(z0, w, x),
      jax.grad(theirs, argnums=(0, 1, 2))(z0, w, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("max_steps, mode", [
    (1, "checkpointed"), (2, "checkpointed"), (7, "checkpointed"),
    (16, "checkpointed"), (17, "checkpointed"), (50, "checkpointed"),
    (1, "tape"), (17, "tape"), (2, "tape_then_replay"),
    (17, "tape_then_replay"), (50, "tape_then_replay")])
def test_unrolled_checkpoint_segments(max_steps, mode, x64):
  # Every segment length and boundary case: gradients equal the reference.
  w, x = tanh_problem(dim=3, batch=2, seed=2)
  solver = jaxdeq.FixedPointIteration(1e-14, max_steps)
  ours = jax.grad(lambda w: jnp.sum(jaxdeq.fixed_point(
      tanh_map, jnp.zeros_like(x), (w, x), solver=solver,
      adjoint=UNROLLED[mode]).value))(w)
  theirs = jax.grad(lambda w: jnp.sum(reference_unrolled(
      tanh_map, jnp.zeros_like(x), (w, x), max_steps)))(w)
  chex.assert_trees_all_close(ours, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver", [
    jaxdeq.FixedPointIteration(1e-6, 300),
    jaxdeq.Anderson(1e-6, 300, m=3),
    jaxdeq.Broyden(1e-6, 300),
], ids=["iteration", "anderson", "broyden"])
@pytest.mark.parametrize("mode", UNROLLED)
def test_unrolled_batch_equals_sum_of_samples_alone(solver, mode, x64):
  # Samples converge after different numbers of steps and are frozen while
  # the others go on; each must get exactly the gradient of its own
  # trajectory, as if solved alone.
  w, x = tanh_problem(dim=4, batch=3, seed=3)
  x = x * jnp.array([[0.1], [1.0], [3.0]])

  def loss(w, x):
    sol = jaxdeq.fixed_point(tanh_map, jnp.zeros_like(x), (w, x),
                             solver=solver, adjoint=UNROLLED[mode])
    return jnp.sum(jnp.sin(3 * sol.value)), sol.stats.sample_steps

  (grad_w, grad_x), steps = jax.grad(loss, argnums=(0, 1), has_aux=True)(w, x)
  assert len(set(steps.tolist())) > 1, steps  # really different lengths
  alone = [jax.grad(loss, argnums=(0, 1), has_aux=True)(w, x[i:i + 1])[0]
           for i in range(3)]
  chex.assert_trees_all_close(grad_w, sum(g[0] for g in alone),
                              rtol=1e-9, atol=1e-12)
  chex.assert_trees_all_close(grad_x, jnp.concatenate([g[1] for g in alone]),
                              rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", UNROLLED)
def test_unrolled_gradient_skips_a_diverging_sample(mode, x64):
  # z <- c z^2 + x: sample 0 converges; sample 1 overflows to inf and is
  # flagged. Its best iterate is z0 (its residual only grew), so it adds
  # nothing to dL/dc, and its inf/NaN steps must not poison the shared
  # gradient.
  f = lambda z, a: a[0] * z * z + a[1]
  solver = jaxdeq.FixedPointIteration(1e-10, 50, relative=False)

  def loss(c, x):
    sol = jaxdeq.fixed_point(f, jnp.zeros_like(x), (c, x), solver=solver,
                             adjoint=UNROLLED[mode])
    return jnp.sum(sol.value), sol.stats

  c = jnp.array(0.1)
  (grad_c, grad_x), stats = jax.grad(loss, argnums=(0, 1), has_aux=True)(
      c, jnp.array([[0.1], [10.0]]))
  assert stats.converged.tolist() == [True, False]
  assert int(stats.best_step[1]) == 0
  (alone_c, alone_x), _ = jax.grad(loss, argnums=(0, 1), has_aux=True)(
      c, jnp.array([[0.1]]))
  chex.assert_tree_all_finite((grad_c, grad_x))
  chex.assert_trees_all_close(grad_c, alone_c, rtol=1e-12)
  chex.assert_trees_all_close(grad_x, jnp.array([[alone_x[0, 0]], [0.0]]),
                              rtol=1e-12)


@pytest.mark.parametrize("mode", UNROLLED)
def test_unrolled_gradient_survives_a_step_that_overflows_inside_f(mode):
  # z <- exp(w z) x: sample 1's step overflows from finite inputs (exp's
  # residual is inf), after the iterate returned for it: 0 * inf must not
  # reach the shared dL/dw.
  f = lambda z, a: jnp.exp(z * a[0]) * a[1]
  solver = jaxdeq.FixedPointIteration(1e-6, 50)

  def loss(w, x):
    sol = jaxdeq.fixed_point(f, jnp.zeros_like(x), (w, x), solver=solver,
                             adjoint=UNROLLED[mode])
    return sol.value[0].sum(), sol.stats

  w = jnp.float32(3.0)
  (grad_w, stats) = jax.grad(loss, has_aux=True)(w, jnp.array([[0.1], [1.0]]))
  assert stats.converged.tolist() == [True, False]
  alone, _ = jax.grad(loss, has_aux=True)(w, jnp.array([[0.1]]))
  assert np.isfinite(float(grad_w))
  chex.assert_trees_all_close(grad_w, alone, rtol=1e-6)


def test_unrolled_gradient_flows_to_z0_when_z0_is_best(x64):
  # An expanding map: every step raises the residual, so the value is z0 and
  # d value / d z0 is the identity while d value / d x is zero.
  f = lambda z, x: -1.5 * z + x
  solver = jaxdeq.FixedPointIteration(1e-10, 8, relative=False)

  def value(z0, x):
    return jaxdeq.fixed_point(f, z0, x, solver=solver,
                              adjoint=jaxdeq.UnrolledAdjoint()).value

  z0, x = jnp.array([[1.0, -2.0]]), jnp.array([[0.5, 0.25]])
  chex.assert_trees_all_close(value(z0, x), z0)
  jac_z0, jac_x = jax.jacobian(value, argnums=(0, 1))(z0, x)
  chex.assert_trees_all_close(jac_z0.reshape(2, 2), jnp.eye(2))
  chex.assert_trees_all_close(jac_x, jnp.zeros_like(jac_x))


def test_unrolled_mode_follows_the_memory_budget():
  # A step's residuals: tanh's output and 1 - it (2 x 1,600 bytes) and two
  # scalars: 3,208 bytes (the finite mask is not one: see tree.py).
  z0 = jnp.zeros((4, 100), jnp.float32)
  f = lambda z, x: 0.5 * jnp.tanh(z) + x
  plan = lambda adjoint, steps: adjoint._plan(
      f, z0, z0, jaxdeq.FixedPointIteration(1e-4, steps))
  # (tape rows, checkpoint interval): all on the tape, then the tape's 100
  # rows cut to whole 11-step segments with the rest replayed, then none.
  assert plan(jaxdeq.UnrolledAdjoint(memory_budget=3208 * 100), 100) == (
      100, None)
  assert plan(jaxdeq.UnrolledAdjoint(memory_budget=3208 * 100), 101) == (
      99, 11)
  assert plan(jaxdeq.UnrolledAdjoint(memory_budget=0), 100) == (0, 10)
  for bad in (-1, 1.5, None):
    with pytest.raises(ValueError, match="memory_budget"):
      jaxdeq.UnrolledAdjoint(memory_budget=bad)


@pytest.mark.parametrize("mode", UNROLLED)
def test_unrolled_cost_follows_steps_taken_not_max_steps(mode):
  calls = []

  def f(z, a):
    jax.debug.callback(lambda: calls.append(1))
    return 0.5 * z + a

  grad = jax.grad(lambda a: jnp.sum(jaxdeq.fixed_point(
      f, jnp.zeros((1, 1)), a, solver=jaxdeq.FixedPointIteration(1e-3, 10_000),
      adjoint=UNROLLED[mode]).value))
  jax.block_until_ready(grad(jnp.ones((1, 1))))
  jax.effects_barrier()
  # ~13 steps: forward, replay and VJP each evaluate f about once per step.
  assert 0 < len(calls) < 60


def test_implicit_gradient_wrt_z0_is_zero_and_unrolled_is_not():
  x = jnp.ones((2, 3))
  f = lambda z, x: 0.5 * jnp.tanh(z) + x

  def out(z0, adjoint, tol):
    return jnp.sum(jaxdeq.fixed_point(
        f, z0, x, solver=jaxdeq.FixedPointIteration(tol, 3),
        adjoint=adjoint).value)

  z0 = jnp.zeros((2, 3))
  g_implicit = jax.grad(out)(z0, jaxdeq.ImplicitAdjoint(), 1e-3)
  g_unrolled = jax.grad(out)(z0, jaxdeq.UnrolledAdjoint(), 1e-3)
  np.testing.assert_array_equal(g_implicit, 0.0)
  assert float(jnp.abs(g_unrolled).sum()) > 0


def test_integer_and_none_leaves_in_args():
  def f(z, args):
    x, count, _ = args
    return 0.5 * jnp.tanh(z) + x * count.astype(z.dtype)

  for adjoint in [jaxdeq.ImplicitAdjoint(), jaxdeq.UnrolledAdjoint(),
                  jaxdeq.PhantomAdjoint()]:
    g = jax.grad(lambda x: jnp.sum(jaxdeq.fixed_point(
        f, jnp.zeros((2, 3)), (x, jnp.array(2), None),
        adjoint=adjoint).value))(jnp.ones((2, 3)))
    chex.assert_tree_all_finite(g)


def test_newton_implicit_uses_transposed_closed_form(x64):
  # The tutorial's implicit Newton layer: backward solved with J^T.
  w, x = tanh_problem(dim=5, batch=3, seed=4)
  solver = jaxdeq.Newton(1e-10, 40, jacobian=tanh_jacobian)
  calls = []

  def jacobian(z, args):
    jax.debug.callback(lambda: calls.append(1))
    return tanh_jacobian(z, args)

  counted = jaxdeq.Newton(1e-10, 40, jacobian=jacobian)
  g = jax.grad(solve_fn(counted, jaxdeq.ImplicitAdjoint()))(w, x)
  jax.effects_barrier()
  assert calls  # the closed form was used, no jacfwd
  g_ref = jax.grad(solve_fn(solver, jaxdeq.UnrolledAdjoint()))(w, x)
  chex.assert_trees_all_close(g, g_ref, rtol=1e-7, atol=1e-9)


def test_backward_probe_reports_backward_stats():
  w, x = tanh_problem(dtype=jnp.float32)

  def loss(w, probe):
    sol = jaxdeq.fixed_point(tanh_map, jnp.zeros_like(x), (w, x),
                             solver=jaxdeq.Anderson(1e-5, 50),
                             backward_probe=probe)
    return jnp.sum(sol.value ** 2)

  g_w, g_probe = jax.jit(jax.grad(loss, argnums=(0, 1)))(
      w, jaxdeq.backward_probe())
  stats = jaxdeq.BackwardStats.from_probe_grad(g_probe)
  assert 0 < int(stats.num_steps) <= 50
  assert 0 <= float(stats.residual) <= 1e-5
  assert int(stats.not_converged) == 0
  # The probe changes no other gradient.
  g_plain = jax.grad(lambda w: loss(w, None))(w)
  chex.assert_trees_all_close(g_w, g_plain)


def test_backward_failure_is_reported_not_zeroed():
  w, x = tanh_problem(dtype=jnp.float32)
  backward = jaxdeq.ImplicitAdjoint(
      linear_solver=jaxdeq.FixedPointIteration(1e-9, 2))
  seen = []
  callback_adjoint = jaxdeq.ImplicitAdjoint(
      linear_solver=jaxdeq.FixedPointIteration(1e-9, 2),
      callback=lambda stats: seen.append(int(stats.status)))

  def loss(w, probe, adjoint):
    sol = jaxdeq.fixed_point(tanh_map, jnp.zeros_like(x), (w, x),
                             solver=jaxdeq.Anderson(1e-6, 50),
                             adjoint=adjoint, backward_probe=probe)
    return jnp.sum(sol.value)

  g_w, g_probe = jax.grad(loss, argnums=(0, 1))(
      w, jaxdeq.backward_probe(), backward)
  assert int(jaxdeq.BackwardStats.from_probe_grad(g_probe).not_converged) == 3
  assert float(jnp.abs(g_w).sum()) > 0  # best iterate, not zeros
  jax.grad(loss)(w, None, callback_adjoint)
  jax.effects_barrier()
  assert seen == [jaxdeq.Status.MAX_STEPS_REACHED]
  throwing = jaxdeq.ImplicitAdjoint(
      linear_solver=jaxdeq.FixedPointIteration(1e-9, 2), throw=True)
  with pytest.raises(jaxdeq.FixedPointError,
                     match="^jaxdeq: the backward solve failed"):
    jaxdeq.catch_failures(jax.jit(jax.grad(
        lambda w: loss(w, None, throwing))))(w)


def test_grad_under_jit_and_vmap():
  w, x = tanh_problem(dtype=jnp.float32)
  grad = jax.jit(jax.grad(solve_fn(jaxdeq.Anderson(1e-6, 100),
                                   jaxdeq.ImplicitAdjoint())))
  chex.assert_tree_all_finite(grad(w, x))
  per_problem = jax.vmap(grad, in_axes=(0, None))(jnp.stack([w, 0.5 * w]), x)
  chex.assert_shape(per_problem, (2,) + w.shape)
  chex.assert_trees_all_close(per_problem[1], grad(0.5 * w, x), rtol=1e-4,
                              atol=1e-6)


def test_newton_dense_solve_gradient(x64):
  from jaxdeq._src.solvers.newton import dense_solve
  key_j, key_b = jax.random.split(jax.random.key(0))
  jac = jax.random.normal(key_j, (3, 5, 5), jnp.float64) + 3 * jnp.eye(
      5, dtype=jnp.float64)[None]
  rhs = jax.random.normal(key_b, (3, 5), jnp.float64)
  check_grads(dense_solve, (jac, rhs), order=1, modes=["rev"])
  stock = jax.grad(lambda j, b: jnp.sum(jnp.sin(
      jnp.linalg.solve(j, b[..., None])[..., 0])), argnums=(0, 1))(jac, rhs)
  ours = jax.grad(lambda j, b: jnp.sum(jnp.sin(dense_solve(j, b))),
                  argnums=(0, 1))(jac, rhs)
  chex.assert_trees_all_close(ours, stock, atol=1e-12)


def test_gmres_backward_where_iteration_barely_contracts(x64):
  # z = -0.9996 z + c: dz*/dc = 1 / 1.9996. The backward iteration
  # u <- -0.9996 u + g oscillates and barely contracts; GMRES solves it in
  # one Krylov step and reports its status like the forward's.
  f = lambda z, c: -0.9996 * z + c
  solver = jaxdeq.Anderson(tol=1e-12, max_steps=50)

  def loss(c, probe, backward):
    sol = jaxdeq.fixed_point(f, jnp.zeros((2, 1)), c, solver=solver,
                             adjoint=jaxdeq.ImplicitAdjoint(linear_solver=backward),
                             backward_probe=probe)
    return jnp.sum(sol.value)

  c = jnp.ones((2, 1))
  probe = jaxdeq.backward_probe(jnp.float64)
  iterated, iterated_probe = jax.grad(loss, argnums=(0, 1))(
      c, probe, jaxdeq.FixedPointIteration(1e-12, 200))
  assert int(jaxdeq.BackwardStats.from_probe_grad(
      iterated_probe).not_converged) == 2
  assert not np.allclose(iterated, 1 / 1.9996, rtol=1e-3)
  gmres, gmres_probe = jax.grad(loss, argnums=(0, 1))(
      c, probe, jaxdeq.GMRES(tol=1e-10))
  np.testing.assert_allclose(gmres, 1 / 1.9996, rtol=1e-10)
  stats = jaxdeq.BackwardStats.from_probe_grad(gmres_probe)
  assert int(stats.not_converged) == 0
  assert float(stats.residual) < 1e-10


def test_gmres_adjoint_on_a_tanh_layer_matches_finite_differences(x64):
  w, x = tanh_problem()
  solve = solve_fn(jaxdeq.Anderson(1e-12, 200),
                   jaxdeq.ImplicitAdjoint(linear_solver=jaxdeq.GMRES(tol=1e-12)))
  check_grads(solve, (w, x), order=1, modes=["rev", "fwd"], eps=1e-6,
              atol=1e-6, rtol=1e-6)


def test_gmres_config_is_checked():
  with pytest.raises(ValueError, match="krylov_dim"):
    jaxdeq.GMRES(krylov_dim=0)
  with pytest.raises(TypeError, match="linear solver must be"):
    jaxdeq.ImplicitAdjoint(linear_solver="gmres")


@pytest.mark.parametrize("name", ["anderson", "newton_closed_form"])
def test_implicit_forward_mode_equals_reverse_mode(name, x64):
  # The tangent solve (with the closed-form Jacobian for Newton) and its
  # transpose (with the transposed Jacobian) give the same Jacobian.
  w, x = tanh_problem(dim=4, batch=2, seed=7)

  def value(x):
    return jaxdeq.fixed_point(tanh_map, jnp.zeros_like(x), (w, x),
                              solver=SOLVERS[name]).value

  chex.assert_trees_all_close(jax.jacfwd(value)(x), jax.jacrev(value)(x),
                              atol=1e-9)


def test_implicit_backward_applies_the_vjp_once_per_step_and_once_for_args():
  # A linear solve from zero needs no VJP to know its map there (f(0) = g):
  # the backward's VJPs are its steps plus the one pulling u to the args.
  pulls, backward_steps = [], []

  @jax.custom_vjp
  def half_tanh(z):
    return 0.5 * jnp.tanh(z)

  def half_tanh_fwd(z):
    return half_tanh(z), z

  def half_tanh_bwd(z, g):
    jax.debug.callback(lambda: pulls.append(1))
    return (0.5 * g * (1 - jnp.tanh(z) ** 2),)

  half_tanh.defvjp(half_tanh_fwd, half_tanh_bwd)
  adjoint = jaxdeq.ImplicitAdjoint(
      callback=lambda stats: backward_steps.append(int(stats.num_steps)))
  grad = jax.jit(jax.grad(lambda x: jnp.sum(jaxdeq.fixed_point(
      lambda z, x: half_tanh(z + x), jnp.zeros_like(x), x,
      solver=jaxdeq.Anderson(1e-6, 50), adjoint=adjoint).value)))
  g = jax.block_until_ready(grad(jnp.ones((2, 3))))
  jax.effects_barrier()
  assert backward_steps and backward_steps[0] >= 2
  assert len(pulls) == backward_steps[0] + 1
  # z* = tanh(z* + x) / 2: dz*/dx = s / (1 - s), s = sech^2(z* + x) / 2.
  x = jnp.ones((2, 3))
  z = jaxdeq.fixed_point(lambda z, x: half_tanh(z + x), jnp.zeros_like(x), x,
                         solver=jaxdeq.Anderson(1e-6, 100)).value
  s = 0.5 / jnp.cosh(z + x) ** 2
  chex.assert_trees_all_close(g, s / (1 - s), rtol=1e-4)
