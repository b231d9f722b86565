"""The DEQ training toolkit: penalty, spectral radius, budgets, correction,
cheaper backwards, dropout, normalisation, multi-resolution cell."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxdeq
from jaxdeq.nnx import (DEQ, CellNormalization, MultiscaleCell, TanhCell,
                        VariationalDropout)


def _matrix(key, n, scale, dtype=jnp.float32):
  return scale * jax.random.normal(key, (n, n), dtype) / np.sqrt(n)


# ----------------------------------------------------------- penalty, rho ---


@pytest.mark.parametrize("mode", ["vjp", "jvp"])
def test_jacobian_penalty_is_frobenius_norm_of_linear_map(x64, mode):
  a = _matrix(jax.random.key(0), 6, 0.8, jnp.float64)
  z = jnp.ones((3, 6), jnp.float64)
  penalty = jaxdeq.jacobian_penalty(lambda z, _: jnp.tanh(0.0 * z) + z @ a,
                                    z, None, jax.random.key(1),
                                    num_probes=20000, mode=mode)
  chex.assert_shape(penalty, (3,))
  np.testing.assert_allclose(penalty, jnp.sum(a * a), rtol=0.03)


def test_jacobian_penalty_of_pytree_state_and_unbatched():
  a = jnp.array([[0.5, 0.0], [0.0, 0.5]])
  f = lambda z, _: {"u": z["u"] @ a, "v": 2.0 * z["v"]}
  z = {"u": jnp.ones((2, 2)), "v": jnp.ones((2, 1))}
  penalty = jaxdeq.jacobian_penalty(f, z, None, jax.random.key(0),
                                    num_probes=20000)
  np.testing.assert_allclose(penalty, 0.5 + 4.0, rtol=0.05)
  single = jaxdeq.jacobian_penalty(lambda z, _: z @ a, jnp.ones(2), None,
                                   jax.random.key(0), num_probes=20000,
                                   batched=False)
  chex.assert_shape(single, ())
  np.testing.assert_allclose(single, 0.5, rtol=0.05)


def test_jacobian_penalty_gradient_matches_finite_differences(x64):
  z = jax.random.normal(jax.random.key(0), (2, 4), jnp.float64)
  w = _matrix(jax.random.key(1), 4, 0.9, jnp.float64)
  key = jax.random.key(2)

  def loss(w):
    return jaxdeq.jacobian_penalty(lambda z, w: jnp.tanh(z @ w), z, w, key,
                                   num_probes=3).sum()

  jax.test_util.check_grads(loss, (w,), order=1, modes=["rev"], eps=1e-6)


def test_jacobian_penalty_bad_input():
  f = lambda z, _: z
  with pytest.raises(ValueError, match="num_probes"):
    jaxdeq.jacobian_penalty(f, jnp.ones((2, 2)), None, jax.random.key(0),
                            num_probes=0)
  with pytest.raises(ValueError, match="mode"):
    jaxdeq.jacobian_penalty(f, jnp.ones((2, 2)), None, jax.random.key(0),
                            mode="exact")
  with pytest.raises(TypeError, match="key"):
    jaxdeq.jacobian_penalty(f, jnp.ones((2, 2)), None, 0)
  with pytest.raises(TypeError, match="floating"):
    jaxdeq.jacobian_penalty(f, jnp.ones((2, 2), jnp.int32), None,
                            jax.random.key(0))


def test_spectral_radius_of_symmetric_matrix(dtype):
  q, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (5, 5), dtype))
  eigenvalues = jnp.array([-0.9, 0.5, 0.3, -0.2, 0.1], dtype)
  a = (q * eigenvalues[None]) @ q.T
  rho = jaxdeq.spectral_radius(lambda z, _: z @ a, jnp.ones((3, 5), dtype),
                               None, jax.random.key(1), num_iters=100)
  chex.assert_shape(rho, (3,))
  np.testing.assert_allclose(rho, 0.9, rtol=1e-4)


def test_spectral_radius_is_not_differentiated():
  a = jnp.array([[0.7, 0.0], [0.0, 0.1]])
  g = jax.grad(lambda a: jaxdeq.spectral_radius(
      lambda z, a: z @ a, jnp.ones((1, 2)), a, jax.random.key(0)).sum())(a)
  chex.assert_trees_all_equal(g, jnp.zeros_like(a))


# -------------------------------------------------------------- budgets ---


def test_traced_budget_changes_without_retrace():
  f = lambda z, x: 0.99 * z + x  # slow: 40 steps do not converge
  solver = jaxdeq.FixedPointIteration(tol=1e-6, max_steps=40)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def solve(x, budget):
    return jaxdeq.fixed_point(f, jnp.zeros_like(x), x, solver=solver,
                              max_steps=budget)

  x = jnp.ones((2, 3))
  steps = [int(solve(x, jnp.asarray(k)).stats.num_steps) for k in (3, 7, 40)]
  assert steps == [3, 7, 40]
  # A budget only shortens the solve: the first 3 steps are the same.
  short, full = solve(x, jnp.asarray(3)), solve(x, jnp.asarray(40))
  chex.assert_trees_all_close(short.stats.trace[:3], full.stats.trace[:3])
  assert float(full.stats.residual.max()) < float(short.stats.residual.max())


def test_budget_bad_values():
  f = lambda z, x: 0.5 * z + x
  solver = jaxdeq.Anderson(max_steps=10)
  with pytest.raises(ValueError, match="static cap"):
    jaxdeq.fixed_point(f, jnp.zeros((1, 2)), jnp.ones((1, 2)), solver=solver,
                       max_steps=11)
  with pytest.raises(TypeError, match="integer"):
    jaxdeq.fixed_point(f, jnp.zeros((1, 2)), jnp.ones((1, 2)), solver=solver,
                       max_steps=jnp.asarray(2.0))


def test_budget_with_unrolled_adjoint_matches_shorter_solver():
  f = lambda z, x: 0.8 * jnp.tanh(z) + x
  x = jnp.linspace(-1, 1, 6).reshape(2, 3)

  def grad(solver, budget):
    return jax.grad(lambda x: jaxdeq.fixed_point(
        f, jnp.zeros_like(x), x, solver=solver,
        adjoint=jaxdeq.UnrolledAdjoint(), max_steps=budget).value.sum())(x)

  chex.assert_trees_all_close(
      grad(jaxdeq.FixedPointIteration(1e-6, 30), jnp.asarray(5)),
      grad(jaxdeq.FixedPointIteration(1e-6, 5), None), rtol=1e-6)


# ---------------------------------------------------- fixed-point correction ---


def test_recorded_states_are_the_trajectory_iterates():
  f = lambda z, x: 0.5 * z + x
  x = jnp.ones((2, 1))
  sol = jaxdeq.fixed_point(f, jnp.zeros_like(x), x,
                           solver=jaxdeq.FixedPointIteration(1e-3, 50),
                           record_steps=(1, 2, 3, 1000))
  # z_k = 2 (1 - 0.5^k); past the end, the last iterate of the trajectory.
  for state, k in zip(sol.states[:3], (1, 2, 3)):
    np.testing.assert_allclose(state, 2 * (1 - 0.5 ** k), rtol=1e-6)
  chex.assert_trees_all_close(sol.states[3], sol.value)


def test_recorded_states_gradient_is_the_adjoints_rule_at_them(x64):
  w = jnp.asarray(0.5, jnp.float64)
  x = jnp.ones((1, 2), jnp.float64)
  f = lambda z, w: w * jnp.tanh(z) + x
  solver = jaxdeq.FixedPointIteration(1e-12, 200)

  def state(w):
    return jaxdeq.fixed_point(f, jnp.zeros_like(x), w, solver=solver,
                              record_steps=(2,)).states[0]

  z2 = state(w)
  # Implicit rule at z2: dz/dw = (1 - w sech^2(z2))^-1 tanh(z2).
  expected = jnp.tanh(z2) / (1 - w * (1 - jnp.tanh(z2) ** 2))
  chex.assert_trees_all_close(jax.jacfwd(state)(w), expected, rtol=1e-10)
  chex.assert_trees_all_close(
      jax.grad(lambda w: state(w).sum())(w), expected.sum(), rtol=1e-10)


def test_record_steps_bad_input():
  f = lambda z, x: 0.5 * z + x
  z0, x = jnp.zeros((1, 2)), jnp.ones((1, 2))
  with pytest.raises(ValueError, match="increase"):
    jaxdeq.fixed_point(f, z0, x, record_steps=(3, 2))
  with pytest.raises(ValueError, match="UnrolledAdjoint"):
    jaxdeq.fixed_point(f, z0, x, adjoint=jaxdeq.UnrolledAdjoint(),
                       record_steps=(2,))


# ------------------------------------------------------- cheaper backwards ---


def _linear_problem(dtype):
  a = _matrix(jax.random.key(0), 5, 0.6, dtype)
  x = jax.random.normal(jax.random.key(1), (3, 5), dtype)
  return (lambda z, p: z @ p[0] + p[1]), (a, x)


def _grads(adjoint, solver, params, f):
  def loss(params):
    z = jaxdeq.fixed_point(f, jnp.zeros_like(params[1]), params,
                           solver=solver, adjoint=adjoint).value
    return jnp.sum(jnp.sin(z))
  return jax.grad(loss)(params)


def test_neumann_truncation_is_the_partial_series(x64):
  f, (a, x) = _linear_problem(jnp.float64)
  solver = jaxdeq.Anderson(tol=1e-12, max_steps=200)
  z = jaxdeq.fixed_point(f, jnp.zeros_like(x), (a, x), solver=solver).value
  g = jnp.cos(z)
  for terms in (1, 3):
    partial = sum(g @ jnp.linalg.matrix_power(a.T, k) for k in range(terms))
    _, gx = _grads(jaxdeq.NeumannAdjoint(terms=terms), solver, (a, x), f)
    chex.assert_trees_all_close(gx, partial, rtol=1e-10)
  implicit = _grads(jaxdeq.ImplicitAdjoint(), solver, (a, x), f)
  neumann = _grads(jaxdeq.NeumannAdjoint(terms=80), solver, (a, x), f)
  chex.assert_trees_all_close(neumann, implicit, rtol=1e-8, atol=1e-10)


def test_neumann_damping_has_the_same_limit(x64):
  f, params = _linear_problem(jnp.float64)
  solver = jaxdeq.Anderson(tol=1e-12, max_steps=200)
  implicit = _grads(jaxdeq.ImplicitAdjoint(), solver, params, f)
  damped = _grads(jaxdeq.NeumannAdjoint(terms=300, damping=0.5), solver,
                  params, f)
  chex.assert_trees_all_close(damped, implicit, rtol=1e-7, atol=1e-9)


def test_shine_matches_implicit_with_and_without_fallback(x64):
  f = lambda z, p: jnp.tanh(z @ p[0] + p[1])
  _, params = _linear_problem(jnp.float64)
  solver = jaxdeq.Broyden(tol=1e-10, max_steps=100, memory=30)
  implicit = _grads(jaxdeq.ImplicitAdjoint(), solver, params, f)
  refined = _grads(jaxdeq.SHINEAdjoint(fallback_tol=1e-9), solver, params, f)
  chex.assert_trees_all_close(refined, implicit, rtol=1e-6, atol=1e-8)
  # The estimate alone: close, not exact (a rank-limited inverse).
  raw = _grads(jaxdeq.SHINEAdjoint(fallback_tol=float("inf")), solver,
               params, f)
  error = jnp.linalg.norm(raw[0] - implicit[0]) / jnp.linalg.norm(implicit[0])
  assert 0 < float(error) < 0.3


def test_shine_needs_broyden():
  with pytest.raises(TypeError, match="Broyden"):
    jaxdeq.fixed_point(lambda z, x: 0.5 * z + x, jnp.zeros((1, 2)),
                       jnp.ones((1, 2)), solver=jaxdeq.Anderson(),
                       adjoint=jaxdeq.SHINEAdjoint())
  with pytest.raises(ValueError, match="damping"):
    jaxdeq.NeumannAdjoint(damping=1.5)
  with pytest.raises(ValueError, match="terms"):
    jaxdeq.NeumannAdjoint(terms=0)


def test_cheap_backwards_give_no_nan_for_an_overflowing_sample():
  f = lambda z, w: w * z + 1.0
  w = jnp.asarray(3.0)  # diverges: every iterate grows
  for adjoint in (jaxdeq.NeumannAdjoint(terms=200), jaxdeq.SHINEAdjoint()):
    solver = (jaxdeq.Broyden(max_steps=5) if isinstance(
        adjoint, jaxdeq.SHINEAdjoint) else jaxdeq.FixedPointIteration(
            max_steps=5))
    g = jax.grad(lambda w: jaxdeq.fixed_point(
        f, jnp.zeros((2, 2)), w, solver=solver, adjoint=adjoint
        ).value.sum())(w)
    assert np.isfinite(float(g)), type(adjoint).__name__


# ------------------------------------------------------------------- NNX ---


def _tanh_deq(**options):
  return DEQ(TanhCell(6, rngs=nnx.Rngs(0)),
             jaxdeq.Anderson(tol=1e-6, max_steps=60), **options)


def test_deq_eval_budget_and_call_time_budget():
  deq = _tanh_deq(eval_max_steps=3)
  x = jnp.ones((2, 6))
  deq(x)
  assert int(deq.stats.get_value().num_steps) > 3
  deq.eval()
  deq(x)
  assert int(deq.stats.get_value().num_steps) == 3
  deq.train()
  deq(x, max_steps=2)
  assert int(deq.stats.get_value().num_steps) == 2
  with pytest.raises(ValueError, match="eval_max_steps"):
    _tanh_deq(eval_max_steps=0)


def test_deq_warm_start_takes_fewer_steps():
  deq = _tanh_deq()
  x = jax.random.normal(jax.random.key(0), (4, 6))
  z_star = deq(x)
  cold = int(deq.stats.get_value().num_steps)
  warm_value = deq(x * 1.01, z0=z_star)
  assert int(deq.stats.get_value().num_steps) < cold
  chex.assert_trees_all_close(warm_value, deq(x * 1.01), atol=1e-4)


def test_deq_penalty_is_differentiable_and_only_in_training():
  deq = _tanh_deq(jacobian_penalty=True, penalty_probes=4, rngs=nnx.Rngs(1))
  x = jnp.ones((3, 6))

  def loss(deq):
    deq(x)
    return deq.penalty[...]

  grads = nnx.grad(loss)(deq)
  assert float(jnp.abs(grads.cell.kernel[...]).sum()) > 0
  deq.eval()
  deq.penalty.set_value(jnp.zeros(()))
  deq(x)
  assert float(deq.penalty[...]) == 0.0
  with pytest.raises(ValueError, match="rngs"):
    _tanh_deq(jacobian_penalty=True)


def test_deq_record_steps_give_states_in_training_only():
  deq = _tanh_deq(record_steps=(1, 3))
  sol = deq.solve(jnp.ones((2, 6)))
  assert len(sol.states) == 2
  deq.eval()
  assert deq.solve(jnp.ones((2, 6))).states is None


class _DropoutCell(nnx.Module):

  def __init__(self, rngs):
    self.cell = TanhCell(6, rngs=rngs)
    self.drop = VariationalDropout(0.5, rngs=rngs)

  def __call__(self, z, x):
    return self.drop(self.cell(z, x))


def test_variational_dropout_mask_is_fixed_for_the_solve():
  cell = _DropoutCell(nnx.Rngs(0))
  deq = DEQ(cell, jaxdeq.Anderson(tol=1e-6, max_steps=80))
  x = jax.random.normal(jax.random.key(0), (3, 6))
  z_star = deq(x)
  # A mask that changed between iterations leaves no fixed point.
  assert float(deq.stats.get_value().converged_fraction) == 1.0
  # The solution is the fixed point of the cell with the mask drawn for it.
  chex.assert_trees_all_close(cell(z_star, x), z_star, atol=1e-5)
  assert float(jnp.mean(z_star == 0)) > 0.2
  first_key = cell.drop.key[...]
  deq(x)
  assert not np.array_equal(first_key, cell.drop.key[...])  # new per solve
  deq.eval()
  z_eval = deq(x)
  assert float(jnp.mean(z_eval == 0)) == 0.0


def test_variational_dropout_bad_rate():
  with pytest.raises(ValueError, match="rate"):
    VariationalDropout(1.0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind", ["weight", "spectral"])
def test_normalized_kernels_are_hoisted_out_of_the_solve(kind):
  deq = _tanh_deq(normalization=kind, rngs=nnx.Rngs(3))
  x = jax.random.normal(jax.random.key(0), (2, 6))
  calls = []
  original = CellNormalization.apply

  def counting(self, *args, **kwargs):
    calls.append(1)
    return original(self, *args, **kwargs)

  CellNormalization.apply = counting
  try:
    z = deq(x)
  finally:
    CellNormalization.apply = original
  assert len(calls) == 1 and int(deq.stats.get_value().num_steps) > 1
  # The solve used the normalised kernel: z* is the plain cell's fixed point
  # with that kernel. (In eval mode, so that the spectral power iteration
  # does not move between the solve and cell_map().)
  deq.eval()
  z = deq(x)
  _, state = deq.cell_map()
  kernel = state["kernel"][...]
  chex.assert_trees_all_close(jnp.tanh(z @ kernel + x), z, atol=1e-5)
  if kind == "weight":  # initialised to the identity reparametrisation
    chex.assert_trees_all_close(kernel, deq.cell.kernel[...], rtol=1e-5)
  deq.train()
  grads = nnx.grad(lambda deq: deq(x).sum())(deq)
  assert float(jnp.abs(grads.cell.kernel[...]).sum()) > 0


def test_normalization_bad_kind():
  with pytest.raises(ValueError, match="normalization"):
    _tanh_deq(normalization="batch")


# ------------------------------------------------------- multiscale cell ---


def test_multiscale_cell_implicit_matches_unrolled(x64):
  cell = MultiscaleCell((4, 8), num_groups=2, rngs=nnx.Rngs(0),
                        param_dtype=jnp.float64)
  x = (jax.random.normal(jax.random.key(0), (1, 4, 4, 4), jnp.float64),
       jax.random.normal(jax.random.key(1), (1, 2, 2, 8), jnp.float64))
  solver = jaxdeq.FixedPointIteration(tol=1e-10, max_steps=100)
  graphdef, params, rest = nnx.split(cell, nnx.Param, ...)

  def loss(params, adjoint):
    f = lambda z, a: nnx.merge(graphdef, a[0], rest)(z, a[1])
    z0 = jax.tree.map(jnp.zeros_like, x)
    z = jaxdeq.fixed_point(f, z0, (params, x), solver=solver,
                           adjoint=adjoint).value
    return sum(jnp.sum(jnp.sin(v)) for v in z)

  implicit = jax.grad(loss)(params, jaxdeq.ImplicitAdjoint())
  unrolled = jax.grad(loss)(params, jaxdeq.UnrolledAdjoint())
  chex.assert_trees_all_close(implicit, unrolled, rtol=1e-5, atol=1e-8)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(implicit)) > 0


def test_multiscale_deq_solves_a_tuple_state():
  cell = MultiscaleCell((4, 8), num_groups=2, rngs=nnx.Rngs(0))
  deq = DEQ(cell, jaxdeq.Broyden(tol=1e-4, max_steps=30))
  x = (jnp.ones((2, 4, 4, 4)), jnp.ones((2, 2, 2, 8)))
  z = deq(x)
  assert [v.shape for v in z] == [(2, 4, 4, 4), (2, 2, 2, 8)]
  assert float(deq.stats.get_value().converged_fraction) == 1.0


def test_multiscale_cell_bad_config():
  with pytest.raises(ValueError, match="channels"):
    MultiscaleCell((4,), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_groups"):
    MultiscaleCell((4, 6), num_groups=4, rngs=nnx.Rngs(0))


def test_deq_budget_changes_without_retrace():
  deq = _tanh_deq()
  x = jnp.ones((2, 6))

  @nnx.jit
  @chex.assert_max_traces(n=1)
  def run(deq, x, budget):
    deq(x, max_steps=budget)
    return deq.stats.get_value().num_steps

  chex.clear_trace_counter()
  assert [int(run(deq, x, jnp.asarray(k))) for k in (1, 2, 5)] == [1, 2, 5]
