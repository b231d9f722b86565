"""`DEQ`: an NNX layer whose output is the fixed point of a cell."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from jax import custom_batching
from flax import errors as flax_errors
from flax import nnx

from jaxdeq._src import adjoint as adjoint_lib
from jaxdeq._src import fixed_point as fixed_point_lib
from jaxdeq._src import loop
from jaxdeq._src import regularizers
from jaxdeq._src import solution as solution_lib
from jaxdeq._src import tree
from jaxdeq._src.nnx import stabilizers
from jaxdeq._src.solvers import anderson
from jaxdeq._src.solvers import base


class DEQStats(NamedTuple):
  """Batch-size-independent summary of a DEQ's last forward solve.

  Fixed shapes, so that a jitted step that reads them never retraces.

  Attributes:
    num_steps: () int32, steps the solver took.
    mean_steps: () float32, steps per sample, averaged over the batch.
    max_residual: () float32, worst residual over the batch.
    converged_fraction: () float32, share of samples that met `tol`.
    status: () int32, the `jaxdeq.Status` code.
    trace: (max_steps,) float32, the worst residual of the batch after each
      step, NaN past the last.
  """

  num_steps: jax.Array
  mean_steps: jax.Array
  max_residual: jax.Array
  converged_fraction: jax.Array
  status: jax.Array
  trace: jax.Array

  @classmethod
  def empty(cls, max_steps: int) -> "DEQStats":
    nan = jnp.full((), jnp.nan, jnp.float32)
    return cls(jnp.zeros((), jnp.int32), nan, nan, nan,
               jnp.zeros((), jnp.int32),
               jnp.full((max_steps,), jnp.nan, jnp.float32))

  @classmethod
  def summarize(cls, stats: solution_lib.SolverStats,
                rows: Optional[int] = None) -> "DEQStats":
    """The summary; `rows` pads (NaN) or cuts the trace to a fixed length."""
    f32 = lambda v: v.astype(jnp.float32)
    if stats.residual.shape[0] == 0:  # an empty batch: nothing to average
      summary = cls.empty(rows if rows is not None else stats.trace.shape[0])
      return summary._replace(num_steps=stats.num_steps, status=stats.status)
    trace = f32(jnp.max(stats.trace, axis=1))
    if rows is not None and rows != trace.shape[0]:
      trace = jnp.concatenate(
          [trace, jnp.full((max(rows - trace.shape[0], 0),), jnp.nan,
                           jnp.float32)])[:rows]
    return cls(
        num_steps=stats.num_steps,
        mean_steps=f32(jnp.mean(stats.sample_steps)),
        max_residual=f32(jnp.max(stats.residual)),
        converged_fraction=f32(jnp.mean(stats.converged)),
        status=stats.status,
        trace=trace,
    )

  @classmethod
  def merge(cls, stacked: "DEQStats") -> "DEQStats":
    """One summary of `DEQStats` stacked along a leading axis (the calls of
    one layer over several inputs, e.g. under `nnx.vmap`).

    The most steps, the mean of the per-call means and converged shares, the
    worst residual and status, and each step's worst residual.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jaxdeq.nnx import DEQStats
      >>> a = DEQStats.empty(3)._replace(num_steps=jnp.asarray(2))
      >>> b = DEQStats.empty(3)._replace(num_steps=jnp.asarray(5))
      >>> stacked = jax.tree.map(lambda *v: jnp.stack(v), a, b)
      >>> int(DEQStats.merge(stacked).num_steps)
      5
    """
    return cls(
        num_steps=jnp.max(stacked.num_steps, axis=0),
        mean_steps=jnp.mean(stacked.mean_steps, axis=0),
        max_residual=jnp.max(stacked.max_residual, axis=0),
        converged_fraction=jnp.mean(stacked.converged_fraction, axis=0),
        status=jnp.max(stacked.status, axis=0),
        # NaN marks the steps after a call's last one, not a failure.
        trace=jnp.nanmax(stacked.trace, axis=0),
    )


class SolverStatsVariable(nnx.Variable):
  """Holds the `DEQStats` of a DEQ's last call (a value, not a parameter)."""


class JacobianPenaltyVariable(nnx.Variable):
  """Holds the Jacobian penalty of a DEQ's last training solve (see `DEQ`)."""


