"""Honest failure: diverging, non-finite, empty and badly configured solves."""

import re
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdeq
from jaxdeq._src import loop


def diverging(z, a):
  del a
  return 2 * z + 1


@pytest.mark.parametrize("f, solver", [
    (diverging, jaxdeq.FixedPointIteration(max_steps=200)),
    (lambda z, a: z * z + 1, jaxdeq.Anderson(max_steps=200)),
    (lambda z, a: z * z + 1, jaxdeq.Broyden(max_steps=200)),
], ids=["iteration_2z+1", "anderson_z^2+1", "broyden_z^2+1"])
def test_diverging_map_is_never_reported_converged(f, solver):
  # In float32 ||f(z)|| of 2z + 1 overflows after ~64 doublings; the
  # relative residual used to become 0 there and the solve "converged" at
  # 9e18. z^2 + 1 has no real fixed point at all.
  sol = jaxdeq.fixed_point(f, jnp.ones((2, 3)), None, solver=solver)
  assert int(sol.stats.status) != jaxdeq.Status.SUCCESSFUL
  assert not bool(jnp.any(sol.stats.converged))
  assert bool(jnp.all(~(sol.stats.residual <= solver.tol)))
  with pytest.raises(jaxdeq.FixedPointError,
                     match="^jaxdeq: the forward solve failed"):
    jaxdeq.fixed_point(f, jnp.ones((2, 3)), None, solver=solver, throw=True)


def test_overflowing_norms_mark_the_sample_failed():
  # Finite entries whose sum of squares overflows float32: the relative
  # residual would be finite / inf = 0. The sample is failed instead.
  solver = jaxdeq.FixedPointIteration()
  z = jnp.array([[3e30, 4e30], [3.0, 4.0]], jnp.float32)
  res = loop.residual(z, 2 * z, solver)
  assert bool(jnp.isnan(res[0]))
  np.testing.assert_allclose(res[1], 5 / (10 + 1e-5), rtol=1e-6)


def test_nan_map_is_flagged_and_the_value_stays_finite():
  f = lambda z, x: jnp.where(z > 2, jnp.nan, z + x)
  sol = jaxdeq.fixed_point(f, jnp.zeros((2, 1)), jnp.array([[0.0], [1.0]]),
                           solver=jaxdeq.FixedPointIteration(1e-6, 20))
  assert int(sol.stats.status) == jaxdeq.Status.NONFINITE
  assert sol.stats.converged.tolist() == [True, False]
  chex.assert_tree_all_finite(sol.value)


def test_phantom_value_is_exact_and_its_gradient_nan_safe():
  # The phantom steps of 2z + x overflow; the forward value must stay z*
  # (which the solve never reached, so the best iterate) and the gradient
  # of the exploding sample must not be NaN.
  f = lambda z, x: jnp.where(x > 0, 0.5 * z + x, 2 * z + x)
  x = jnp.array([[1.0], [-1.0]])
  solver = jaxdeq.FixedPointIteration(1e-6, 60)
  exact = jaxdeq.fixed_point(f, jnp.zeros_like(x), x, solver=solver).value
  phantom = jaxdeq.PhantomAdjoint(steps=300, damping=1.0)

  def value(x):
    return jaxdeq.fixed_point(f, jnp.zeros_like(x), x, solver=solver,
                              adjoint=phantom).value

  np.testing.assert_array_equal(value(x), exact)
  grad = jax.grad(lambda x: jnp.sum(value(x)))(x)
  chex.assert_tree_all_finite(grad)
  np.testing.assert_allclose(grad[0, 0], 2.0, rtol=1e-5)
  assert float(grad[1, 0]) == 0.0


def test_phantom_does_no_work_at_inference():
  calls = []

  def f(z, x):
    jax.debug.callback(lambda: calls.append(1))
    return 0.5 * z + x

  def count(adjoint):
    del calls[:]
    jax.block_until_ready(jaxdeq.fixed_point(
        f, jnp.zeros((1, 1)), jnp.ones((1, 1)),
        solver=jaxdeq.FixedPointIteration(1e-6, 100), adjoint=adjoint).value)
    jax.effects_barrier()
    return len(calls)

  assert count(jaxdeq.PhantomAdjoint(steps=50)) == count(
      jaxdeq.ImplicitAdjoint())


