"""The one loop driver every solver runs under.

The driver owns the `jax.lax.while_loop`: it evaluates the map once per step,
measures per-sample residuals, freezes samples that already converged (or went
non-finite), keeps the best iterate seen, writes the residual trace and builds
the `Solution`. Solvers only say how to get the next iterate.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxdeq._src import control
from jaxdeq._src import solution as solution_lib
from jaxdeq._src.solvers import base


class Iterate(NamedTuple):
  """Everything one step reads and writes (the loop carry minus the trace).

  Attributes:
    z: (batch, ...) current iterate; frozen once its sample is done.
    fz: f(z, args).
    solver_state: the solver's own state.
    best_z: (batch, ...) iterate with the lowest residual so far.
    residual: (batch,) residual of `z`; NaN/inf marks a non-finite sample.
    best_residual: (batch,) residual of `best_z` (inf until a finite one).
    done: (batch,) bool, converged or non-finite: no longer updated.
    sample_steps: (batch,) int32, steps taken while not done.
    best_step: (batch,) int32, the step after which `best_z` was the iterate.
  """

  z: jax.Array
  fz: jax.Array
  solver_state: Any
  best_z: jax.Array
  residual: jax.Array
  best_residual: jax.Array
  done: jax.Array
  sample_steps: jax.Array
  best_step: jax.Array


MAX_TRACE_STEPS = 1024


def trace_length(max_steps: int) -> int:
  """Rows of the residual trace: the first steps, at most MAX_TRACE_STEPS."""
  return min(max_steps, MAX_TRACE_STEPS)


def residual(z: jax.Array, fz: jax.Array,
             solver: base.FixedPointSolver) -> jax.Array:
  """Per-sample residual ||f(z) - z|| (relative to ||f(z)|| by default).

  NaN marks a failed sample: one whose iterate or image is not finite, or
  whose norms overflow (an exploding iterate). Without that check the
  relative residual of a diverging float32 map became finite / inf = 0,
  "converged".
  """
  z, fz = jax.lax.stop_gradient((z, fz))
  error = jnp.linalg.norm(fz - z, axis=1)
  scale = jnp.linalg.norm(fz, axis=1)
  if solver.relative:
    error = error / (scale + jnp.asarray(solver.eps, error.dtype))
  return jnp.where(jnp.isfinite(error) & jnp.isfinite(scale), error, jnp.nan)


def _is_done(res: jax.Array, tol: float) -> jax.Array:
  # `~(res > tol)` is True for NaN too: a non-finite sample stops, unconverged.
  return ~(res > tol)


def init_iterate(f, solver: base.FixedPointSolver, z0: jax.Array,
                 args: Any, fz0: Optional[jax.Array] = None) -> Iterate:
  """The iterate before the first step (`fz0`: f(z0, args) if known)."""
  if fz0 is None:
    fz0 = f(z0, args)
  res = residual(z0, fz0, solver)
  batch = control.batch_spec(z0)
  # Inside shard_map, the solver's fresh buffers vary like the iterate, so
  # that every step (and its linearisation) sees one type per value.
  return control.vary_together(Iterate(
      z=z0,
      fz=fz0,
      solver_state=solver.init(f, z0, fz0, args),
      best_z=z0,
      residual=res,
      best_residual=jnp.where(jnp.isfinite(res), res, jnp.inf),
      done=_is_done(res, solver.tol),
      sample_steps=control.full(z0.shape[:1], 0, jnp.int32, batch),
      best_step=control.full(z0.shape[:1], 0, jnp.int32, batch),
  ))


def advance(f, solver: base.FixedPointSolver, args: Any, it: Iterate,
            step_index: jax.Array) -> Iterate:
  """One solver step plus the driver's bookkeeping; pure, so replayable."""
  z_next, state = solver.step(f, it.z, it.fz, args, it.solver_state,
                              step_index)
  return _after_step(solver, it, step_index, z_next, f(z_next, args), state)


def _after_step(solver: base.FixedPointSolver, it: Iterate,
                step_index: jax.Array, z_next: jax.Array, fz_next: jax.Array,
                state: Any) -> Iterate:
  """The driver's bookkeeping of a step: freezing, residuals, best iterate."""
  res_next = residual(z_next, fz_next, solver)
  active = ~it.done
  z = jnp.where(base.per_sample(active, z_next), z_next, it.z)
  fz = jnp.where(base.per_sample(active, fz_next), fz_next, it.fz)
  res = jnp.where(active, res_next, it.residual)
  improved = res < it.best_residual
  return Iterate(
      z=z,
      fz=fz,
      solver_state=state,
      best_z=jnp.where(base.per_sample(improved, z), z, it.best_z),
      residual=res,
      best_residual=jnp.where(improved, res, it.best_residual),
      done=it.done | _is_done(res, solver.tol),
      sample_steps=it.sample_steps + active.astype(jnp.int32),
      best_step=jnp.where(improved, step_index + 1, it.best_step),
  )


