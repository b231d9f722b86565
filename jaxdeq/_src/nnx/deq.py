"""`DEQ`: an NNX layer whose output is the fixed point of a cell."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from flax import errors as flax_errors
from flax import nnx

from jaxdeq._src import adjoint as adjoint_lib
from jaxdeq._src import fixed_point as fixed_point_lib
from jaxdeq._src import solution as solution_lib
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
  def summarize(cls, stats: solution_lib.SolverStats) -> "DEQStats":
    f32 = lambda v: v.astype(jnp.float32)
    return cls(
        num_steps=stats.num_steps,
        mean_steps=f32(jnp.mean(stats.sample_steps)),
        max_residual=f32(jnp.max(stats.residual)),
        converged_fraction=f32(jnp.mean(stats.converged)),
        status=stats.status,
        trace=f32(jnp.max(stats.trace, axis=1)),
    )


class SolverStatsVariable(nnx.Variable):
  """Holds the `DEQStats` of a DEQ's last call (a value, not a parameter)."""


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
  `DEQStats`) wherever the layer's variables may be written (not under a
  plain `jax.vmap` of a function that calls it: use `deq.solve(x)` there);
  `deq.solve(x)` returns the full per-sample `Solution`. A cell that offers
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
      the implicit backward: `ImplicitAdjoint(throw=True)`).
    unconverged: "keep" (default) returns the best iterate of a sample that
      missed `tol`; "zero" returns zeros for it, so that it contributes no
      gradient, as the tutorial's unrolled Newton layer does. Backprop through
      a Newton trajectory that did not converge can be huge (near-singular
      Jacobians) and derail training.

  Example:
    >>> import jax.numpy as jnp, jaxdeq
    >>> from flax import nnx
    >>> from jaxdeq.nnx import DEQ, TanhCell
    >>> deq = DEQ(TanhCell(8, rngs=nnx.Rngs(0)), jaxdeq.Anderson(tol=1e-5))
    >>> deq(jnp.ones((4, 8))).shape
    (4, 8)
    >>> float(deq.stats.get_value().converged_fraction)
    1.0
  """

  def __init__(self, cell: nnx.Module,
               solver: Optional[base.FixedPointSolver] = None,
               adjoint: Optional[adjoint_lib.AbstractAdjoint] = None,
               z_init: Union[str, Callable[[jax.Array], jax.Array]] = "zeros",
               throw: bool = False, unconverged: str = "keep"):
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
    self.stats = SolverStatsVariable(DEQStats.empty(solver.max_steps))
    self.backward_probe = BackwardProbe(adjoint_lib.backward_probe())

  def __call__(self, x: jax.Array) -> jax.Array:
    """Returns z* for input `x` and records `DEQStats` in `self.stats`."""
    return self.solve(x).value

  def solve(self, x: Any) -> solution_lib.Solution:
    """Like calling the layer, but returns the whole `jaxdeq.Solution`.

    Example:
      >>> import jax.numpy as jnp, jaxdeq
      >>> from flax import nnx
      >>> from jaxdeq.nnx import DEQ, TanhCell
      >>> deq = DEQ(TanhCell(8, rngs=nnx.Rngs(0)))
      >>> deq.solve(jnp.ones((4, 8))).stats.residual.shape
      (4,)
    """
    graphdef, cell_state = nnx.split(self.cell)
    cell_map = (_CellMapWithJacobian if hasattr(self.cell, "residual_jacobian")
                else _CellMap)(graphdef)
    if self.z_init == "zeros":
      z0 = jax.tree.map(jnp.zeros_like, x)
    else:
      z0 = self.z_init(x)
    sol = fixed_point_lib.fixed_point(
        cell_map, z0, (cell_state, x), solver=self.solver,
        adjoint=self.adjoint, throw=self.throw,
        backward_probe=(self.backward_probe[...]
                        if hasattr(self.adjoint, "solve_with_probe") else None))
    _record(self.stats, DEQStats.summarize(sol.stats))
    if self.unconverged == "zero":
      converged = sol.stats.converged
      sol = sol._replace(value=jax.tree.map(
          lambda v: jnp.where(base.per_sample(converged, v), v, 0),
          sol.value))
    return sol


def _record(variable: nnx.Variable, value: Any) -> None:
  """Stores the stats where that is legal, and skips it where it is not.

  Under `jax.vmap` (or another JAX transform) of a function that calls the
  layer, the layer's variables belong to an outer trace and cannot be
  written; the stats of such a call are in `deq.solve(x).stats` instead.
  """
  try:
    variable.set_value(value)
  except flax_errors.TraceContextError:
    pass


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