def test_empty_batch_returns_at_once():
  for adjoint in [jaxdeq.ImplicitAdjoint(), jaxdeq.UnrolledAdjoint()]:
    sol = jaxdeq.fixed_point(lambda z, x: jnp.tanh(z) + x, jnp.zeros((0, 4)),
                             jnp.ones((0, 4)), adjoint=adjoint)
    chex.assert_shape(sol.value, (0, 4))
    chex.assert_shape(sol.stats.residual, (0,))
    assert int(sol.stats.num_steps) == 0
    assert int(sol.stats.status) == jaxdeq.Status.SUCCESSFUL


def test_huge_max_steps_costs_no_trace_memory():
  solver = jaxdeq.FixedPointIteration(1e-5, 10**8)
  sol = jaxdeq.fixed_point(lambda z, x: 0.5 * z + x, jnp.zeros((3, 2)),
                           jnp.ones((3, 2)), solver=solver)
  chex.assert_shape(sol.stats.trace, (loop.MAX_TRACE_STEPS, 3))
  steps = int(sol.stats.num_steps)
  assert 10 < steps < 30
  assert bool(jnp.all(jnp.isfinite(sol.stats.trace[:steps])))
  assert bool(jnp.all(jnp.isnan(sol.stats.trace[steps:])))


def test_trace_stops_at_its_last_row_on_long_solves():
  solver = jaxdeq.FixedPointIteration(1e-12, 3000, relative=False)
  f = lambda z, x: 0.995 * z + x
  sol = jaxdeq.fixed_point(f, jnp.zeros((1, 1)), jnp.ones((1, 1)),
                           solver=solver)
  assert int(sol.stats.num_steps) > loop.MAX_TRACE_STEPS
  trace = np.asarray(sol.stats.trace[:, 0])
  # Row k is the residual after step k + 1: |z_k+1 - z_k| = 0.995^k.
  np.testing.assert_allclose(trace[[0, 500, 1023]],
                             0.995 ** np.array([1.0, 501.0, 1024.0]),
                             rtol=1e-3)


def test_newton_and_anderson_on_bfloat16():
  x = jnp.ones((2, 3), jnp.bfloat16)
  f = lambda z, x: 0.5 * jnp.tanh(z) + x
  for solver in [jaxdeq.Newton(tol=1e-2), jaxdeq.Anderson(tol=1e-2),
                 jaxdeq.Broyden(tol=1e-2)]:
    sol = jaxdeq.fixed_point(f, jnp.zeros_like(x), x, solver=solver)
    assert sol.value.dtype == jnp.bfloat16
    assert bool(jnp.all(sol.stats.converged)), solver
    # z* = 0.5 tanh(z*) + 1 = 1.44761 (float64), to bfloat16 precision.
    np.testing.assert_allclose(sol.value.astype(jnp.float32), 1.44761,
                               atol=2e-2)


def test_tolerance_below_bfloat16_resolution_is_refused():
  with pytest.raises(ValueError, match=r"tol=0\.0001 is below .*bfloat16"):
    jaxdeq.fixed_point(lambda z, a: 0.5 * z, jnp.ones((2, 3), jnp.bfloat16))


def test_tolerance_below_float32_resolution_warns():
  with pytest.warns(UserWarning, match="below the resolution of the float32"):
    jaxdeq.fixed_point(lambda z, a: 0.5 * z, jnp.ones((2, 3), jnp.float32),
                       solver=jaxdeq.Anderson(tol=1e-9))


def test_throw_under_jit_names_the_failure_first():
  @jax.jit
  def solve(x):
    return jaxdeq.fixed_point(diverging, x, None, throw=True,
                              solver=jaxdeq.FixedPointIteration(max_steps=5)
                              ).value

  with pytest.raises(jax.errors.JaxRuntimeError,
                     match="jaxdeq: the forward solve failed") as error:
    jax.block_until_ready(solve(jnp.ones((2, 2))))
  # JAX's error ends with the message, which points to catch_failures.
  assert str(error.value).rstrip().endswith(
      "wrap the jitted function in jaxdeq.catch_failures to get this"
      " FixedPointError with its message first.)")
  with pytest.raises(jaxdeq.FixedPointError) as error:
    jaxdeq.catch_failures(solve)(jnp.ones((2, 2)))
  first_line = str(error.value).splitlines()[0]
  assert first_line.startswith("jaxdeq: the forward solve failed")
  assert re.search(r"2 of 2 samples above tol=0\.0001", first_line)
  assert "catch_failures" not in str(error.value)