class BackwardProbe(nnx.Variable):
  """A zero vector; its gradient carries the implicit backward's stats.

  Differentiate with respect to it (e.g. `nnx.DiffState(0, BackwardProbe)`)
  and read the gradient with `jaxdeq.BackwardStats.from_probe_grad`.
  """


class DEQ(nnx.Module):
  """Equilibrium layer: `deq(x)` returns z* = cell(z*, x).

  The cell's parameters travel to the solver as differentiable `args`, so the
  chosen adjoint differentiates them and `x`. Solver statistics of the last
  call are kept as values in `deq.stats` (a `SolverStatsVariable` holding
  `DEQStats`); `deq.solve(x)` returns the full per-sample `Solution`. Under
  `nnx.vmap` with the layer broadcast (`in_axes=(None, 0)`: shared weights,
  batched inputs) `deq.stats` holds one `DEQStats.merge` of all the inputs;
  with the layer's state split along an axis (an ensemble) one record per
  member. A plain JAX transform of a function that closes over the layer
  (`jax.vmap(lambda x: deq(x))`) cannot write its variables: the call
  warns that `deq.stats` still holds the previous call's value. A cell that offers
  `residual_jacobian(z, x)` (the Jacobian of g = z - cell(z, x), as
  `TanhCell` does) hands it to solvers that use one (dense `Newton`).

  The state may be any pytree (a tuple of feature maps for a
  multi-resolution cell): `z_init` then returns that pytree.

  Args:
    cell: an NNX module called as `cell(z, x)`; it must not update its own
      state when called (no BatchNorm inside the cell).
    solver: a jaxdeq solver; default `Anderson()`.
    adjoint: a jaxdeq adjoint; default `ImplicitAdjoint()`.
    z_init: "zeros" (z0 = 0 shaped like x) or a function x -> z0 (any
      pytree of floating arrays with the batch leading).
    throw: raise `jaxdeq.FixedPointError` when the forward solve fails (for
      the implicit backward: `ImplicitAdjoint(throw=True)`). Under `jax.jit`
      or `nnx.jit` JAX reports it as `jax.errors.JaxRuntimeError` with the
      message at its end; wrap the jitted step in `jaxdeq.catch_failures`
      to get the `FixedPointError` itself.
    unconverged: "keep" (default) returns the best iterate of a sample that
      missed `tol`; "zero" returns zeros for it, so that it contributes no
      gradient, as the tutorial's unrolled Newton layer does. Backprop through
      a Newton trajectory that did not converge can be huge (near-singular
      Jacobians) and derail training.
    eval_max_steps: the solver's `max_steps` in evaluation mode
      (`model.eval()`; torchdeq's `eval_factor`); default: the training one.
    record_steps: fixed-point correction: in training, `deq.solve(x).states`
      holds the iterates after these steps, each with the adjoint's gradient
      (see `jaxdeq.fixed_point`); supervise them with their own losses.
    jacobian_penalty: in training, store the Hutchinson estimate of
      ||df/dz||_F^2 / d at z* (d = state size per sample, averaged over the
      batch; Bai et al.'s normalisation) in `deq.penalty`, differentiable:
      add `weight * deq.penalty[...]` to the loss. Needs `rngs`.
    penalty_probes: Gaussian probes per estimate.
    normalization: None, "weight" or "spectral": normalise the cell's
      kernels once per solve (`CellNormalization`), outside the solver loop.
    rngs: `nnx.Rngs` for the penalty's probes and spectral normalisation.
    compact: solve in phases on shrinking batches: once half of a phase's
      samples are done, the rest move into a batch half as large (down to
      16 rows), so the samples that converge early stop costing the slow
      ones' steps. Samples must not interact inside the cell (they do not
      in any cell of jaxdeq.nnx). Each phase restarts the solver from each
      remaining sample's best iterate (a stateless `FixedPointIteration`
      then follows the same trajectory; `Anderson` starts a new history).
      The adjoint differentiates every phase, so gradients are those of the
      iterates computed. Not with `record_steps`, `throw` or a
      `VariationalDropout` in the cell (its mask depends on the batch).
      `BackwardStats` (`BackwardProbe`) describe the first phase's
      backward solve. A batch of 30 rows or fewer is solved at once.

  In training mode (the default; `model.eval()` sets `deterministic`), a
  `VariationalDropout` inside the cell draws one mask per solve.

  Examples:
    >>> import jax.numpy as jnp, jaxdeq
    >>> from flax import nnx
    >>> from jaxdeq.nnx import DEQ, TanhCell
    >>> deq = DEQ(TanhCell(8, rngs=nnx.Rngs(0)), jaxdeq.Anderson(tol=1e-5))
    >>> deq(jnp.ones((4, 8))).shape
    (4, 8)
    >>> float(deq.stats.get_value().converged_fraction)
    1.0

    With the training stabilisers: a Jacobian penalty for the loss, one
    supervised intermediate iterate, spectral normalisation, and a smaller
    step cap at evaluation:

    >>> deq = DEQ(TanhCell(8, rngs=nnx.Rngs(0)), jaxdeq.Anderson(tol=1e-5),
    ...           jacobian_penalty=True, record_steps=(3,),
    ...           normalization="spectral", eval_max_steps=10,
    ...           rngs=nnx.Rngs(1))
    >>> sol = deq.solve(jnp.ones((4, 8)))
    >>> len(sol.states), bool(deq.penalty[...] > 0)
    (1, True)
  """

  def __init__(self, cell: nnx.Module,
               solver: Optional[base.FixedPointSolver] = None,
               adjoint: Optional[adjoint_lib.AbstractAdjoint] = None,
               z_init: Union[str, Callable[[jax.Array], jax.Array]] = "zeros",
               throw: bool = False, unconverged: str = "keep", *,
               eval_max_steps: Optional[int] = None,
               record_steps: tuple[int, ...] = (),
               jacobian_penalty: bool = False, penalty_probes: int = 1,
               normalization: Optional[str] = None,
               rngs: Optional[nnx.Rngs] = None,
               compact: bool = False):
    solver = anderson.Anderson() if solver is None else solver
    adjoint = adjoint_lib.ImplicitAdjoint() if adjoint is None else adjoint
    if not isinstance(solver, base.FixedPointSolver):
      raise TypeError(f"DEQ: solver must be a jaxdeq solver, got {solver!r}")
    if not isinstance(adjoint, adjoint_lib.AbstractAdjoint):
      raise TypeError(f"DEQ: adjoint must be a jaxdeq adjoint, got"
                      f" {adjoint!r}")
    if not (z_init == "zeros" or callable(z_init)):
      raise ValueError(f"DEQ: z_init must be 'zeros' or a function x -> z0,"
                       f" got {z_init!r}")
    self.cell = cell
    self.solver = solver
    self.adjoint = adjoint
    if unconverged not in ("keep", "zero"):
      raise ValueError(f"DEQ: unconverged must be 'keep' or 'zero', got"
                       f" {unconverged!r}")
    self.z_init = z_init
    self.throw = throw
    self.unconverged = unconverged
    self.eval_solver = solver
    if eval_max_steps is not None:
      if (isinstance(eval_max_steps, bool) or
          not isinstance(eval_max_steps, int) or eval_max_steps < 1):
        raise ValueError(f"DEQ: eval_max_steps must be a positive int, got"
                         f" {eval_max_steps!r}")
      self.eval_solver = dataclasses.replace(solver, max_steps=eval_max_steps)
    self.record_steps = fixed_point_lib._check_record_steps(record_steps,
                                                            adjoint)
    if not isinstance(compact, bool):
      raise TypeError(f"DEQ: compact must be a bool, got {compact!r}")
    if compact:
      clash = [name for name, on in (
          ("record_steps", bool(self.record_steps)), ("throw", bool(throw)),
          ("a VariationalDropout in the cell", any(
              isinstance(m, stabilizers.VariationalDropout)
              for _, m in nnx.iter_graph(cell)))) if on]
      if clash:
        raise ValueError(f"DEQ: compact=True does not combine with"
                         f" {', '.join(clash)}")
    self.compact = compact
    if not isinstance(jacobian_penalty, bool):
      raise TypeError(f"DEQ: jacobian_penalty must be a bool, got"
                      f" {jacobian_penalty!r}")
    if jacobian_penalty and rngs is None:
      raise ValueError("DEQ: jacobian_penalty=True needs rngs (the probes"
                       " are random)")
    self.jacobian_penalty = jacobian_penalty
    self.penalty_probes = penalty_probes
    self.rngs = rngs
    self.normalization = None if normalization is None else (
        stabilizers.CellNormalization(
            cell, normalization,
            rngs=rngs if rngs is not None else nnx.Rngs(0)))
    self.deterministic = False
    self.trace_rows = loop.trace_length(max(solver.max_steps,
                                            self.eval_solver.max_steps))
    self.stats = SolverStatsVariable(DEQStats.empty(self.trace_rows))
    self.penalty = JacobianPenaltyVariable(jnp.zeros((), jnp.float32))
    self.backward_probe = BackwardProbe(adjoint_lib.backward_probe())

  def __call__(self, x: Any, *, z0: Any = None,
               max_steps: Union[int, jax.Array, None] = None) -> Any:
    """Returns z* for input `x` and records `DEQStats` in `self.stats`.

    Args:
      x: the input injection.
      z0: optional initial state per sample (a warm start, e.g. an earlier
        z*), overriding `z_init`.
      max_steps: optional step budget (an int or a traced int, at most the
        solver's `max_steps`): change it between calls without recompiling.
    """
    return self.solve(x, z0=z0, max_steps=max_steps).value

  def initial_state(self, x: Any) -> Any:
    """The solve's start when no `z0` is given: `z_init` applied to `x`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxdeq.nnx import DEQ, TanhCell
      >>> DEQ(TanhCell(2, rngs=nnx.Rngs(0))).initial_state(jnp.ones((1, 2)))
      Array([[0., 0.]], dtype=float32)
    """
    if self.z_init == "zeros":
      return jax.tree.map(jnp.zeros_like, x)
    return self.z_init(x)

  def cell_map(self) -> tuple[Callable[[Any, Any], Any], Any]:
    """(f, cell_state): f(z, (cell_state, x)) = cell(z, x), with the
    normalised kernels when `normalization` is set (no state update)."""
    return self._cell_map(update=False)

  def _cell_map(self, update: bool):
    graphdef, cell_state = nnx.split(self.cell)
    if self.normalization is not None:
      # Once per solve: the solver sees the normalised kernels as arguments;
      # `update` advances spectral normalisation's power iteration.
      cell_state = self.normalization.apply(cell_state, update=update)
    cell_map = (_CellMapWithJacobian if hasattr(self.cell, "residual_jacobian")
                else _CellMap)(graphdef)
    return cell_map, cell_state

  def penalty_at(self, x: Any, key: jax.Array, *, z: Any,
                 num_probes: int = 1) -> jax.Array:
    """The batch mean of ||d cell / dz||_F^2 / d at `z` (what
    `jacobian_penalty=True` stores in `deq.penalty`), as float32.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxdeq.nnx import DEQ, TanhCell
      >>> deq = DEQ(TanhCell(8, rngs=nnx.Rngs(0)))
      >>> x = jnp.ones((4, 8))
      >>> bool(deq.penalty_at(x, jax.random.key(0), z=deq(x)) > 0)
      True
    """
    cell_map, cell_state = self.cell_map()
    return _mean_penalty(cell_map, cell_state, x, z, key, num_probes)

  def spectral_radius(self, x: Any, key: jax.Array, *, num_iters: int = 20,
                      z: Any = None) -> jax.Array:
    """Per-sample estimate of rho(d cell / dz) at z* (or at `z`).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> from jaxdeq.nnx import DEQ, TanhCell
      >>> deq = DEQ(TanhCell(8, rngs=nnx.Rngs(0)))
      >>> rho = deq.spectral_radius(jnp.ones((4, 8)), jax.random.key(0))
      >>> rho.shape, bool(jnp.all(rho < 1))
      ((4,), True)
    """
    if z is None:
      z = self.solve(x).value
    cell_map, cell_state = self.cell_map()
    return regularizers.spectral_radius(cell_map, z, (cell_state, x), key,
                                        num_iters=num_iters)

  def solve(self, x: Any, *, z0: Any = None,
            max_steps: Union[int, jax.Array, None] = None
            ) -> solution_lib.Solution:
    """Like calling the layer, but returns the whole `jaxdeq.Solution`.

    Examples:
      >>> import jax.numpy as jnp, jaxdeq
      >>> from flax import nnx
      >>> from jaxdeq.nnx import DEQ, TanhCell
      >>> deq = DEQ(TanhCell(8, rngs=nnx.Rngs(0)))
      >>> deq.solve(jnp.ones((4, 8))).stats.residual.shape
      (4,)
    """
    training = not self.deterministic
    if training:
      stabilizers.draw_dropout_masks(self.cell)
    cell_map, cell_state = self._cell_map(update=training)
    if z0 is None:
      z0 = self.initial_state(x)
    solver = self.solver if training else self.eval_solver
    probe = (self.backward_probe[...]
             if hasattr(self.adjoint, "solve_with_probe") else None)
    try:
      sizes = _phase_sizes(_batch_size(z0)) if self.compact else []
      if len(sizes) > 1:
        sol = _compacted_solve(cell_map, z0, cell_state, x, solver,
                               self.adjoint, probe, max_steps, sizes)
      else:
        sol = fixed_point_lib.fixed_point(
            cell_map, z0, (cell_state, x), solver=solver,
            adjoint=self.adjoint, throw=self.throw, backward_probe=probe,
            max_steps=max_steps,
            record_steps=self.record_steps if training else ())
    except (TypeError, ValueError, IndexError) as error:
      mismatch = _cell_mismatch(self.cell, cell_map, z0, cell_state, x)
      if mismatch is None:
        raise
      raise ValueError(mismatch) from error
    _record(self.stats, jax.lax.stop_gradient(
        DEQStats.summarize(sol.stats, self.trace_rows)), DEQStats.merge)
    if training and self.jacobian_penalty:
      _record(self.penalty, _mean_penalty(
          cell_map, cell_state, x, sol.value, self.rngs(),
          self.penalty_probes), lambda stacked: jnp.mean(stacked, axis=0))
    if self.unconverged == "zero":
      converged = sol.stats.converged
      sol = sol._replace(value=jax.tree.map(
          lambda v: jnp.where(base.per_sample(converged, v), v, 0),
          sol.value))
    return sol