def checkpoint_interval(max_steps: int) -> int:
  """Steps between checkpoints: ~sqrt(max_steps) bounds memory and replay."""
  return max(1, math.isqrt(max_steps - 1) + 1) if max_steps > 1 else 1


class Checkpoint(NamedTuple):
  """What a replay needs of the carry before a step."""

  z: jax.Array
  fz: jax.Array
  solver_state: Any


def checkpoint_of(it: Iterate) -> Checkpoint:
  return Checkpoint(it.z, it.fz, it.solver_state)


def step_buffers(like: Any, rows: int) -> Any:
  """For each leaf of `like` (arrays or shapes), a buffer of `rows` of it.

  Whatever a buffer holds before its rows are written is never read. Each
  is filled with its own value: XLA merges equal initialisations into one
  broadcast that every loop-carried buffer then copies, and that copy
  (megabytes for a tape) cost as much as a tenth of an MNIST training step.
  """
  leaves, treedef = jax.tree.flatten(like)
  return jax.tree.unflatten(treedef, [
      control.full((rows,) + x.shape, i, x.dtype, control.spec_of(x))
      for i, x in enumerate(leaves)])


def _store_at(buffer: Any, tree: Any, index: jax.Array) -> Any:
  """Writes `tree` at row `index` of `buffer`, in place.

  Buffers that keep only some steps have one scratch row at the end, where
  the other steps write: a plain in-place update. (A `lax.cond` around the
  write copied the whole buffer at every step, a cost that grew with
  max_steps; a select between the new row and the kept one read a row more.)
  """
  return jax.tree.map(
      lambda b, x: jax.lax.dynamic_update_index_in_dim(b, x, index, 0),
      buffer, tree)


class _Carry(NamedTuple):
  step: jax.Array
  iterate: Iterate
  trace: jax.Array
  checkpoints: Optional[Checkpoint]
  tape: Optional[list]
  recorded: Optional[jax.Array]


