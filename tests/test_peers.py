"""Peers' fixed-point test cases, through a thin adapter.

The problems of optimistix's `test_fixed_point.py` (its `helpers.py`:
pytree states, a small MLP, a nonlinear heat equation step, implicit
midpoint steps in y-, f- and k-space, the stiff Robertson system) and of
jaxopt's `fixed_point_iteration_test.py`, written again here from their
mathematics. The adapter `peer_fixed_point` is all that differs from the
peers' calls: their states are single samples, so `batched=False`.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from jax.test_util import check_grads

import jaxdeq


def peer_fixed_point(fn, init, args, *, solver=None, adjoint=None,
                     has_aux=False):
  solver = solver or jaxdeq.Anderson(tol=1e-10, max_steps=10_000,
                                     relative=False)
  return jaxdeq.fixed_point(fn, init, args, solver=solver, adjoint=adjoint,
                            has_aux=has_aux, batched=False)


# ------------------------------------------------- optimistix's problems ---


def sin_map(tree, const):
  return jax.tree.map(lambda x: jnp.sin(const * x), tree)


def exponential_map(tree, const):
  return jax.tree.map(lambda x: jnp.exp(-const * x), tree)


def mlp_map(tree, weights):
  """0.1 * MLP(y) on the raveled state: one softplus layer of width 8."""
  y, unravel = ravel_pytree(tree)
  w1, b1, w2, b2 = weights
  return unravel(0.1 * (w2 @ jax.nn.softplus(w1 @ y + b1) + b2))


def heat_map(y, const):
  """optimistix's "nonlinear heat equation" step, as its helper evaluates it.

  Its Crank-Nicolson step y0 + dt/2 (f(y) + f(y0)) with f(y) = (1 - y) L(y)
  uses a Laplacian helper that returns its input, so the map it tests is
  this smooth contraction (the true Laplacian, 1/dx = 50, would make the
  step no contraction at all).
  """
  y0 = jnp.linspace(-1.0, 1.0, 100, dtype=y.dtype) ** 2
  return const * (y0 + 0.5 * ((1 - y) * y + (1 - y0) * y0))


def _midpoint(space, vector_field, tree, args, dt):
  y, unravel = ravel_pytree(tree)
  y0 = jnp.zeros_like(y)
  if space == "y":
    out = y0 + dt * vector_field(0.5 * (y0 + y), args)
  elif space == "f":
    out = vector_field(y0 + dt * y, args)
  else:  # "k"
    out = dt * vector_field(y0 + y, args)
  return unravel(out)


def linear_midpoint(space):
  def fn(tree, matrix):
    return _midpoint(space, lambda y, m: m @ y, tree, matrix,
                     jnp.asarray(1 / 16, matrix.dtype))
  return fn


def robertson(y, k):
  k1, k2, k3 = k
  return jnp.stack([-k1 * y[0] + k3 * y[1] * y[2],
                    k1 * y[0] - k2 * y[1] ** 2 - k3 * y[1] * y[2],
                    k2 * y[1] ** 2])


def robertson_midpoint(space):
  def fn(tree, k):
    return _midpoint(space, robertson, tree, k, jnp.asarray(1e-8, k[0].dtype))
  return fn


def _problems(dtype):
  ones_pytree = ({"a": 0.5 * jnp.ones((3, 2, 4), dtype)},
                 0.5 * jnp.ones(4, dtype))
  size = ravel_pytree(ones_pytree)[0].size
  keys = jax.random.split(jax.random.key(19), 5)
  matrix = jax.random.normal(keys[0], (size, size), dtype)
  mlp = (jax.random.normal(keys[1], (8, size), dtype) / math.sqrt(size),
         jax.random.normal(keys[2], (8,), dtype) / math.sqrt(size),
         jax.random.normal(keys[3], (size, 8), dtype) / math.sqrt(8),
         jax.random.normal(keys[4], (size,), dtype) / math.sqrt(8))
  robertson_args = (jnp.asarray(0.04, dtype), jnp.asarray(3e7, dtype),
                    jnp.asarray(1e4, dtype))
  ones_robertson = (jnp.ones(2, dtype), {"b": jnp.asarray(1.0, dtype)})
  one = jnp.asarray(1.0, dtype)
  return {
      "sin": (sin_map, ones_pytree, one),
      "exponential": (exponential_map, ones_pytree, one),
      "mlp": (mlp_map, ones_pytree, mlp),
      "heat_pde": (heat_map, jnp.ones(100, dtype), one),
      "midpoint_y_linear": (linear_midpoint("y"), ones_pytree, matrix),
      "midpoint_f_linear": (linear_midpoint("f"), ones_pytree, matrix),
      "midpoint_k_linear": (linear_midpoint("k"), ones_pytree, matrix),
      "midpoint_y_robertson": (robertson_midpoint("y"), ones_robertson,
                               robertson_args),
      "midpoint_f_robertson": (robertson_midpoint("f"), ones_robertson,
                               robertson_args),
      "midpoint_k_robertson": (robertson_midpoint("k"), ones_robertson,
                               robertson_args),
  }


PROBLEMS = list(_problems(jnp.float32))
SMOKE_AUX = {"smoke_aux": jnp.ones(2)}


def _with_aux(fn, has_aux):
  return (lambda y, args: (fn(y, args), SMOKE_AUX)) if has_aux else fn


@pytest.mark.parametrize("name", PROBLEMS)
def test_optimistix_fixed_point(name):
  # optimistix picks has_aux at random per case; every other problem here.
  has_aux = PROBLEMS.index(name) % 2 == 1
  fn, init, args = _problems(jnp.float32)[name]
  sol = peer_fixed_point(_with_aux(fn, has_aux), init, args, has_aux=has_aux,
                         solver=jaxdeq.Anderson(tol=1e-6, max_steps=10_000,
                                                relative=False))
  chex.assert_trees_all_close(sol.value, fn(sol.value, args), atol=1e-4,
                              rtol=1e-4)
  if has_aux:
    chex.assert_trees_all_close(sol.aux, SMOKE_AUX)


# sin(x) = x has its fixed point at 0, where df/dx = 1: I - df/dz is
# singular, the implicit function theorem does not apply, and the solve's
# finite differences depend on where it stopped.
@pytest.mark.parametrize("dtype", ["float64", "complex128"])
@pytest.mark.parametrize("name", [p for p in PROBLEMS if p != "sin"])
def test_optimistix_fixed_point_jvp(name, dtype, x64):
  # optimistix checks the implicit JVP against finite differences of the
  # solve, with random tangents for init and args, in float64 and
  # complex128; z* does not depend on init, so its tangent must not move the
  # result.
  fn, init, args = _problems(jnp.dtype(dtype))[name]
  keys = iter(jax.random.split(jax.random.key(0), 64))
  t_init = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape,
                                                    x.dtype), init)
  t_args = jax.tree.map(lambda x: jax.random.normal(next(keys), x.shape,
                                                    x.dtype), args)

  def solve(init, args):
    return peer_fixed_point(fn, init, args).value

  out, t_out = jax.jvp(solve, (init, args), (t_init, t_args))
  eps = 1e-6
  shifted = lambda s: solve(
      jax.tree.map(lambda x, t: x + s * t, init, t_init),
      jax.tree.map(lambda x, t: x + s * t, args, t_args))
  t_expected = jax.tree.map(lambda a, b: (a - b) / (2 * eps), shifted(eps),
                            shifted(-eps))
  chex.assert_trees_all_close(out, solve(init, args), atol=1e-8)
  chex.assert_trees_all_close(t_out, t_expected, atol=1e-3, rtol=1e-3)


# ------------------------------------------------------ jaxopt's problems ---


def test_jaxopt_geometric_decay():
  f = lambda x, _: jnp.array([0.9, 0.99, 0.999]) * x
  sol = peer_fixed_point(f, jnp.array([1.0, 0.4, -0.2]), None,
                         solver=jaxdeq.FixedPointIteration(
                             tol=1e-5, max_steps=8000, relative=False))
  assert float(sol.stats.residual) < 1e-5
  assert float(jnp.linalg.norm(sol.value)) < 1e-2


@pytest.mark.parametrize("jit", [False, True])
def test_jaxopt_sin_fixed_point_tuple_state(jit):
  f = lambda x, _: (jnp.sin(x[0]) * x[0] ** 2, x[1] ** 3)
  x0 = (jnp.array([0.6, 0.0, -0.1]), jnp.array([[0.7], [0.5]]))
  solve = lambda x0: peer_fixed_point(
      f, x0, None, solver=jaxdeq.FixedPointIteration(
          tol=1e-6, max_steps=100, relative=False))
  sol = jax.jit(solve)(x0) if jit else solve(x0)
  assert float(sol.stats.residual) < 1e-6
  chex.assert_trees_all_close(sol.value, (jnp.zeros(3), jnp.zeros((2, 1))),
                              atol=1e-6)


def test_jaxopt_cos_fixed_point_with_parameters():
  f = lambda x, theta: jnp.cos(x) + theta
  theta = jnp.array([0.0, jnp.pi / 2])
  sol = peer_fixed_point(f, jnp.array([0.3, jnp.pi / 4]), theta,
                         solver=jaxdeq.FixedPointIteration(
                             tol=1e-2, max_steps=100_000, relative=False))
  np.testing.assert_allclose(sol.value, [0.73908614842288, jnp.pi / 2],
                             atol=1e-2)


@pytest.mark.parametrize("backward", [
    None, jaxdeq.GMRES(tol=1e-10)], ids=["fixed_point_backward", "gmres"])
def test_jaxopt_simple_grads(backward, x64):
  # x = cos(x) + pi / 2 has x* = pi / 2 with df/dx = -sin(x*) = -1: the
  # backward iteration u <- -u + g never contracts; GMRES solves it.
  f = lambda x, theta: jnp.cos(x) + theta
  x0 = jnp.array([0.0, jnp.pi / 4])
  solver = jaxdeq.Anderson(tol=1e-10, max_steps=4000, relative=False)
  adjoint = jaxdeq.ImplicitAdjoint(linear_solver=backward)
  solve = lambda theta: peer_fixed_point(f, x0, theta, solver=solver,
                                         adjoint=adjoint).value
  check_grads(solve, (jnp.array([0.0, jnp.pi / 2]),), order=1,
              modes=["rev", "fwd"], eps=1e-5, atol=1e-4, rtol=1e-4)


def test_jaxopt_grads_flat_landscape_with_aux(x64):
  f = lambda x, theta: (theta * x, x)
  solve = lambda theta: peer_fixed_point(
      f, jnp.array([1.0, -0.5]), theta, has_aux=True,
      solver=jaxdeq.FixedPointIteration(tol=1e-10, max_steps=1000,
                                        relative=False)).value
  check_grads(solve, (jnp.array([0.05, 0.2]),), order=1, modes=["rev"],
              eps=1e-4)


def test_jaxopt_affine_contractive_mapping(x64):
  n = 200
  key_m, key_b = jax.random.split(jax.random.key(0))
  m = jax.random.uniform(key_m, (n, n), jnp.float64, -1.0, 1.0)
  m = m + m.T
  m = m / (2 * jnp.max(jnp.abs(jnp.linalg.eigvalsh(m))) + 1e-4)
  b = jax.random.uniform(key_b, (n,), jnp.float64)
  f = lambda x, p: p[0] @ x + p[1]
  solver = jaxdeq.FixedPointIteration(tol=1e-10, max_steps=100,
                                      relative=False)
  sol = peer_fixed_point(f, jnp.zeros(n, jnp.float64), (m, b), solver=solver)
  assert float(sol.stats.residual) < 1e-10
  check_grads(lambda m, b: peer_fixed_point(f, jnp.zeros(n, jnp.float64),
                                            (m, b), solver=solver).value,
              (m, b), order=1, modes=["rev"], eps=1e-4)