_MIN_PHASE_BATCH = 16


def _batch_size(z: Any) -> int:
  return jax.tree.leaves(z)[0].shape[0]


def _phase_sizes(batch: int) -> list[int]:
  """Batch sizes of `DEQ(compact=True)`'s phases: halving, >= 16 rows."""
  sizes = [batch]
  while -(-sizes[-1] // 2) >= _MIN_PHASE_BATCH:
    sizes.append(-(-sizes[-1] // 2))
  return sizes


def _compacted_solve(f, z0, cell_state, x, solver, adjoint, probe,
                     max_steps, sizes) -> solution_lib.Solution:
  """`DEQ(compact=True)`'s solve: phases on batches of `sizes` rows.

  Phase k stops once at most sizes[k + 1] of its samples are still
  iterating; those (padded with done samples, which converge at once and
  are not written back) start phase k + 1 from their best iterates. Each
  phase is an ordinary differentiable solve; gathers and scatters join
  them, so autodiff chains the adjoints. Stats are merged per sample; the
  trace holds each sample's residual after every global step.
  """
  batch = sizes[0]
  # Checked as `fixed_point` checks it: a bad budget is an error here too.
  budget = fixed_point_lib._check_budget(max_steps, solver)
  cap = jnp.asarray(solver.max_steps, jnp.int32)
  total = cap if budget is None else jnp.clip(budget, 0, cap)
  rows = jnp.arange(batch, dtype=jnp.int32)  # each row's original sample
  keep = jnp.ones((batch,), bool)  # rows whose results are written back
  start, inputs = z0, x
  steps = jnp.zeros((), jnp.int32)
  value = stats = None
  for k, size in enumerate(sizes):
    last = k == len(sizes) - 1
    phase_solver = (solver if last else
                    dataclasses.replace(solver, stop_active=sizes[k + 1]))
    phase_adjoint = adjoint
    if isinstance(adjoint, adjoint_lib.UnrolledAdjoint):
      # The phases share the tape budget in proportion to their batches (as
      # many rows each): the tapes together stay within it, and a tape's
      # zero-fill at every call costs its bytes.
      phase_adjoint = dataclasses.replace(
          adjoint, memory_budget=adjoint.memory_budget * size // sum(sizes))
    sol = fixed_point_lib.fixed_point(
        f, start, (cell_state, inputs), solver=phase_solver,
        adjoint=phase_adjoint, backward_probe=probe if k == 0 else None,
        max_steps=total - steps)
    if value is None:
      value, stats = sol.value, sol.stats
    else:
      value, stats = _merge_phase(value, stats, sol, rows, keep, steps)
    steps = steps + sol.stats.num_steps
    if not last:
      going = ~sol.stats.converged & jnp.isfinite(sol.stats.residual)
      order = jnp.argsort(~going, stable=True)[:sizes[k + 1]]
      keep, rows = going[order], rows[order]
      start = jax.tree.map(lambda v: v[order], sol.value)
      inputs = jax.tree.map(lambda v: v[order], inputs)
  nonfinite = ~jnp.isfinite(stats.residual)
  stats = stats._replace(
      num_steps=steps,
      status=solution_lib.batch_status(stats.converged, nonfinite))
  return solution_lib.Solution(value, stats)


def _merge_phase(value, stats, sol, rows, keep, offset):
  """Writes a phase's results for rows `rows` (where `keep`) into the
  whole batch's, its trace shifted by `offset` global steps."""

  def put(whole, part):
    mask = keep.reshape(keep.shape + (1,) * (part.ndim - 1))
    return whole.at[rows].set(jnp.where(mask, part, whole[rows]))

  new = sol.stats
  value = jax.tree.map(put, value, sol.value)
  length = stats.trace.shape[0]
  step = jnp.arange(length, dtype=jnp.int32)
  # Samples not in the phase keep their frozen residual over its steps, as
  # in one solve; the phase's own rows come from its trace.
  window = (step >= offset) & (step < offset + new.num_steps)
  trace = jnp.where(window[:, None], stats.residual[None, :], stats.trace)
  shifted = new.trace[jnp.clip(step - offset, 0, length - 1)]
  trace = trace.at[:, rows].set(jnp.where(
      window[:, None] & keep[None, :], shifted, trace[:, rows]))
  return value, stats._replace(
      residual=put(stats.residual, new.residual),
      converged=put(stats.converged, new.converged),
      trace=trace,
      sample_steps=stats.sample_steps.at[rows].add(
          jnp.where(keep, new.sample_steps, 0)),
      best_step=put(stats.best_step, offset + new.best_step))


def _mean_penalty(cell_map, cell_state, x, z, key, num_probes) -> jax.Array:
  """Batch mean of the Hutchinson ||df/dz||_F^2 over the state size d."""
  size = sum(v[0].size for v in jax.tree.leaves(z))
  penalty = regularizers.jacobian_penalty(cell_map, z, (cell_state, x), key,
                                          num_probes=num_probes)
  return (jnp.mean(penalty) / jnp.asarray(size, penalty.dtype)).astype(
      jnp.float32)


def _cell_mismatch(cell, cell_map, z0, cell_state, x) -> Optional[str]:
  """Why the cell does not fit (z0, x), or None when it does."""
  where = (f"DEQ({type(cell).__name__}): the state z0 {tree.describe(z0)}"
           f" and the input x {tree.describe(x)}")
  hint = ("check x's feature size against the cell's, and z0 (given, or"
          " made by z_init: zeros shaped like x by default) against the"
          " state the cell returns")
  try:
    out = jax.eval_shape(cell_map, z0, (cell_state, x))
  except Exception as error:  # pylint: disable=broad-except
    return (f"{where} do not fit the cell: {hint}. The cell raised"
            f" {type(error).__name__}: {error}")
  same = jax.tree.structure(out) == jax.tree.structure(z0) and all(
      (o.shape, o.dtype) == (z.shape, z.dtype)
      for o, z in zip(jax.tree.leaves(out), jax.tree.leaves(z0)))
  if not same:
    return (f"{where}: the cell returns {tree.describe(out)}, not a state"
            f" like z0; {hint}")
  if hasattr(cell_map, "residual_jacobian"):
    try:
      jax.eval_shape(cell_map.residual_jacobian, z0, (cell_state, x))
    except Exception as error:  # pylint: disable=broad-except
      return (f"{where} do not fit the cell's residual_jacobian (a DEQ's"
              f" states and inputs carry a leading batch axis). It raised"
              f" {type(error).__name__}: {error}")
  return None


def _record(variable: nnx.Variable, value: Any,
            merge: Callable[[Any], Any]) -> None:
  """Stores `value` in the layer's `variable`, where the layer may write.

  Under `nnx.vmap` with the layer broadcast (`in_axes=None` for it) the
  variable is not batched but `value` is: `merge` summarises the vmapped
  axis away, so the variable holds one record of all the inputs. Under a
  plain JAX transform of a function that closes over the layer
  (`jax.vmap(lambda x: deq(x))`) the variable belongs to an outer trace and
  cannot be written: a warning says so, since it still holds the previous
  call's value.
  """
  value = _merge_unbatched(value, variable.get_value(), merge)
  try:
    variable.set_value(value)
  except flax_errors.TraceContextError:
    warnings.warn(
        f"DEQ: {type(variable).__name__} not updated: this call runs under"
        f" a JAX transform (jax.vmap, jax.grad, jax.jit, ...) of a function"
        f" that closes over the layer, whose variables belong to an outer"
        f" trace, so it still holds the previous call's value. Pass the"
        f" layer to an nnx transform (nnx.vmap, nnx.grad, nnx.jit) instead,"
        f" or read deq.solve(x).stats.", stacklevel=4)


def _merge_unbatched(value: Any, like: Any,
                     merge: Callable[[Any], Any]) -> Any:
  """`value`, with each vmapped axis along which `like` is not batched
  summarised away by `merge` (given the value stacked on axis 0)."""
  if not _batched_unlike(value, like):
    return value

  def rule(axis_size, in_batched, value, like):
    value_batched, like_batched = in_batched
    stacked = jax.tree.map(
        lambda v, b: v if b else jnp.broadcast_to(v, (axis_size,) + v.shape),
        value, value_batched)
    if any(jax.tree.leaves(like_batched)):
      return stacked, jax.tree.map(lambda _: True, value)
    # Inner vmaps (if any) have already merged their axes.
    merged = merge(stacked)
    return merged, jax.tree.map(lambda _: False, merged)

  return _identity_batched_by(rule)(value, like)


def _identity_batched_by(rule: Callable) -> Callable[[Any, Any], Any]:
  """(value, like) -> value, whose batching rule under `vmap` is `rule`."""

  @custom_batching.custom_vmap
  def identity(value, like):
    del like
    return value

  identity.def_vmap(rule)
  return identity


def _batched_unlike(value: Any, like: Any) -> bool:
  """Whether `value` is batched along a vmapped axis that `like` is not.

  Found at trace time by the batching rule of a `custom_vmap` probe, which
  runs only under `vmap`; the probe's output is unused. Its inputs carry no
  derivatives, so it also runs under `grad` without a `vmap`, where a
  `custom_vmap` with differentiable inputs cannot be linearised.
  """
  found = []

  def rule(axis_size, in_batched, value, like):
    del axis_size
    value_batched, like_batched = in_batched
    if any(jax.tree.leaves(value_batched)) and not any(
        jax.tree.leaves(like_batched)):
      found.append(True)
    return value, value_batched

  _identity_batched_by(rule)(jax.lax.stop_gradient(value),
                            jax.lax.stop_gradient(like))
  return bool(found)


@dataclasses.dataclass(frozen=True)
class _CellMap:
  """f(z, (cell_state, x)) = cell(z, x); one object per graphdef, so the
  jitted solve is reused across calls."""

  graphdef: Any

  def __call__(self, z, args):
    state, x = args
    return nnx.merge(self.graphdef, state)(z, x)


@dataclasses.dataclass(frozen=True)
class _CellMapWithJacobian(_CellMap):
  """A cell map that passes on the cell's closed-form `residual_jacobian`."""

  def residual_jacobian(self, z, args):
    state, x = args
    return nnx.merge(self.graphdef, state).residual_jacobian(z, x)
