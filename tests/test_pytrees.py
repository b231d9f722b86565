"""Research-code use: pytree states, closures, has_aux, every kind of autodiff."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import jaxdeq
from jaxdeq.nnx import DEQ

SOLVERS = {
    "iteration": jaxdeq.FixedPointIteration(1e-11, 400),
    "anderson": jaxdeq.Anderson(1e-11, 200),
    "broyden": jaxdeq.Broyden(1e-11, 200),
    "newton": jaxdeq.Newton(1e-11, 50),
    "newton_gmres": jaxdeq.Newton(1e-11, 50, linear_solver=jaxdeq.GMRES(
        tol=1e-12, max_restarts=0)),
}


def coupled_map(z, args):
  """Two coupled leaves of different shapes: a dict state."""
  w, x = args
  a = jnp.tanh(z["b"] @ w + x)
  b = 0.5 * jnp.sin(z["a"] @ w.T)
  return {"a": a, "b": b}


def coupled_problem(dtype=jnp.float64, batch=3, seed=0):
  key_w, key_x = jax.random.split(jax.random.key(seed))
  w = 0.4 * jax.random.normal(key_w, (4, 4), dtype) / 2
  x = jax.random.normal(key_x, (batch, 4), dtype)
  z0 = {"a": jnp.zeros((batch, 4), dtype), "b": jnp.zeros((batch, 4), dtype)}
  return z0, (w, x)


def as_array_map(z, args):
  """The same map on the concatenated state, as the reference."""
  out = coupled_map({"a": z[:, :4], "b": z[:, 4:]}, args)
  return jnp.concatenate([out["a"], out["b"]], axis=1)


@pytest.mark.parametrize("name", SOLVERS)
def test_dict_state_matches_the_array_state(name, x64):
  z0, args = coupled_problem()
  sol = jaxdeq.fixed_point(coupled_map, z0, args, solver=SOLVERS[name])
  flat = jaxdeq.fixed_point(as_array_map, jnp.zeros((3, 8)), args,
                            solver=SOLVERS[name])
  assert set(sol.value) == {"a", "b"}
  chex.assert_shape(sol.stats.residual, (3,))
  assert bool(jnp.all(sol.stats.converged))
  chex.assert_trees_all_close(sol.value["a"], flat.value[:, :4], atol=1e-10)
  chex.assert_trees_all_close(sol.value["b"], flat.value[:, 4:], atol=1e-10)
  chex.assert_trees_all_close(coupled_map(sol.value, args), sol.value,
                              atol=1e-10)


@pytest.mark.parametrize("adjoint", [jaxdeq.ImplicitAdjoint(),
                                     jaxdeq.UnrolledAdjoint()],
                         ids=["implicit", "unrolled"])
@pytest.mark.parametrize("name", ["anderson", "broyden", "newton"])
def test_pytree_state_gradient_matches_finite_differences(adjoint, name, x64):
  z0, (w, x) = coupled_problem()

  def loss(w, x):
    sol = jaxdeq.fixed_point(coupled_map, z0, (w, x), solver=SOLVERS[name],
                             adjoint=adjoint)
    return jnp.sum(jnp.sin(3 * sol.value["a"])) + jnp.sum(sol.value["b"] ** 2)

  check_grads(loss, (w, x), order=1, modes=["rev"], eps=1e-6, atol=1e-6,
              rtol=1e-6)


def test_tuple_state_of_feature_maps_with_mixed_dtypes(x64):
  # A multi-resolution state: two maps of different shapes and dtypes. Each
  # leaf keeps its dtype (no silent upcast of the float32 map).
  fine = jnp.zeros((2, 4, 4, 3), jnp.float64)
  coarse = jnp.zeros((2, 2, 2, 3), jnp.float32)

  def f(z, x):
    fine, coarse = z
    pooled = fine.reshape(2, 2, 2, 2, 2, 3).mean(axis=(2, 4))
    up = jnp.repeat(jnp.repeat(coarse, 2, axis=1), 2, axis=2)
    return (0.5 * jnp.tanh(up.astype(jnp.float64)) + x,
            0.5 * jnp.tanh(pooled).astype(jnp.float32))

  x = jnp.ones((2, 4, 4, 3), jnp.float64)
  sol = jaxdeq.fixed_point(f, (fine, coarse), x,
                           solver=jaxdeq.Anderson(1e-6, 100))
  assert sol.value[0].dtype == jnp.float64
  assert sol.value[1].dtype == jnp.float32
  assert bool(jnp.all(sol.stats.converged))
  again = f(sol.value, x)
  chex.assert_trees_all_close(again, sol.value, atol=1e-5)


def test_unbatched_pytree_state(x64):
  f = lambda z, c: (jnp.cos(z[0]) * c, 0.5 * z[1] + 1.0)
  sol = jaxdeq.fixed_point(f, (jnp.zeros(()), jnp.zeros((2,))),
                           jnp.array(1.0), solver=jaxdeq.Anderson(1e-12, 100),
                           batched=False)
  np.testing.assert_allclose(sol.value[0], 0.7390851332151607, rtol=1e-10)
  np.testing.assert_allclose(sol.value[1], [2.0, 2.0], rtol=1e-10)
  chex.assert_shape(sol.stats.residual, ())


@pytest.mark.parametrize("adjoint", [
    jaxdeq.ImplicitAdjoint(), jaxdeq.UnrolledAdjoint(),
    jaxdeq.PhantomAdjoint(steps=8, damping=1.0)],
    ids=["implicit", "unrolled", "phantom"])
def test_gradient_to_closed_over_arrays_equals_gradient_to_args(adjoint, x64):
  z0, (w, x) = coupled_problem()
  solver = jaxdeq.Anderson(1e-11, 200)

  def through_args(w, x):
    sol = jaxdeq.fixed_point(coupled_map, z0, (w, x), solver=solver,
                             adjoint=adjoint)
    return jnp.sum(jnp.sin(sol.value["a"])) + jnp.sum(sol.value["b"])

  def through_closure(w, x):
    sol = jaxdeq.fixed_point(lambda z, _: coupled_map(z, (w, x)), z0, None,
                             solver=solver, adjoint=adjoint)
    return jnp.sum(jnp.sin(sol.value["a"])) + jnp.sum(sol.value["b"])

  expected = jax.grad(through_args, argnums=(0, 1))(w, x)
  assert float(jnp.abs(expected[0]).sum()) > 0
  chex.assert_trees_all_close(
      jax.grad(through_closure, argnums=(0, 1))(w, x), expected, atol=1e-10)
  chex.assert_trees_all_close(
      jax.jit(jax.grad(through_closure, argnums=(0, 1)))(w, x), expected,
      atol=1e-10)


def test_forward_mode_and_second_order_match_finite_differences(x64):
  z0, (w, x) = coupled_problem(batch=2)
  solver = jaxdeq.Anderson(1e-12, 300)

  def value(w, x):
    sol = jaxdeq.fixed_point(coupled_map, z0, (w, x), solver=solver)
    return sol.value

  def loss(w, x):
    out = value(w, x)
    return jnp.sum(jnp.sin(3 * out["a"])) + jnp.sum(out["b"] ** 2)

  check_grads(value, (w, x), order=1, modes=["fwd"], eps=1e-6, atol=1e-6,
              rtol=1e-6)
  # Jitted: each transformation compiles once instead of op by op.
  grad = jax.jit(jax.grad(loss, argnums=1))
  chex.assert_trees_all_close(jax.jit(jax.jacfwd(loss, argnums=1))(w, x),
                              grad(w, x), atol=1e-10)
  # The Hessian in x (forward over reverse) against central differences of
  # the reverse-mode gradient, one compiled gradient for all 8 directions.
  hessian = jax.jit(jax.hessian(loss, argnums=1))(w, x).reshape(
      x.size, x.size)
  eps = 1e-5
  columns = []
  for e in jnp.eye(x.size, dtype=x.dtype):
    e = e.reshape(x.shape)
    columns.append(((grad(w, x + eps * e) - grad(w, x - eps * e))
                    / (2 * eps)).reshape(-1))
  np.testing.assert_allclose(hessian, jnp.stack(columns, axis=1), atol=1e-6,
                             rtol=1e-6)


def test_grad_of_grad_through_a_solve(x64):
  # z* = c / (1 - a) for z = a z + c: d^2 z*/da^2 = 2 c / (1 - a)^3.
  def z_star(a, c):
    return jaxdeq.fixed_point(lambda z, p: p[0] * z + p[1], jnp.zeros((1, 1)),
                              (a, c), solver=jaxdeq.Anderson(1e-13, 100)
                              ).value[0, 0]

  a, c = jnp.array(0.3), jnp.array(2.0)
  second = jax.grad(jax.grad(z_star))(a, c)
  np.testing.assert_allclose(second, 2 * 2.0 / 0.7 ** 3, rtol=1e-8)
  mixed = jax.grad(jax.grad(z_star), argnums=1)(a, c)
  np.testing.assert_allclose(mixed, 1 / 0.7 ** 2, rtol=1e-8)


def test_unrolled_adjoint_is_reverse_mode_only():
  f = lambda z, x: 0.5 * z + x
  solve = lambda x: jaxdeq.fixed_point(f, jnp.zeros((1, 2)), x,
                                       adjoint=jaxdeq.UnrolledAdjoint()).value
  with pytest.raises(TypeError, match="forward-mode"):
    jax.jvp(solve, (jnp.ones((1, 2)),), (jnp.ones((1, 2)),))


def test_has_aux_returns_aux_at_the_value(x64):
  def f(z, x):
    z_next = 0.5 * jnp.tanh(z) + x
    return z_next, {"norm": jnp.sum(z_next ** 2, axis=1), "z": z}

  x = jnp.ones((2, 3))
  sol = jaxdeq.fixed_point(f, jnp.zeros((2, 3)), x, has_aux=True,
                           solver=jaxdeq.Anderson(1e-12, 100))
  chex.assert_trees_all_close(sol.aux["z"], sol.value)
  chex.assert_trees_all_close(sol.aux["norm"], jnp.sum(sol.value ** 2, 1))
  # The aux is differentiable through the value.
  grad_aux = jax.grad(lambda x: jnp.sum(jaxdeq.fixed_point(
      f, jnp.zeros((2, 3)), x, has_aux=True,
      solver=jaxdeq.Anderson(1e-12, 100)).aux["norm"]))(x)
  grad_value = jax.grad(lambda x: jnp.sum(jaxdeq.fixed_point(
      f, jnp.zeros((2, 3)), x, has_aux=True,
      solver=jaxdeq.Anderson(1e-12, 100)).value ** 2))(x)
  chex.assert_trees_all_close(grad_aux, grad_value, atol=1e-10)


def test_has_aux_needs_a_pair():
  with pytest.raises(ValueError, match="has_aux=True.*pair"):
    jaxdeq.fixed_point(lambda z, a: z, jnp.zeros((1, 2)), has_aux=True)


def test_eager_calls_do_not_retrace():
  traces = []

  def f(z, w):
    traces.append(1)  # runs only while JAX traces f
    return jnp.tanh(z @ w)

  w = 0.1 * jnp.eye(32)
  z0 = jnp.ones((16, 32))
  jaxdeq.fixed_point(f, z0, w)
  first = len(traces)
  for scale in (0.2, 0.3):
    jaxdeq.fixed_point(f, z0, scale * jnp.eye(32))
  assert first > 0
  assert len(traces) == first


def test_static_and_unhashable_args():
  class Unhashable:
    __hash__ = None
    scale = 0.5

  f = lambda z, a: a[0] * z + a[1] * a[2].scale
  # Solved without the jit cache, which an eager call says.
  with pytest.warns(UserWarning, match="not cached"):
    sol = jaxdeq.fixed_point(f, jnp.zeros((1, 1)),
                             (0.5, jnp.ones((1, 1)), Unhashable()),
                             solver=jaxdeq.Anderson(1e-6))
  np.testing.assert_allclose(sol.value, [[1.0]], rtol=1e-5)


class TwoScaleCell(nnx.Module):
  """A toy multi-resolution cell: the state is a (fine, coarse) tuple."""

  def __init__(self, rngs):
    self.mix = nnx.Param(0.3 * jax.random.normal(rngs.params(), (4, 4)))

  def __call__(self, z, x):
    fine, coarse = z
    mix = self.mix[...]
    new_fine = jnp.tanh(fine @ mix + jnp.repeat(coarse, 2, axis=1) + x)
    new_coarse = 0.5 * jnp.tanh(fine.reshape(fine.shape[0], 2, 2, 4)
                                .mean(axis=2) @ mix)
    return new_fine, new_coarse


def test_deq_with_a_pytree_state_cell():
  cell = TwoScaleCell(nnx.Rngs(0))
  z_init = lambda x: (jnp.zeros_like(x), jnp.zeros((x.shape[0], 2, 4)))
  deq = DEQ(cell, jaxdeq.Anderson(1e-5, 100), z_init=z_init)
  x = jax.random.normal(jax.random.key(1), (3, 4, 4))
  fine, coarse = deq(x)
  chex.assert_shape((fine, coarse), ((3, 4, 4), (3, 2, 4)))
  chex.assert_trees_all_close(cell((fine, coarse), x), (fine, coarse),
                              atol=1e-4)
  assert float(deq.stats.get_value().converged_fraction) == 1.0
  grads = nnx.grad(lambda deq, x: jnp.sum(deq(x)[1] ** 2))(deq, x)
  chex.assert_tree_all_finite(grads)
  assert float(jnp.abs(grads["cell"]["mix"][...]).sum()) > 0


@pytest.mark.parametrize("name", ["iteration", "anderson", "broyden",
                                  "newton"])
def test_pytree_state_keeps_float32_and_float64(name, dtype):
  tol = 1e-5 if dtype == jnp.float32 else 1e-11
  z0, args = coupled_problem(dtype=dtype)
  solver = type(SOLVERS[name])(tol, 200)
  sol = jaxdeq.fixed_point(coupled_map, z0, args, solver=solver)
  assert {v.dtype for v in sol.value.values()} == {jnp.dtype(dtype)}
  assert sol.stats.residual.dtype == dtype
  assert bool(jnp.all(sol.stats.converged))
  chex.assert_trees_all_close(coupled_map(sol.value, args), sol.value,
                              atol=10 * tol)