def solve(f, z0: jax.Array, args: Any, solver: base.FixedPointSolver, *,
          checkpoint_every: Optional[int] = None,
          budget: Optional[jax.Array] = None,
          record_steps: tuple[int, ...] = (),
          linearize=None,
          tape_rows: int = 0,
          fz0: Optional[jax.Array] = None,
          ) -> tuple[solution_lib.Solution, Any, Iterate]:
  """Runs `solver` on `f` from `z0` until every sample is done or max_steps.

  Args:
    f: the map (batch, d) -> (batch, d) (a `Map`: it may offer
      `residual_jacobian`).
    z0: (batch, d) initial iterate.
    args: the map's arguments.
    solver: a `FixedPointSolver`.
    checkpoint_every: if set, the carry (z, f(z), solver state) before every
      step whose index is a multiple of it and at least `tape_rows` is
      stored (for `UnrolledAdjoint`, which replays the steps past its tape
      from them); the buffer holds ceil(max_steps / checkpoint_every) -
      tape_rows // checkpoint_every of them, the first for step
      `tape_rows` (a multiple of `checkpoint_every`).
    budget: optional () int traced step budget; the loop stops after
      min(budget, solver.max_steps) steps. `solver.max_steps` stays the
      static cap that sizes the buffers, so a new budget needs no retrace.
    record_steps: step counts k at which to keep each sample's iterate
      (`Solution.states`): the iterate after min(k, steps the sample took)
      steps of its own trajectory.
    linearize: optional (z, fz, solver_state, step) -> (z_next, fz_next,
      solver_state, row): the step computed by the caller (the unrolled
      adjoint's linearised step), whose `row`, a list of arrays, is written
      into a tape for the first `tape_rows` steps.
    tape_rows: rows of the tape (with `linearize`).
    fz0: f(z0, args) when the caller knows it without evaluating f (a
      linear solve started from zero: f(0) is the right-hand side).

  Returns:
    The `Solution`, (checkpoint buffer, tape) (each None when not asked for)
    and the final `Iterate` (its `solver_state` is the solver's last state).
  """
  max_steps = solver.max_steps
  limit = (max_steps if budget is None else
           jnp.clip(jnp.asarray(budget, jnp.int32), 0, max_steps))
  it0 = init_iterate(f, solver, z0, args, fz0)
  rows = trace_length(max_steps)
  trace = control.full((rows, z0.shape[0]), jnp.nan, it0.residual.dtype,
                       control.batch_spec(z0))
  checkpoints = None
  if checkpoint_every is not None:
    # Only the segments past the tape are replayed, so only they are
    # checkpointed; the other steps write the scratch row at the end.
    first_segment = tape_rows // checkpoint_every
    count = -(-max_steps // checkpoint_every) - first_segment
    checkpoints = step_buffers(checkpoint_of(it0), count + 1)

  tape = None
  if linearize is not None:
    rows_shape = jax.eval_shape(
        lambda: linearize(it0.z, it0.fz, it0.solver_state,
                          jnp.zeros((), jnp.int32))[3])
    scratch = 0 if tape_rows >= max_steps else 1
    tape = step_buffers(rows_shape, tape_rows + scratch)

  recorded = None
  if record_steps:
    recorded = jnp.broadcast_to(z0[None], (len(record_steps),) + z0.shape)
  record_at = jnp.asarray(record_steps, jnp.int32)

  def cond(carry: _Carry):
    running = (carry.step < limit) & ~jnp.all(carry.iterate.done)
    if solver.stop_active:
      running &= jnp.sum(~carry.iterate.done) > solver.stop_active
    return running

  def body(carry: _Carry) -> _Carry:
    step, it, trace, checkpoints, tape, recorded = carry
    if checkpoints is not None:
      checkpoints = _store_at(
          checkpoints, checkpoint_of(it),
          jnp.where((step % checkpoint_every == 0) & (step >= tape_rows),
                    step // checkpoint_every - first_segment, count))
    if linearize is not None:
      z_next, fz_next, state, row = linearize(it.z, it.fz, it.solver_state,
                                              step)
      # Steps past the tape (replayed from the checkpoints) write its
      # scratch row.
      tape = _store_at(tape, row, jnp.minimum(step, tape_rows))
      it = _after_step(solver, it, step, z_next, fz_next, state)
    else:
      it = advance(f, solver, args, it, step)
    if rows == max_steps:
      trace = jax.lax.dynamic_update_index_in_dim(trace, it.residual, step, 0)
    else:  # past the trace's rows nothing is written
      row = jnp.minimum(step, rows - 1)
      kept = jax.lax.dynamic_index_in_dim(trace, row, 0, keepdims=False)
      trace = jax.lax.dynamic_update_index_in_dim(
          trace, jnp.where(step < rows, it.residual, kept), row, 0)
    if recorded is not None:
      # Records not reached yet follow the iterate; a frozen (done) sample's
      # iterate no longer moves, so each record ends as the iterate after
      # min(k, sample_steps) steps.
      pending = (step + 1 <= record_at)[:, None, None]
      recorded = jnp.where(pending, it.z[None], recorded)
    return _Carry(step + 1, it, trace, checkpoints, tape, recorded)

  final = control.while_loop(
      cond, body,
      _Carry(jnp.zeros((), jnp.int32), it0, trace, checkpoints, tape,
             recorded))
  it = final.iterate
  converged = it.best_residual <= solver.tol
  stats = solution_lib.SolverStats(
      num_steps=final.step,
      residual=it.best_residual,
      converged=converged,
      trace=final.trace,
      status=solution_lib.batch_status(converged, ~jnp.isfinite(it.residual)),
      sample_steps=it.sample_steps,
      best_step=it.best_step,
  )
  sol = solution_lib.Solution(it.best_z, stats)
  if recorded is not None:
    sol = sol._replace(states=tuple(final.recorded))
  return sol, (final.checkpoints, final.tape), it


def empty_solution(z0: jax.Array,
                   solver: base.FixedPointSolver) -> solution_lib.Solution:
  """The `Solution` of a batch of zero samples: nothing to solve."""
  dtype = z0.dtype
  no_samples = jnp.zeros((0,), jnp.int32)
  stats = solution_lib.SolverStats(
      num_steps=jnp.zeros((), jnp.int32),
      residual=jnp.zeros((0,), dtype),
      converged=jnp.zeros((0,), bool),
      trace=jnp.zeros((trace_length(solver.max_steps), 0), dtype),
      status=jnp.asarray(solution_lib.Status.SUCCESSFUL, jnp.int32),
      sample_steps=no_samples,
      best_step=no_samples,
  )
  return solution_lib.Solution(z0, stats)
