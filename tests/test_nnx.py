"""Flax NNX cells and the DEQ module."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.test_util import check_grads

import jaxdeq
from jaxdeq.nnx import DEQ, DEQStats, ResNetCell, TanhCell, conv2d_same


def test_tanh_cell_init_matches_torch_linear_bounds():
  cell = TanhCell(100, rngs=nnx.Rngs(0))
  kernel = np.asarray(cell.kernel[...])
  assert kernel.shape == (100, 100)
  assert np.abs(kernel).max() <= 0.1 and np.abs(kernel).max() > 0.09


def test_tanh_cell_jacobian_is_exact(x64):
  cell = TanhCell(6, rngs=nnx.Rngs(1), param_dtype=jnp.float64)
  z = jax.random.normal(jax.random.key(0), (3, 6), jnp.float64)
  x = jax.random.normal(jax.random.key(1), (3, 6), jnp.float64)
  per_sample = jax.vmap(jax.jacfwd(lambda z, x: z - cell(z[None], x[None])[0]))
  chex.assert_trees_all_close(cell.residual_jacobian(z, x), per_sample(z, x),
                              atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 6), (6,), (2, 3, 6)])
def test_tanh_cell_derivatives_match_finite_differences(x64, shape):
  # The cell's product has its own JVP rule (a row-major kernel cotangent):
  # both modes, second order, any leading axes.
  cell = TanhCell(6, rngs=nnx.Rngs(1), param_dtype=jnp.float64)
  key_z, key_x = jax.random.split(jax.random.key(0))
  z = jax.random.normal(key_z, shape, jnp.float64)
  x = jax.random.normal(key_x, shape, jnp.float64)
  graphdef, state = nnx.split(cell)  # one leaf: the kernel
  kernel = cell.kernel[...]

  def f(z, kernel, x):
    return nnx.merge(graphdef, jax.tree.map(lambda _: kernel, state))(z, x)

  check_grads(f, (z, kernel, x), order=2, modes=("fwd", "rev"))
  g = jax.random.normal(jax.random.key(2), shape, jnp.float64)
  ours = jax.vjp(f, z, kernel, x)[1](g)
  stock = jax.vjp(lambda z, k, x: jnp.tanh(z @ k + x), z, kernel, x)[1](g)
  chex.assert_trees_all_close(ours, stock, atol=1e-12)


def test_conv_custom_vjp_matches_stock_gradient(x64):
  key_x, key_k, key_g = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(key_x, (2, 6, 5, 3), jnp.float64)
  kernel = jax.random.normal(key_k, (3, 3, 3, 4), jnp.float64)
  g = jax.random.normal(key_g, (2, 6, 5, 4), jnp.float64)
  stock = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  ours = jax.vjp(conv2d_same, x, kernel)[1](g)
  theirs = jax.vjp(stock, x, kernel)[1](g)
  chex.assert_trees_all_close(ours, theirs, atol=1e-10)
  check_grads(conv2d_same, (x, kernel), order=1, modes=["rev"])
  with pytest.raises(ValueError, match="odd"):
    jax.grad(lambda k: conv2d_same(x, k).sum())(jnp.ones((2, 2, 3, 4)))


def test_resnet_cell_matches_tutorial_parameter_count():
  cell = ResNetCell(48, 64, rngs=nnx.Rngs(0))
  params = nnx.state(cell, nnx.Param)
  assert sum(p.size for p in jax.tree.leaves(params)) == 55_616
  std = float(jnp.std(cell.conv1[...]))
  assert 0.009 < std < 0.011


def test_resnet_cell_bad_config():
  with pytest.raises(ValueError, match="odd"):
    ResNetCell(8, 16, kernel_size=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_groups"):
    ResNetCell(6, 16, num_groups=4, rngs=nnx.Rngs(0))


def test_resnet_deq_gradcheck_like_the_tutorial(x64):
  # The tutorial's check: ResNetLayer(2, 2, num_groups=2), Anderson to 1e-10,
  # on a 1 x 3 x 3 x 2 input in float64.
  cell = ResNetCell(2, 2, num_groups=2, rngs=nnx.Rngs(0),
                    param_dtype=jnp.float64)
  # Larger weights than N(0, 0.01) so that z* depends visibly on them.
  cell.conv1.set_value(cell.conv1[...] * 30)
  cell.conv2.set_value(cell.conv2[...] * 30)
  deq = DEQ(cell, jaxdeq.Anderson(tol=1e-10, max_steps=500))
  x = jax.random.normal(jax.random.key(0), (1, 3, 3, 2), jnp.float64)
  graphdef, params, rest = nnx.split(deq, nnx.Param, ...)

  def out(params, x):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, params, rest, copy=True)(x)))

  check_grads(out, (params, x), order=1, modes=["rev"], eps=1e-5, atol=1e-5,
              rtol=1e-5)


def test_tanh_deq_implicit_equals_unrolled(x64):
  rngs = nnx.Rngs(0)
  cell = TanhCell(5, rngs=rngs, param_dtype=jnp.float64)
  x = jax.random.normal(jax.random.key(2), (3, 5), jnp.float64)
  grads = []
  for adjoint in [jaxdeq.ImplicitAdjoint(), jaxdeq.UnrolledAdjoint()]:
    deq = DEQ(cell, jaxdeq.Newton(tol=1e-10, max_steps=40), adjoint)
    grads.append(nnx.grad(lambda m: jnp.sum(m(x) ** 2))(deq))
  chex.assert_trees_all_close(grads[0]["cell"], grads[1]["cell"], rtol=1e-8)


def mnist_model(layer, rngs):
  return nnx.Sequential(nnx.Linear(784, 100, rngs=rngs), layer,
                        nnx.Linear(100, 10, rngs=rngs))


def tutorial_layers(rngs):
  # The tutorial's three MNIST layers, one line each (as in the README).
  return {
      "fixed_point": DEQ(TanhCell(100, rngs=rngs), jaxdeq.FixedPointIteration(tol=1e-4, max_steps=200), jaxdeq.UnrolledAdjoint()),  # noqa: E501
      "newton": DEQ(TanhCell(100, rngs=rngs), jaxdeq.Newton(tol=1e-4, max_steps=40), jaxdeq.UnrolledAdjoint(), z_init=jnp.tanh, unconverged="zero"),  # noqa: E501
      "newton_implicit": DEQ(TanhCell(100, rngs=rngs), jaxdeq.Newton(tol=1e-4, max_steps=40), jaxdeq.ImplicitAdjoint(), z_init=jnp.tanh),  # noqa: E501
  }


@pytest.mark.parametrize("name", ["fixed_point", "newton", "newton_implicit"])
def test_tutorial_layers_train_under_nnx_jit(name):
  rngs = nnx.Rngs(0)
  model = mnist_model(tutorial_layers(rngs)[name], rngs)
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  chex.clear_trace_counter()  # counts are per function code, across params

  @nnx.jit
  @chex.assert_max_traces(n=1)
  def train_step(model, optimizer, x, y):
    def loss_fn(model):
      logits = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss, model.layers[1].stats.get_value()

  x = jax.random.normal(jax.random.key(0), (32, 784)) * 0.3
  y = jnp.arange(32) % 10
  losses = []
  for _ in range(4):
    loss, stats = train_step(model, optimizer, x, y)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  chex.assert_shape(stats.trace, (200 if name == "fixed_point" else 40,))
  assert 0 < int(stats.num_steps) <= (200 if name == "fixed_point" else 40)
  assert float(stats.converged_fraction) == 1.0
  assert float(stats.max_residual) <= 1e-4


@pytest.mark.parametrize("adjoint", [jaxdeq.ImplicitAdjoint(),
                                     jaxdeq.UnrolledAdjoint()])
def test_deq_on_an_empty_batch(adjoint):
  # A batch with no samples (say, what a filter left of one) is answered at
  # once, with NaN summaries, not a reduction error.
  deq = DEQ(TanhCell(4, rngs=nnx.Rngs(0)), jaxdeq.FixedPointIteration(
      tol=1e-5, max_steps=30), adjoint)
  x = jnp.zeros((0, 4))
  chex.assert_shape(deq(x), (0, 4))
  stats = deq.stats.get_value()
  assert int(stats.num_steps) == 0
  assert int(stats.status) == jaxdeq.Status.SUCCESSFUL
  assert np.isnan(float(stats.mean_steps)) and np.isnan(
      float(stats.max_residual))
  chex.assert_shape(stats.trace, (30,))
  with pytest.warns(UserWarning, match="not updated"):
    grads = jax.grad(lambda x: deq(x).sum())(x)
  chex.assert_shape(grads, (0, 4))


def test_deq_backward_probe_inside_nnx_grad():
  rngs = nnx.Rngs(0)
  deq = DEQ(TanhCell(16, rngs=rngs), jaxdeq.Anderson(tol=1e-5, max_steps=50))
  x = jax.random.normal(jax.random.key(0), (8, 16))
  wrt = nnx.DiffState(0, nnx.Any(nnx.Param, jaxdeq.nnx.BackwardProbe))
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2), argnums=wrt)(deq)
  stats = jaxdeq.BackwardStats.from_probe_grad(grads["backward_probe"][...])
  assert 0 < int(stats.num_steps) <= 50
  assert int(stats.not_converged) == 0


def test_resnet_deq_forward_backward_shapes():
  rngs = nnx.Rngs(0)
  deq = DEQ(ResNetCell(8, 16, rngs=rngs), jaxdeq.Anderson(1e-3, 30))
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8))
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(deq)
  for leaf in jax.tree.leaves(grads):
    chex.assert_tree_all_finite(leaf)
  stats = deq.stats.get_value()
  chex.assert_shape(stats.trace, (30,))
  chex.assert_shape(deq.solve(x).stats.trace, (30, 2))


def test_deq_bad_arguments():
  cell = TanhCell(4, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="solver"):
    DEQ(cell, solver="anderson")
  with pytest.raises(TypeError, match="adjoint"):
    DEQ(cell, adjoint="implicit")
  with pytest.raises(ValueError, match="z_init"):
    DEQ(cell, z_init="ones")
  with pytest.raises(ValueError, match="unconverged"):
    DEQ(cell, unconverged="drop")
  with pytest.raises(ValueError, match=r"DEQ\(TanhCell\).*\(5,\) and \(4,\)"):
    DEQ(cell)(jnp.ones((2, 5)))


def test_unconverged_zero_gives_zero_value_and_gradient():
  rngs = nnx.Rngs(0)
  cell = TanhCell(4, rngs=rngs)
  cell.kernel.set_value(cell.kernel[...] * 20)  # far from a contraction
  x = jax.random.normal(jax.random.key(0), (6, 4))
  solver = jaxdeq.FixedPointIteration(tol=1e-6, max_steps=3)
  keep = DEQ(cell, solver, jaxdeq.UnrolledAdjoint())
  zero = DEQ(cell, solver, jaxdeq.UnrolledAdjoint(), unconverged="zero")
  converged = keep.solve(x).stats.converged[:, None]
  assert bool(converged.any()) and not bool(converged.all())
  np.testing.assert_array_equal(zero(x), jnp.where(converged, keep(x), 0.0))
  grad_zero = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(zero)
  grad_masked = nnx.grad(
      lambda m: jnp.sum(jnp.where(converged, m(x), 0.0) ** 2))(keep)
  chex.assert_trees_all_close(grad_zero["cell"]["kernel"][...],
                              grad_masked["cell"]["kernel"][...])


def test_resnet_cell_group_norm_matches_nnx_group_norm(x64):
  from jaxdeq._src.nnx.cells import group_norm
  norm = nnx.GroupNorm(16, num_groups=4, epsilon=1e-5, rngs=nnx.Rngs(0),
                       param_dtype=jnp.float64)
  norm.scale.set_value(jax.random.normal(jax.random.key(1), (16,),
                                         jnp.float64))
  norm.bias.set_value(jax.random.normal(jax.random.key(2), (16,),
                                        jnp.float64))
  x = 3 * jax.random.normal(jax.random.key(0), (2, 5, 4, 16), jnp.float64) + 1
  cotangent = jax.random.normal(jax.random.key(3), x.shape, jnp.float64)
  # flax's GroupNorm, the reference, promotes implicitly inside.
  with jax.numpy_dtype_promotion("standard"):
    reference = norm(x)
    reference_vjp = jax.vjp(norm, x)[1](cotangent)
  chex.assert_trees_all_close(group_norm(x, norm), reference, atol=1e-10)
  chex.assert_trees_all_close(
      jax.vjp(lambda x: group_norm(x, norm), x)[1](cotangent),
      reference_vjp, atol=1e-9)


def _small_deq(seed=0, solver=None):
  return DEQ(TanhCell(8, rngs=nnx.Rngs(seed)),
             solver or jaxdeq.Anderson(tol=1e-6, max_steps=100))


def _deq_of_key(key):
  return DEQ(TanhCell(8, rngs=nnx.Rngs(key)),
             jaxdeq.Anderson(tol=1e-6, max_steps=100))


# DEQs stacked along a leading axis: an ensemble, or the blocks of a stack.
_stacked_deqs = nnx.vmap(_deq_of_key, in_axes=0, out_axes=0)


def test_deq_under_jax_vmap_of_a_function_that_calls_it():
  deq = _small_deq()
  xs = jax.random.normal(jax.random.key(1), (3, 4, 8))
  before = deq.stats.get_value()
  # The layer's variables belong to the outer trace: the stats cannot be
  # written there, and a warning says the variable was left as it was.
  with pytest.warns(UserWarning, match="SolverStatsVariable not updated"):
    out = jax.vmap(lambda x: deq(x))(xs)
  for i in range(3):
    # Equal to the float32 rounding of Anderson's small least-squares
    # solves, which batching reorders.
    chex.assert_trees_all_close(out[i], deq(xs[i]), atol=1e-5)
  # deq.solve returns them per slice instead.
  with pytest.warns(UserWarning, match="not updated"):
    stats = jax.vmap(lambda x: deq.solve(x).stats)(xs)
  chex.assert_shape(stats.residual, (3, 4))
  assert bool(jnp.all(stats.converged))
  assert before.trace.shape == deq.stats.get_value().trace.shape


def test_broadcast_deq_under_nnx_vmap_equals_a_loop_over_inputs():
  deq = _small_deq()
  xs = jax.random.normal(jax.random.key(1), (3, 4, 8))

  @nnx.jit
  @nnx.vmap(in_axes=(None, 0))
  def forward(deq, x):
    return deq(x)

  out = forward(deq, xs)
  merged = deq.stats.get_value()
  singles = []
  for i in range(3):
    # Equal to the float32 rounding of Anderson's small least-squares
    # solves, which batching reorders.
    chex.assert_trees_all_close(out[i], deq(xs[i]), atol=1e-5)
    singles.append(deq.stats.get_value())
  # One record for the three inputs, summarised as DEQStats.merge does.
  chex.assert_shape(merged.num_steps, ())
  chex.assert_shape(merged.trace, (deq.trace_rows,))
  assert int(merged.num_steps) == max(int(s.num_steps) for s in singles)
  assert float(merged.converged_fraction) == 1.0
  np.testing.assert_allclose(
      float(merged.max_residual),
      max(float(s.max_residual) for s in singles), rtol=0.5)
  assert int(merged.status) == jaxdeq.Status.SUCCESSFUL


def test_broadcast_deq_under_nnx_vmap_trains_with_its_penalty():
  deq = DEQ(TanhCell(8, rngs=nnx.Rngs(0)),
            jaxdeq.Anderson(tol=1e-6, max_steps=100), jacobian_penalty=True,
            rngs=nnx.Rngs(2))
  xs = jax.random.normal(jax.random.key(1), (3, 4, 8))

  @nnx.jit
  @nnx.grad
  def loss(deq, xs):
    out = nnx.vmap(lambda deq, x: deq(x), in_axes=(None, 0))(deq, xs)
    return jnp.sum(out ** 2) + deq.penalty[...]

  grads = loss(deq, xs)
  assert bool(jnp.all(jnp.isfinite(grads.cell.kernel[...])))
  assert float(deq.penalty[...]) > 0
  # The penalty's share of the gradient: the loss without it differs.
  plain = nnx.grad(lambda deq, xs: jnp.sum(
      nnx.vmap(lambda deq, x: deq(x), in_axes=(None, 0))(deq, xs) ** 2))(
          deq, xs)
  assert not np.allclose(grads.cell.kernel[...], plain.cell.kernel[...])


def test_deq_stats_merge_of_a_stack():
  a = DEQStats(jnp.asarray(3), jnp.asarray(2.0), jnp.asarray(1e-3),
               jnp.asarray(1.0), jnp.asarray(0),
               jnp.asarray([1.0, 0.1, 1e-3, jnp.nan]))
  b = DEQStats(jnp.asarray(2), jnp.asarray(1.0), jnp.asarray(1e-2),
               jnp.asarray(0.5), jnp.asarray(1),
               jnp.asarray([2.0, 1e-2, jnp.nan, jnp.nan]))
  merged = DEQStats.merge(jax.tree.map(lambda *v: jnp.stack(v), a, b))
  assert int(merged.num_steps) == 3
  assert float(merged.mean_steps) == 1.5
  assert float(merged.max_residual) == pytest.approx(1e-2)
  assert float(merged.converged_fraction) == 0.75
  assert int(merged.status) == jaxdeq.Status.MAX_STEPS_REACHED
  np.testing.assert_allclose(merged.trace, [2.0, 0.1, 1e-3, np.nan])


def test_deq_ensemble_under_nnx_vmap():
  keys = jax.random.split(jax.random.key(0), 3)
  ensemble = _stacked_deqs(keys)
  x = jax.random.normal(jax.random.key(1), (4, 8))

  @nnx.vmap(in_axes=(0, None), out_axes=0)
  def forward(member, x):
    return member(x)

  out = forward(ensemble, x)
  chex.assert_shape(out, (3, 4, 8))
  for i, key in enumerate(keys):
    chex.assert_trees_all_close(out[i], _deq_of_key(key)(x), atol=1e-5)
  chex.assert_shape(ensemble.stats.get_value().num_steps, (3,))
  assert bool(jnp.all(ensemble.stats.get_value().num_steps > 0))


def test_stack_of_deq_blocks_under_nnx_scan():
  keys = jax.random.split(jax.random.key(2), 3)
  blocks = _stacked_deqs(keys)

  @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
  def stack(block, x):
    return block(x)

  x = jax.random.normal(jax.random.key(3), (4, 8))
  out = stack(blocks, x)
  expected = x
  for key in keys:
    expected = _deq_of_key(key)(expected)
  chex.assert_trees_all_close(out, expected, atol=1e-5)

  grads = nnx.grad(lambda blocks, x: jnp.sum(stack(blocks, x) ** 2))(
      blocks, x)
  chex.assert_shape(grads["cell"]["kernel"][...], (3, 8, 8))
  chex.assert_tree_all_finite(grads)


def test_deq_under_nnx_remat_gives_the_same_gradients():
  deq = _small_deq(seed=4)
  x = jax.random.normal(jax.random.key(5), (4, 8))
  plain = nnx.grad(lambda deq, x: jnp.sum(jnp.sin(deq(x))))(deq, x)
  remat = nnx.grad(lambda deq, x: jnp.sum(jnp.sin(
      nnx.remat(lambda deq, x: deq(x))(deq, x))))(deq, x)
  chex.assert_trees_all_close(remat["cell"]["kernel"][...],
                              plain["cell"]["kernel"][...], atol=1e-6)
  assert float(jnp.abs(plain["cell"]["kernel"][...]).sum()) > 0


def test_deq_eager_calls_reuse_one_compilation():
  deq = _small_deq(seed=6)
  x = jnp.ones((4, 8))
  deq(x)
  from jaxdeq._src import fixed_point as fixed_point_lib
  before = fixed_point_lib._jitted_entry._cache_size()
  for scale in (0.5, 2.0):
    deq(scale * x)
  assert fixed_point_lib._jitted_entry._cache_size() == before


# ------------------------------------------------------------ compaction ---


def _spread_inputs(batch=64, width=12, dtype=jnp.float64):
  # Inputs of growing size: samples converge after quite different numbers
  # of steps, so that the compacted phases have work to move.
  scale = jnp.linspace(0.1, 3.0, batch, dtype=dtype)[:, None]
  return jax.random.normal(jax.random.key(1), (batch, width), dtype) * scale


def test_compact_phase_sizes():
  from jaxdeq._src.nnx.deq import _phase_sizes
  assert _phase_sizes(100) == [100, 50, 25]
  assert _phase_sizes(64) == [64, 32, 16]
  assert _phase_sizes(31) == [31, 16]
  assert _phase_sizes(30) == [30]


def _solve_and_grads(deq, x, budget=None):
  """One compilation: the solve, and d(sum z*^2)/d(kernel, x)."""

  @nnx.jit
  def run(deq, x, budget):
    def loss(deq, x):
      sol = deq.solve(x, max_steps=budget)
      return jnp.sum(sol.value ** 2), sol

    grads, sol = nnx.grad(loss, argnums=(0, 1), has_aux=True)(deq, x)
    return sol, grads[0].cell.kernel[...], grads[1], deq.stats.get_value()

  return run(deq, x, budget)


@pytest.mark.parametrize("adjoint", [jaxdeq.UnrolledAdjoint(),
                                     jaxdeq.ImplicitAdjoint()])
def test_compact_gives_the_one_solve_results(x64, adjoint):
  # Fixed-point iteration restarted from the best (here: the last) iterate
  # follows the same trajectory: same values, stats and gradients.
  cell = TanhCell(12, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
  solver = jaxdeq.FixedPointIteration(tol=1e-8, max_steps=100)
  x = _spread_inputs()
  a, kernel_a, x_a, summary_a = _solve_and_grads(DEQ(cell, solver, adjoint), x)
  b, kernel_b, x_b, summary_b = _solve_and_grads(
      DEQ(cell, solver, adjoint, compact=True), x)
  chex.assert_trees_all_close(a.value, b.value, atol=1e-12)
  for field in ("num_steps", "sample_steps", "best_step", "converged",
                "status"):
    np.testing.assert_array_equal(getattr(a.stats, field),
                                  getattr(b.stats, field), err_msg=field)
  np.testing.assert_allclose(a.stats.trace, b.stats.trace, atol=1e-12)
  assert int(b.stats.num_steps) > 30  # the later phases took steps
  chex.assert_trees_all_close(x_a, x_b, atol=1e-10)
  chex.assert_trees_all_close(kernel_a, kernel_b, atol=1e-10)
  chex.assert_trees_all_close(summary_a, summary_b)


def test_compact_with_anderson_and_a_step_budget(x64):
  cell = TanhCell(12, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
  solver = jaxdeq.Anderson(tol=1e-8, max_steps=100)
  x = _spread_inputs()
  one = _solve_and_grads(DEQ(cell, solver), x, jnp.asarray(100))
  compact = DEQ(cell, solver, compact=True)
  sol, kernel_grad, x_grad, _ = _solve_and_grads(compact, x, jnp.asarray(100))
  assert bool(jnp.all(sol.stats.converged))
  chex.assert_trees_all_close(sol.value, one[0].value, atol=1e-6)
  chex.assert_trees_all_close(x_grad, one[2], rtol=1e-5)
  chex.assert_trees_all_close(kernel_grad, one[1], rtol=1e-5)
  for budget in (3, 12):
    stats = _solve_and_grads(compact, x, jnp.asarray(budget))[0].stats
    assert int(stats.num_steps) == budget
    assert int(jnp.max(stats.sample_steps)) <= budget


def test_compact_refuses_what_it_cannot_keep():
  rngs = nnx.Rngs(0)
  with pytest.raises(TypeError, match="compact must be a bool"):
    DEQ(TanhCell(4, rngs=rngs), compact="yes")
  with pytest.raises(ValueError, match="record_steps"):
    DEQ(TanhCell(4, rngs=rngs), record_steps=(2,), compact=True)
  with pytest.raises(ValueError, match="throw"):
    DEQ(TanhCell(4, rngs=rngs), throw=True, compact=True)

  class DroppedCell(nnx.Module):
    def __init__(self):
      self.inner = TanhCell(4, rngs=rngs)
      self.drop = jaxdeq.nnx.VariationalDropout(0.1, rngs=rngs)

    def __call__(self, z, x):
      return self.drop(self.inner(z, x))

  with pytest.raises(ValueError, match="VariationalDropout"):
    DEQ(DroppedCell(), compact=True)
  with pytest.raises(ValueError, match="stop_active"):
    jaxdeq.FixedPointIteration(stop_active=-1)


def test_stop_active_ends_the_loop_early():
  x = _spread_inputs(dtype=jnp.float32)
  solver = jaxdeq.FixedPointIteration(tol=1e-5, max_steps=200)
  f = lambda z, x: jnp.tanh(0.5 * z + x)
  full = jaxdeq.fixed_point(f, jnp.zeros_like(x), x, solver=solver)
  early = jaxdeq.fixed_point(
      f, jnp.zeros_like(x), x,
      solver=dataclasses.replace(solver, stop_active=10))
  still_going = int(jnp.sum(~early.stats.converged))
  assert 0 < still_going <= 10
  assert int(early.stats.num_steps) < int(full.stats.num_steps)


@pytest.mark.parametrize("x_shape, z0_shape, expected", [
    ((4, 7), None, r"DEQ\(TanhCell\): the state z0 float32\[4,7\] and the"
     r" input x float32\[4,7\] do not fit the cell.*contracting dimensions"),
    ((4, 8), (4, 5), r"z0 float32\[4,5\] and the input x float32\[4,8\] do"
     r" not fit the cell"),
    ((4, 8), (3, 8), r"z0 float32\[3,8\] and the input x float32\[4,8\]"),
    ((8,), None, r"residual_jacobian \(a DEQ's states and inputs carry a"
     r" leading batch axis\)"),
])
def test_deq_names_itself_the_cell_and_both_shapes_on_a_mismatch(
    x_shape, z0_shape, expected):
  deq = DEQ(TanhCell(8, rngs=nnx.Rngs(0)))
  z0 = None if z0_shape is None else jnp.zeros(z0_shape)
  with pytest.raises(ValueError, match=expected):
    deq(jnp.ones(x_shape), z0=z0)
  with pytest.raises(ValueError, match=expected):  # the same under nnx.jit
    nnx.jit(lambda deq, x: deq(x, z0=z0))(deq, jnp.ones(x_shape))


def test_deq_names_a_cell_that_changes_the_state_shape():
  class Widening(nnx.Module):

    def __call__(self, z, x):
      return jnp.concatenate([z, x], axis=-1)

  with pytest.raises(ValueError, match=r"DEQ\(Widening\).*the cell returns"
                     r" float32\[2,6\], not a state like z0"):
    DEQ(Widening())(jnp.ones((2, 3)))