def test_successful_throw_solve_raises_nothing():
  sol = jaxdeq.fixed_point(lambda z, x: 0.5 * z + x, jnp.zeros((2, 2)),
                           jnp.ones((2, 2)), throw=True)
  chex.assert_trees_all_close(sol.value, 2 * jnp.ones((2, 2)), atol=1e-3)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"batched": 1}, TypeError, "batched must be a bool"),
    ({"throw": "yes"}, TypeError, "throw must be a bool"),
    ({"has_aux": None}, TypeError, "has_aux must be a bool"),
    ({"adjoint": jaxdeq.UnrolledAdjoint(),
      "backward_probe": jaxdeq.backward_probe()}, ValueError,
     "backward_probe needs"),
])
def test_bad_options(kwargs, error, match):
  with pytest.raises(error, match=match):
    jaxdeq.fixed_point(lambda z, a: 0.5 * z, jnp.ones((2, 3)), **kwargs)


def test_bad_pytree_states():
  f = lambda z, a: z
  with pytest.raises(TypeError, match=r"z0\['b'\] must be a floating or complex array"):
    jaxdeq.fixed_point(f, {"a": jnp.ones((2, 3)), "b": jnp.ones((2,), int)})
  with pytest.raises(ValueError, match="same leading .batch. axis"):
    jaxdeq.fixed_point(f, (jnp.ones((2, 3)), jnp.ones((3, 3))))
  with pytest.raises(ValueError, match="structure"):
    jaxdeq.fixed_point(lambda z, a: z[0], (jnp.ones((2, 3)),
                                            jnp.ones((2, 3))))
  with pytest.raises(ValueError, match=r"z\[1\] has shape \(2, 3\).*\(2, 2\)"):
    jaxdeq.fixed_point(lambda z, a: (z[0], z[0][:, :2]),
                       (jnp.ones((2, 3)), jnp.ones((2, 3))))
  with pytest.raises(ValueError, match="empty pytree"):
    jaxdeq.fixed_point(f, {})


@pytest.mark.parametrize("make", [
    lambda tol: jaxdeq.FixedPointIteration(tol=tol),
    lambda tol: jaxdeq.Anderson(tol=tol),
    lambda tol: jaxdeq.Broyden(tol=tol),
    lambda tol: jaxdeq.Newton(tol=tol),
    lambda tol: jaxdeq.GMRES(tol=tol, max_restarts=0),
    lambda tol: jaxdeq.GMRES(tol=tol),
])
@pytest.mark.parametrize("tol", [float("inf"), float("nan")])
def test_infinite_or_nan_tolerance_is_refused(make, tol):
  # tol=inf would report every sample converged after 0 steps.
  with pytest.raises(ValueError, match="tol must be"):
    make(tol)


def test_a_map_that_cannot_take_z0_names_z0s_shape():
  with pytest.raises(ValueError, match=r"fixed_point: f\(z0, args\) fails for"
                     r" z0 float32\[2,3\].*TypeError: dot_general"):
    jaxdeq.fixed_point(lambda z, w: z @ w, jnp.ones((2, 3), jnp.float32),
                       jnp.ones((4, 4), jnp.float32))


class _Unhashable:
  """A static argument that cannot be a jit cache key."""

  __hash__ = None

  def __init__(self, scale):
    self.scale = scale


def test_an_unhashable_static_argument_warns_once_per_eager_call():
  f = lambda z, a: 0.5 * z + a[0].scale * a[1]
  args = (_Unhashable(1.0), jnp.ones((2, 3), jnp.float32))
  with pytest.warns(UserWarning, match="a non-array leaf of args cannot be"
                    " hashed.*not cached"):
    sol = jaxdeq.fixed_point(f, jnp.zeros((2, 3), jnp.float32), args)
  np.testing.assert_allclose(sol.value, 2.0, rtol=1e-3)
  # Inside the caller's own jit there is nothing to warn about.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jax.jit(lambda b: jaxdeq.fixed_point(
        f, jnp.zeros((2, 3), jnp.float32), (args[0], b)).value)(args[1])
