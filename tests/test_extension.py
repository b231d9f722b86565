"""A solver defined outside the library needs `init` and `step` only: it
runs through fixed_point, DEQ, jit, vmap and grad with every adjoint family."""

import dataclasses
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxdeq
from jaxdeq.nnx import DEQ, TanhCell
from tests.helpers import small_tanh_problem, tanh_map


class MomentumState(NamedTuple):
  previous: jax.Array


@dataclasses.dataclass(frozen=True)
class Momentum(jaxdeq.FixedPointSolver):
  """Heavy-ball iteration z <- f(z) + beta (z - z_prev)."""

  beta: float = 0.2

  def init(self, f, z, fz, args):
    return MomentumState(previous=z)

  def step(self, f, z, fz, args, state, step_index):
    return fz + self.beta * (z - state.previous), MomentumState(previous=z)


@pytest.mark.parametrize("adjoint", [
    jaxdeq.ImplicitAdjoint(), jaxdeq.UnrolledAdjoint(),
    jaxdeq.PhantomAdjoint(steps=40, damping=1.0),
    jaxdeq.NeumannAdjoint(terms=40)], ids=lambda a: type(a).__name__)
def test_a_solver_defined_here_runs_with_every_adjoint(adjoint, x64):
  w, x = small_tanh_problem()
  solver = Momentum(tol=1e-12, max_steps=300)

  def loss(w, x):
    sol = jaxdeq.fixed_point(tanh_map, jnp.zeros_like(x), (w, x),
                             solver=solver, adjoint=adjoint)
    return jnp.sum(sol.value ** 2), sol

  (value, sol), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(w, x)
  assert bool(jnp.all(sol.stats.converged))
  chex.assert_trees_all_close(tanh_map(sol.value, (w, x)), sol.value,
                              atol=1e-11)
  reference = jax.grad(lambda w: jnp.sum(jaxdeq.fixed_point(
      tanh_map, jnp.zeros_like(x), (w, x),
      solver=jaxdeq.Newton(tol=1e-12)).value ** 2))(w)
  chex.assert_trees_all_close(grads, reference, atol=1e-8)
  per_sample = jax.vmap(lambda x: loss(w, x[None])[0])(x)
  np.testing.assert_allclose(per_sample.sum(), value, rtol=1e-10)


def test_a_solver_defined_here_drives_a_deq():
  deq = DEQ(TanhCell(8, rngs=nnx.Rngs(0)), Momentum(tol=1e-5, max_steps=200))
  x = jax.random.normal(jax.random.key(2), (4, 8))
  grads = nnx.jit(nnx.grad(lambda deq, x: jnp.sum(deq(x) ** 2)))(deq, x)
  assert bool(jnp.all(jnp.isfinite(grads.cell.kernel[...])))
  assert float(deq.stats.get_value().converged_fraction) == 1.0
