"""The default solver takes no more steps than plain iteration on
contractive maps (float32 and float64)."""

import jax
import jax.numpy as jnp
import pytest

import jaxdeq


def contractive_maps(dtype):
  keys = jax.random.split(jax.random.key(0), 6)
  w = 0.1 * jax.random.normal(keys[0], (100, 100), dtype)
  x = jax.random.normal(keys[1], (32, 100), dtype)
  yield "readme_tanh", lambda z, a: jnp.tanh(z @ a[0] + a[1]), (w, x)
  w = 0.075 * jax.random.normal(keys[2], (64, 64), dtype)
  x = jax.random.normal(keys[3], (16, 64), dtype)
  yield "tanh", lambda z, a: jnp.tanh(z @ a[0] + a[1]), (w, x)
  a = 0.08 * jax.random.normal(keys[4], (32, 32), dtype)
  x = jax.random.normal(keys[5], (8, 32), dtype)
  yield "cos_coupled", lambda z, a: 0.6 * jnp.cos(z @ a[0]) + a[1], (a, x)
  yield "linear_0.9", lambda z, a: 0.9 * z + a[1], (a, x)


@pytest.mark.parametrize("tol", [1e-4, 1e-10])
def test_default_anderson_is_no_slower_than_plain_iteration(tol):
  dtype = jnp.float64 if tol < 1e-6 else jnp.float32
  with jax.enable_x64(dtype == jnp.float64):
    for name, f, args in contractive_maps(dtype):
      z0 = jnp.zeros_like(args[1])
      steps = {}
      for solver in (jaxdeq.Anderson(tol, 300),
                     jaxdeq.FixedPointIteration(tol, 300)):
        sol = jaxdeq.fixed_point(f, z0, args, solver=solver)
        assert bool(jnp.all(sol.stats.converged)), (name, solver)
        steps[type(solver).__name__] = int(sol.stats.num_steps)
      assert steps["Anderson"] <= steps["FixedPointIteration"], (name, steps)


def test_the_tutorial_settings_stay_available():
  # The tutorial's absolute regularisation lags behind on the README map.
  f, args = list(contractive_maps(jnp.float32))[0][1:]
  z0 = jnp.zeros_like(args[1])
  steps = lambda solver: int(jaxdeq.fixed_point(
      f, z0, args, solver=solver).stats.num_steps)
  tutorial = jaxdeq.Anderson(1e-4, 50, m=5, lam=1e-4, lam_relative=False)
  assert steps(tutorial) > steps(jaxdeq.Anderson(1e-4, 50))
