"""How a fixed point is differentiated: implicit, unrolled or phantom."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxdeq._src import control
from jaxdeq._src import linear_solve
from jaxdeq._src import loop
from jaxdeq._src import solution as solution_lib
from jaxdeq._src import tree
from jaxdeq._src.solvers import base
from jaxdeq._src.solvers import broyden


class BackwardStats(NamedTuple):
  """Diagnostics of `ImplicitAdjoint`'s backward solve.

  Attributes:
    num_steps: steps the backward solver took (summed over solves when read
      from a probe gradient that several solves share; for `GMRES`,
      matrix-vector products).
    residual: largest backward residual over the batch.
    not_converged: number of samples whose backward solve missed `tol`.
  """

  num_steps: jax.Array
  residual: jax.Array
  not_converged: jax.Array

  @classmethod
  def from_probe_grad(cls, probe_grad: jax.Array) -> "BackwardStats":
    """Reads the stats out of the gradient with respect to a probe.

    Examples:
      >>> import jax, jax.numpy as jnp, jaxdeq
      >>> def loss(x, probe):
      ...   sol = jaxdeq.fixed_point(lambda z, x: 0.5 * jnp.tanh(z) + x,
      ...                            jnp.zeros((2, 3)), x, backward_probe=probe)
      ...   return sol.value.sum()
      >>> _, g = jax.grad(loss, argnums=(0, 1))(jnp.ones((2, 3)),
      ...                                       jaxdeq.backward_probe())
      >>> stats = jaxdeq.BackwardStats.from_probe_grad(g)
      >>> int(stats.num_steps) > 0, int(stats.not_converged)
      (True, 0)
    """
    return cls(probe_grad[0], probe_grad[1], probe_grad[2])


def backward_probe(dtype: Any = jnp.float32) -> jax.Array:
  """A zero vector whose gradient carries `BackwardStats` out of a backward.

  Pass it to `fixed_point(..., backward_probe=probe)` and differentiate with
  respect to it as well as the parameters: `BackwardStats.from_probe_grad`
  reads the gradient (zeros when nothing else is differentiated, as no
  backward solve runs then).
  It leaves every other gradient unchanged and needs no host callback.

  Examples:
    >>> import jaxdeq
    >>> jaxdeq.backward_probe().shape
    (3,)
  """
  return jnp.zeros((3,), dtype)


class AbstractAdjoint:
  """How `fixed_point` differentiates the solution with respect to `args`.

  An adjoint gets the map (a `Map` on (batch, d) states), the raveled
  initial state, the map's arguments and the forward solver, and returns the
  `Solution` with whatever derivative rules it defines.
  """

  def solve(self, fn: base.Map, z0: jax.Array, args: Any,
            solver: base.FixedPointSolver, *,
            budget: Optional[jax.Array] = None,
            record_steps: tuple[int, ...] = ()) -> solution_lib.Solution:
    """Solves from `z0`; `budget` (traced int) caps the steps below
    `solver.max_steps`; `record_steps` fills `Solution.states` (without
    gradients: `at_state` gives them theirs)."""
    raise NotImplementedError

  def at_state(self, fn: base.Map, z: jax.Array, args: Any,
               solver: base.FixedPointSolver) -> jax.Array:
    """`z` itself, differentiated as if it were the fixed point.

    Fixed-point correction supervises intermediate iterates with the
    adjoint's own rule applied at each of them.
    """
    return self.solve(fn, z, args, solver, budget=_no_steps()).value


def _no_steps() -> jax.Array:
  """A step budget of zero: the solve returns its start."""
  return jnp.zeros((), jnp.int32)


def _solve(fn, z0, args, solver, budget=None, record_steps=()):
  return loop.solve(fn, z0, args, solver, budget=budget,
                    record_steps=record_steps)[0]


def _zero_stats_tangent(stats: solution_lib.SolverStats):
  return jax.tree.map(tree.zero_tangent, stats)


def _tangent(sol: solution_lib.Solution, value_dot: jax.Array):
  """The Solution's tangent: `value_dot`, nothing on stats and states."""
  states = (None if sol.states is None else
            tuple(jnp.zeros_like(s) for s in sol.states))
  return control.vary_like(
      sol._replace(value=value_dot, stats=_zero_stats_tangent(sol.stats),
                   states=states), sol)


# ---------------------------------------------------------------- implicit ---




@dataclasses.dataclass(frozen=True)
class ImplicitAdjoint(AbstractAdjoint):
  """Implicit-function-theorem derivatives; memory independent of the steps.

  One JVP rule: the tangent of z* is the solution v of (I - df/dz) v =
  (df/dargs) dargs at z*, a matrix-free linear solve
  (`jax.lax.custom_linear_solve`) whose transpose, u = u df/dz + g solved
  with VJPs, is the reverse-mode backward. So `jax.grad`, `jax.jvp`,
  `jax.jacfwd`, `jax.hessian` and `grad(grad(...))` all give the implicit
  derivatives, and no Jacobian is formed. The derivative with respect to
  `z0` is zero: z* does not depend on where the solve started.

  Attributes:
    linear_solver: solver of the linear systems (the linear-solve layer's
      protocol): default, the forward solver's kind and settings iterating
      u <- u df/dz + g (Newton with the map's closed-form Jacobian,
      transposed for the backward); another fixed-point solver;
      `jaxdeq.GMRES()` for maps whose linear iteration barely contracts;
      `jaxdeq.DenseLU()` for small states; or a lineax solver.
    callback: optional host function called with the `SolverStats` of each
      reverse-mode backward solve (through `jax.debug.callback`).
    throw: raise `FixedPointError` when a backward solve fails (under
      `jax.jit` inside `jax.errors.JaxRuntimeError`: see
      `jaxdeq.catch_failures`).

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdeq
    >>> def z_star(x):
    ...   return jaxdeq.fixed_point(lambda z, x: 0.5 * z + x, jnp.zeros(1), x,
    ...                             solver=jaxdeq.Anderson(tol=1e-6),
    ...                             adjoint=jaxdeq.ImplicitAdjoint()).value
    >>> round(float(jax.grad(lambda x: z_star(x).sum())(jnp.ones(1))[0]), 3)
    2.0
    >>> round(float(jax.jvp(z_star, (jnp.ones(1),), (jnp.ones(1),))[1][0]), 3)
    2.0
  """

  linear_solver: Any = None
  callback: Optional[Callable[[solution_lib.SolverStats], Any]] = None
  throw: bool = False

  def __post_init__(self):
    _check_linear_solver(self)
    if not isinstance(self.throw, bool):
      raise TypeError(f"ImplicitAdjoint: throw must be a bool, got"
                      f" {self.throw!r}")

  def solve(self, fn, z0, args, solver, *, budget=None, record_steps=()):
    return _implicit_solve(fn, solver, self, record_steps, z0, args, None,
                           budget)

  def at_state(self, fn, z, args, solver):
    return _implicit_solve(fn, solver, self, (), z, args, None,
                           _no_steps()).value

  def solve_with_probe(self, fn: base.Map, z0: jax.Array, args: Any,
                       solver: base.FixedPointSolver,
                       probe: jax.Array, *, budget=None,
                       record_steps=()) -> solution_lib.Solution:
    """`solve`, and the reverse-mode cotangent of `probe` is `BackwardStats`.

    The probe enters the tangent system as an identity block whose transpose
    returns the backward statistics instead of its cotangent: a value that
    leaves a jitted backward pass without host callbacks (first-order
    reverse mode only; forward mode ignores it).
    """
    return _implicit_solve(fn, solver, self, record_steps, z0, args, probe,
                           budget)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1, 2, 3))
def _implicit_solve(fn, solver, adjoint, record_steps, z0, args, probe,
                    budget):
  del adjoint, probe
  return _solve(fn, z0, args, solver, budget, record_steps)


def _implicit_solve_jvp(fn, solver, adjoint, record_steps, primals, tangents):
  z0, args, probe, budget = primals
  _, args_dot, probe_dot, _ = tangents
  # Calling the custom_jvp function itself keeps the rule differentiable:
  # second derivatives go through this rule again, never through the loop.
  sol = _implicit_solve(fn, solver, adjoint, record_steps, z0, args, probe,
                        budget)
  z_star = sol.value
  # Only the args that carry a tangent are linearised: a known zero tangent
  # pushed through a map with custom_vjp parts (no forward mode) would be
  # evaluated, not transposed.
  leaves, treedef = jax.tree.flatten(args)
  dots = jax.tree.leaves(args_dot, is_leaf=_is_symbolic_zero)
  moving = tree.LeafSplit(treedef, tuple(
      tree.is_differentiable(x) and not _is_symbolic_zero(t)
      for x, t in zip(leaves, dots)))
  if not any(moving.mask):
    return sol, _tangent(sol, jnp.zeros_like(z_star))
  moving_args, fixed_args = moving.split(args)
  moving_dots = [t for t, m in zip(dots, moving.mask) if m]

  # Linearisations rather than jax.jvp: reverse mode then also works for
  # maps that contain custom_vjp functions (which have no forward mode).
  _, args_jvp = jax.linearize(
      lambda a: fn(z_star, moving.merge(a, fixed_args)), moving_args)
  rhs = args_jvp(moving_dots)
  _, f_jvp = jax.linearize(lambda z: fn(z, args), z_star)
  linear_solver = linear_solve.as_linear_solver(adjoint.linear_solver, solver)
  jacobian = None
  if fn.residual_jacobian is not None:
    jacobian = fn.residual_jacobian(z_star, args)

  def forward_solve(operator, rhs):
    return linear_solver.solve(operator, rhs, matrix=jacobian)[0]

  def backward_solve(operator, cotangent):
    transposed = None if jacobian is None else jnp.swapaxes(jacobian, 1, 2)
    u, stats = linear_solver.solve(operator, cotangent, matrix=transposed)
    _report_backward(adjoint, linear_solver, stats)
    return u, stats

  matvec = lambda v: v - f_jvp(v)
  if probe is None:
    value_dot = jax.lax.custom_linear_solve(
        matvec, rhs, forward_solve,
        lambda vecmat, cotangent: backward_solve(vecmat, cotangent)[0])
    return sol, _tangent(sol, value_dot)
  value_dot = _solve_with_probe(matvec, rhs, probe_dot, forward_solve,
                                backward_solve)
  return sol, _tangent(sol, value_dot)


def _solve_with_probe(matvec, rhs, probe_dot, forward_solve, backward_solve):
  """The tangent solve with the probe riding along as an identity block.

  Right-hand side and probe are one vector [rhs.ravel(), probe]: the
  operator is the identity on the probe's three entries, and the transposed
  solve returns the backward statistics there instead of the probe's
  cotangent. One array rather than a pair: custom_linear_solve transposes
  only right-hand sides that are linear in every part, and a pair's probe
  part is a constant whenever the probe is not differentiated.
  """
  shape, dtype = rhs.shape, rhs.dtype
  size = rhs.size
  if _is_symbolic_zero(probe_dot):
    probe_dot = jnp.zeros((3,), dtype)

  def split(x):
    return x[:size].reshape(shape), x[size:]

  def with_probe(operator):
    def apply(v):
      return operator(jnp.concatenate([v.reshape(-1), jnp.zeros((3,), dtype)])
                      )[:size].reshape(shape)
    return apply

  def matvec_joint(x):
    v, p = split(x)
    return jnp.concatenate([matvec(v).reshape(-1), p])

  def solve_joint(operator, b):
    v, p = split(b)
    return jnp.concatenate([forward_solve(with_probe(operator), v).reshape(-1),
                            p])

  def transpose_solve_joint(operator, b):
    u, stats = backward_solve(with_probe(operator), split(b)[0])
    return jnp.concatenate([u.reshape(-1), _stats_vector(stats, dtype)])

  joint = jnp.concatenate([rhs.reshape(-1), probe_dot.astype(dtype)])
  out = jax.lax.custom_linear_solve(matvec_joint, joint, solve_joint,
                                    transpose_solve_joint)
  return split(out)[0]


_implicit_solve.defjvp(_implicit_solve_jvp, symbolic_zeros=True)


def _is_symbolic_zero(x) -> bool:
  return isinstance(x, jax.custom_derivatives.SymbolicZero)


def _check_linear_solver(adjoint) -> None:
  if adjoint.linear_solver is not None:
    try:
      linear_solve.as_linear_solver(adjoint.linear_solver)
    except TypeError as error:
      raise TypeError(f"{type(adjoint).__name__}: {error}") from None


def _report_backward(adjoint, linear_solver, stats):
  if adjoint.callback is not None:
    jax.debug.callback(adjoint.callback, stats)
  if adjoint.throw:
    solution_lib.raise_if_failed(stats.status, stats.residual,
                                 linear_solver.tol, "backward")


def _stats_vector(stats, dtype):
  return jnp.stack([
      stats.num_steps.astype(dtype),
      jnp.max(stats.residual, initial=0).astype(dtype),
      jnp.sum(~stats.converged).astype(dtype),
  ])


# ---------------------------------------------------------------- unrolled ---


@dataclasses.dataclass(frozen=True)
class UnrolledAdjoint(AbstractAdjoint):
  """Exact backpropagation through the steps the solver actually took.

  Compute is proportional to the steps taken, never to `max_steps`. Memory
  follows `memory_budget`:

  - a *tape*: the forward loop linearises each step as it takes it and
    stores its VJP residuals (the differentiable args themselves, the same at
    every step, are not stored); the backward applies them to the steps
    taken, last first, recomputing nothing. As many steps as the budget
    holds (all `max_steps` when it holds them) go on the tape.
  - *checkpoints* for the steps past the tape (all steps with
    `memory_budget=0`): the forward loop stores the carry (z, f(z), solver
    state) every ~sqrt(max_steps) steps; the backward replays each segment
    from its checkpoint into a buffer of VJP residuals and backpropagates
    through it in reverse: memory ~sqrt(max_steps), and each step runs once
    more (the replay) than on the tape.

  Only the iterate's update is differentiated (not the driver's residuals
  or best-iterate bookkeeping): each sample gets the exact gradient of its
  own trajectory up to the iterate returned for it, and a sample that went
  non-finite adds nothing (no NaN in shared parameter gradients). Gradients flow to `args` and to `z0`.
  Reverse mode only: `jax.jvp` raises JAX's "can't apply forward-mode
  autodiff (jvp) to a custom_vjp function" (use `ImplicitAdjoint`).

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdeq
    >>> def z_star(x):
    ...   return jaxdeq.fixed_point(lambda z, x: 0.5 * z + x, jnp.zeros(1), x,
    ...                             solver=jaxdeq.FixedPointIteration(1e-6, 100),
    ...                             adjoint=jaxdeq.UnrolledAdjoint()).value
    >>> round(float(jax.grad(lambda x: z_star(x).sum())(jnp.ones(1))[0]), 3)
    2.0

  Attributes:
    memory_budget: bytes the tape may take (its rows are the whole batch's
      residuals of one step); 0: checkpoints only. The default, 8 MiB, holds
      60 steps of the tutorial's fixed_point layer (batch 100, width 100:
      130 KB a step), about what it takes; a tape sized for steps that are
      never taken costs its initialisation at every call
      (`python -m benchmarks.unrolled` measures the trade-off).
  """

  memory_budget: int = 8 * 2**20

  def __post_init__(self):
    if not (isinstance(self.memory_budget, int) and self.memory_budget >= 0):
      raise ValueError(f"UnrolledAdjoint(memory_budget) must be an int >= 0"
                       f" (bytes), got {self.memory_budget!r}")

  def _plan(self, fn, z0, args, solver) -> tuple[int, Optional[int]]:
    """(tape rows, checkpoint interval or None): the tape takes as many
    steps as the budget holds, a multiple of the interval; the steps past it
    are checkpointed and replayed."""
    max_steps = solver.max_steps
    every = loop.checkpoint_interval(max_steps)
    if not self.memory_budget:
      return 0, every
    diff_args, rebuild = tree.split_differentiable(args)
    tape_row = jax.eval_shape(
        lambda z0, a: _tape_row_shapes(fn, solver, z0, a, rebuild),
        z0, diff_args)
    per_step = max(1, sum(x.size * x.dtype.itemsize
                          for x in jax.tree.leaves(tape_row)))
    rows = self.memory_budget // per_step
    if rows >= max_steps:
      return max_steps, None
    return rows // every * every, every

  def solve(self, fn, z0, args, solver, *, budget=None, record_steps=()):
    plan = self._plan(fn, z0, args, solver)
    return _unrolled(fn, solver, record_steps, plan, z0, args, budget)

  def at_state(self, fn, z, args, solver):
    raise ValueError(
        "UnrolledAdjoint has no gradient at an intermediate iterate (it"
        " differentiates the whole trajectory); fixed-point correction"
        " (record_steps) needs ImplicitAdjoint, PhantomAdjoint or"
        " NeumannAdjoint")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _unrolled(fn, solver, record_steps, plan, z0, args, budget):
  return _solve(fn, z0, args, solver, budget, record_steps)


def _differentiable_step(fn, solver, rebuild, states, state_nondiff,
                         step_index):
  """One raw solver step and map evaluation, as the function of (z, f(z),
  differentiable solver state, differentiable args) that the unrolled
  adjoint linearises: -> ((z_next, f(z_next), new differentiable state),
  new non-differentiable state)."""

  def step(z, fz, state_diff, a):
    # Zeroing a non-finite (done) sample's values keeps 0 * inf out of the
    # shared parameter gradients.
    z, fz, state_diff = tree.finite_or_zero((z, fz, state_diff))
    a = rebuild(a)
    z_next, state = solver.step(fn, z, fz, a,
                                states.merge(state_diff, state_nondiff),
                                step_index)
    new_diff, new_nondiff = states.split(state)
    return (z_next, fn(z_next, a), new_diff), new_nondiff

  return step


def _linearized_step(fn, solver, rebuild, states, diff_args):
  """The raw solver step and map as (z, fz, solver_state, step) -> (z_next,
  fz_next, solver_state, row), linearised: `row` is the leaves of its
  pullback (its VJP residuals) except those that are differentiable args
  themselves (the same at every step: a kernel is not stored max_steps
  times). `layout` (filled when traced): the pullback's tree, and for each
  of its leaves ("arg", i) or ("row", i)."""
  layout = []

  def linearize(z, fz, solver_state, step_index):
    state_diff, state_nondiff = states.split(solver_state)
    step = _differentiable_step(fn, solver, rebuild, states, state_nondiff,
                                step_index)
    (z_next, fz_next, new_diff), pullback, new_nondiff = jax.vjp(
        step, z, fz, state_diff, diff_args, has_aux=True)
    row, layout[:] = _split_pullback(pullback, diff_args)
    return z_next, fz_next, states.merge(new_diff, new_nondiff), row

  return linearize, layout


def _split_pullback(pullback, diff_args):
  """A pullback's residual leaves except the differentiable args themselves
  (found by identity while tracing: the same at every step, not stored),
  and the [(treedef, places)] that `_pullback_of` rebuilds it with."""
  leaves, treedef = jax.tree.flatten(pullback)
  arg_leaves = jax.tree.leaves(diff_args)
  places, row = [], []
  for leaf in leaves:
    same = [i for i, a in enumerate(arg_leaves) if leaf is a]
    places.append(("arg", same[0]) if same else ("row", len(row)))
    if not same:
      row.append(leaf)
  return row, [(treedef, places)]


def _pullback_of(layout, row, diff_args):
  """The pullback rebuilt from a stored row.

  Non-finite residuals are zeroed: they belong to a sample whose step
  overflowed from finite inputs (its later steps get zeroed inputs), a step
  after the iterate returned for it, whose cotangent is zero; left in, they
  would put 0 * inf = NaN into the gradients the batch shares.
  """
  treedef, places = layout[0]
  arg_leaves = jax.tree.leaves(diff_args)
  row = tree.finite_or_zero(list(row))
  return jax.tree.unflatten(treedef, [
      arg_leaves[i] if kind == "arg" else row[i] for kind, i in places])


def _tape_row_shapes(fn, solver, z0, diff_args, rebuild):
  it = loop.init_iterate(fn, solver, z0, rebuild(diff_args))
  states = tree.LeafSplit.of(it.solver_state)
  linearize, _ = _linearized_step(fn, solver, rebuild, states, diff_args)
  return linearize(it.z, it.fz, it.solver_state, jnp.zeros((), jnp.int32))[3]


def _unrolled_fwd(fn, solver, record_steps, plan, z0, args, budget):
  tape_rows, every = plan
  linearize = None
  if tape_rows:
    diff_args, rebuild = tree.split_differentiable(args)
    state0 = jax.eval_shape(
        lambda z0, a: loop.init_iterate(fn, solver, z0, rebuild(a)
                                        ).solver_state, z0, diff_args)
    linearize, _ = _linearized_step(fn, solver, rebuild,
                                    tree.LeafSplit.of(state0), diff_args)
  sol, buffers, _ = loop.solve(fn, z0, args, solver, checkpoint_every=every,
                               budget=budget, record_steps=record_steps,
                               linearize=linearize, tape_rows=tape_rows)
  stats = sol.stats
  return sol, (buffers, stats.num_steps, stats.sample_steps,
               stats.best_step, z0, args)


def _replayed_step(fn, solver, rebuild, states, sample_steps, diff_args):
  """One replayed solver step with its pullback, as a function of the carry.

  The pullback is a pytree whose leaves are the step's VJP residuals, so one
  loop can store it and a later one apply it.
  """

  def traced_step(carry, step_index):
    z, fz, state_diff, state_nondiff = carry
    active = base.per_sample(step_index < sample_steps, z)

    raw_step = _differentiable_step(fn, solver, rebuild, states,
                                    state_nondiff, step_index)

    def step(z, fz, state_diff, a):
      (z_next, fz_next, new_diff), new_nondiff = raw_step(z, fz, state_diff,
                                                          a)
      z, fz = tree.finite_or_zero((z, fz))
      return ((jnp.where(active, z_next, z), jnp.where(active, fz_next, fz),
               new_diff), new_nondiff)

    (z, fz, state_diff), pullback, state_nondiff = jax.vjp(
        step, z, fz, state_diff, diff_args, has_aux=True)
    return (z, fz, state_diff, state_nondiff), pullback

  return traced_step


def _unrolled_bwd(fn, solver, record_steps, plan, residuals, cotangent):
  """Reverse sweep through the solver's steps, segment by segment.

  Only the iterate's own update is differentiated: z <- step(z, f(z)) with
  the driver's freezing, but not its residuals, best-iterate selection or
  stopping. That is exact: the returned value of sample b is its iterate
  after step best_step[b], and sample b moved only during its first
  sample_steps[b] steps, so its cotangent enters after step best_step[b] and
  flows back through the steps before it.
  """
  (checkpoints, tape), num_steps, sample_steps, best_step, z0, args = (
      residuals)
  tape_rows, every = plan
  diff_args, rebuild = tree.split_differentiable(args)
  state0 = jax.eval_shape(
      lambda z0, a: loop.init_iterate(fn, solver, z0, rebuild(a)
                                      ).solver_state, z0, diff_args)
  states = tree.LeafSplit.of(state0)
  traced_step = _replayed_step(fn, solver, rebuild, states, sample_steps,
                               diff_args)

  def inject(cot_z, after_step):
    """Adds the output cotangent of the samples returned after this step."""
    hit = base.per_sample(best_step == after_step, cot_z)
    return cot_z + jnp.where(hit, cotangent.value, 0)

  cot = _zero_cotangents(fn, solver, rebuild, states, z0, diff_args)
  if every is not None:  # the steps past the tape, replayed
    # The first segment past the tape: row 0 of the checkpoint buffer.
    first_replayed = tape_rows // every

    def checkpoint(segment):
      it = jax.tree.map(lambda c: c[segment - first_replayed], checkpoints)
      return (it.z, it.fz) + tuple(states.split(it.solver_state))

    cot = _reverse_segments(traced_step, checkpoint, inject, every,
                            num_steps, first_replayed, cot, diff_args)
  if tape_rows:
    cot = _reverse_tape(fn, solver, rebuild, states, tape, inject,
                        jnp.minimum(num_steps, tape_rows), sample_steps, cot,
                        diff_args)
  cot, cot_args = cot
  cot_z, cot_fz, cot_state = cot
  cot_z = inject(cot_z, 0)

  # Through the initial evaluation f(z0) and solver.init to z0 and args.
  def start(z0, a):
    it = loop.init_iterate(fn, solver, z0, rebuild(a))
    return it.z, it.fz, states.split(it.solver_state)[0]

  _, vjp_init = jax.vjp(start, z0, diff_args)
  cot_z0, cot_init_args = vjp_init((cot_z, cot_fz, cot_state))
  cot_args = jax.tree.map(jnp.add, cot_args, cot_init_args)
  return control.sum_to_match(
      (cot_z0, tree.fill_nondifferentiable(args, cot_args)), (z0, args)) + (
          None,)


def _zero_cotangents(fn, solver, rebuild, states, z0, diff_args):
  """Zero cotangents of the carry (z, f(z), differentiable solver state)
  and of the differentiable args."""
  it = jax.eval_shape(
      lambda z0, a: loop.init_iterate(fn, solver, z0, rebuild(a)), z0,
      diff_args)
  zeros = control.zeros_like
  cot = (zeros(z0), zeros(it.fz),
         [zeros(x) for x in states.split(it.solver_state)[0]])
  return cot, jax.tree.map(zeros, diff_args)


def _reverse_tape(fn, solver, rebuild, states, tape, inject, num_steps,
                  sample_steps, cotangents, diff_args):
  """The reverse sweep over the tape's `num_steps` steps, last first: each
  applies the pullback the forward loop stored; nothing is recomputed."""
  linearize, layout = _linearized_step(fn, solver, rebuild, states,
                                       diff_args)

  def first_step(a):
    it = loop.init_iterate(fn, solver, jnp.zeros_like(cotangents[0][0]),
                           rebuild(a))
    return linearize(it.z, it.fz, it.solver_state, jnp.zeros((), jnp.int32))

  jax.eval_shape(first_step, diff_args)  # traced for `layout` only

  def body(carry):
    step, (cot_z, cot_fz, cot_state), cot_args = carry
    cot_z = inject(cot_z, step + 1)
    # A frozen sample's step was the identity: its cotangent passes by.
    active = base.per_sample(step < sample_steps, cot_z)
    pullback = _pullback_of(layout, [
        jax.lax.dynamic_index_in_dim(t, step, 0, keepdims=False)
        for t in tape], diff_args)
    moved_z, moved_fz, cot_state, cot_step_args = pullback(
        (jnp.where(active, cot_z, 0), jnp.where(active, cot_fz, 0),
         cot_state))
    cot_z = moved_z + jnp.where(active, 0, cot_z)
    cot_fz = moved_fz + jnp.where(active, 0, cot_fz)
    return (step - 1, (cot_z, cot_fz, cot_state),
            jax.tree.map(jnp.add, cot_args, cot_step_args))

  cot, cot_args = cotangents
  _, cot, cot_args = control.while_loop(
      lambda c: c[0] >= 0, body, (num_steps - 1, cot, cot_args))
  return cot, cot_args


def _reverse_segments(traced_step, checkpoint, inject, every, num_steps,
                      first_segment, cotangents, diff_args):
  """The reverse sweep over the segments from the last to `first_segment`.

  Each segment replays its steps from its checkpoint into a buffer of VJP
  residuals, then applies the stored pullbacks in reverse. Takes and
  returns (cotangent of the carry, accumulated cotangent of the
  differentiable args): after the sweep, the carry's is the cotangent
  before step first_segment * every.
  """
  layout = []

  def step_row(carry, step_index):
    """The replayed step, and its pullback's leaves that are not args."""
    carry, pullback = traced_step(carry, step_index)
    row, layout[:] = _split_pullback(pullback, diff_args)
    return carry, row

  residual_shapes = jax.eval_shape(
      lambda: step_row(checkpoint(0), jnp.zeros((), jnp.int32))[1])

  def segment(carry):
    seg, cot, cot_args = carry
    # Made here, not carried: a solve that ends inside its tape pays
    # nothing for the replay.
    buffer = loop.step_buffers(residual_shapes, every)
    start = seg * every
    length = jnp.minimum(every, num_steps - start)

    def replay(j, state):
      buffer, carry = state
      carry, row = step_row(carry, start + j)
      buffer = [jax.lax.dynamic_update_index_in_dim(b, r, j, 0)
                for b, r in zip(buffer, row)]
      return buffer, carry

    buffer, _ = control.fori_loop(0, length, replay,
                                  (buffer, checkpoint(seg)))

    def reverse(i, state):
      (cot_z, cot_fz, cot_state), cot_args = state
      j = length - 1 - i
      cot_z = inject(cot_z, start + j + 1)
      pullback = _pullback_of(layout, [
          jax.lax.dynamic_index_in_dim(b, j, 0, keepdims=False)
          for b in buffer], diff_args)
      cot_z, cot_fz, cot_state, cot_step_args = pullback(
          (cot_z, cot_fz, cot_state))
      return ((cot_z, cot_fz, cot_state),
              jax.tree.map(jnp.add, cot_args, cot_step_args))

    cot, cot_args = control.fori_loop(0, length, reverse, (cot, cot_args))
    return seg - 1, cot, cot_args

  cot, cot_args = cotangents
  num_segments = -(-num_steps // every)
  _, cot, cot_args = control.while_loop(
      lambda c: c[0] >= first_segment, segment,
      (num_segments - 1, cot, cot_args))
  return cot, cot_args


_unrolled.defvjp(_unrolled_fwd, _unrolled_bwd)


# ------------------------------------------- backwards that skip the solve ---


class _CheapAdjoint(AbstractAdjoint):
  """An adjoint whose backward is a bounded amount of work at z*.

  Subclasses define `args_cotangent(fn, solver, z_star, solver_state,
  diff_args, rebuild, cotangent)`: the cotangent of the differentiable args
  given the cotangent of z*.
  """

  needs_solver_state = False

  def solve(self, fn, z0, args, solver, *, budget=None, record_steps=()):
    return _cheap(fn, solver, self, record_steps, z0, args, budget)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _cheap(fn, solver, adjoint, record_steps, z0, args, budget):
  del adjoint
  return _solve(fn, z0, args, solver, budget, record_steps)


def _cheap_fwd(fn, solver, adjoint, record_steps, z0, args, budget):
  sol, _, final = loop.solve(fn, z0, args, solver, budget=budget,
                             record_steps=record_steps)
  kept_state = final.solver_state if adjoint.needs_solver_state else None
  return sol, (sol.value, kept_state, args)


def _cheap_bwd(fn, solver, adjoint, record_steps, residuals, cotangent):
  del record_steps
  z_star, solver_state, args = residuals
  diff_args, rebuild = tree.split_differentiable(args)
  cot_args = adjoint.args_cotangent(fn, solver, z_star, solver_state,
                                    diff_args, rebuild, cotangent.value)
  # z* does not depend on z0 (the raveled z0 is shaped like z*).
  return control.sum_to_match(
      (jnp.zeros_like(z_star), tree.fill_nondifferentiable(args, cot_args)),
      (z_star, args)) + (None,)


_cheap.defvjp(_cheap_fwd, _cheap_bwd)


def _state_vjp(fn, z_star, args):
  """v -> v df/dz at z*, with non-finite values zeroed first."""
  _, vjp = jax.vjp(lambda z: fn(z, args), tree.finite_or_zero(z_star))
  return lambda v: vjp(v)[0]


def _pull_to_args(fn, z_star, diff_args, rebuild, u):
  """u df/dargs at z*; a sample whose u is not finite adds zero."""
  finite = jnp.all(jnp.isfinite(u), axis=1)
  u = jnp.where(base.per_sample(finite, u), u, 0)
  _, vjp = jax.vjp(lambda a: fn(tree.finite_or_zero(z_star), rebuild(a)),
                   diff_args)
  return vjp(u)[0]


_MAX_UNROLLED_PHANTOM_STEPS = 16


@dataclasses.dataclass(frozen=True)
class PhantomAdjoint(_CheapAdjoint):
  """Phantom gradient: backprop through `steps` damped steps from z*.

  The value is z* exactly; its gradient is that of k steps
  z <- (1 - damping) z + damping f(z) started at z* (Geng et al., 2021,
  "On training implicit models"). The steps run only in the backward pass
  (none at inference). Cheap and approximate: close to the implicit gradient
  on contractive maps. A sample whose phantom steps overflow contributes
  zero gradient instead of NaN. Reverse mode only.

  Attributes:
    steps: number of differentiated steps (>= 1).
    damping: step size in (0, 1].

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdeq
    >>> def z_star(x):
    ...   return jaxdeq.fixed_point(lambda z, x: 0.5 * z + x, jnp.zeros(1), x,
    ...                             adjoint=jaxdeq.PhantomAdjoint(steps=20,
    ...                                                          damping=1.0)
    ...                             ).value
    >>> round(float(jax.grad(lambda x: z_star(x).sum())(jnp.ones(1))[0]), 3)
    2.0
  """

  steps: int = 5
  damping: float = 0.5

  def __post_init__(self):
    base.check_int(self, "steps", minimum=1)
    _check_damping(self)

  def args_cotangent(self, fn, solver, z_star, solver_state, diff_args,
                     rebuild, cotangent):
    def phantom_steps(a):
      def damped_step(_, carry):
        z, finite = carry
        finite &= jnp.all(jnp.isfinite(z), axis=1)
        z = tree.finite_or_zero(z)
        return z + self.damping * (fn(z, rebuild(a)) - z), finite

      # A few steps are unrolled in Python: XLA:CPU runs the kernel-gradient
      # convolutions of a loop body far slower than the same convolutions
      # outside a loop. Many steps stay a loop: unrolled, their compilation
      # grows with the steps.
      carry = (z_star, jnp.ones(z_star.shape[:1], bool))
      if self.steps <= _MAX_UNROLLED_PHANTOM_STEPS:
        for step in range(self.steps):
          carry = damped_step(step, carry)
      else:
        carry = control.fori_loop(0, self.steps, damped_step, carry)
      z, finite = carry
      return z, finite & jnp.all(jnp.isfinite(z), axis=1)

    # A sample whose phantom steps overflowed gets zero cotangent; the steps
    # zero its non-finite values, so 0 * inf cannot reach shared gradients.
    _, vjp, finite = jax.vjp(phantom_steps, diff_args, has_aux=True)
    return vjp(jnp.where(base.per_sample(finite, z_star), cotangent, 0))[0]


@dataclasses.dataclass(frozen=True)
class NeumannAdjoint(_CheapAdjoint):
  """Neumann-series phantom gradient: the implicit backward, truncated.

  The implicit backward solves u = u J + g with J = df/dz at z*. Written for
  the damped map h(z) = (1 - damping) z + damping f(z) (same fixed point,
  Jacobian J_h = (1 - damping) I + damping J), its solution is
  u = damping * g * sum_k J_h^k; this adjoint keeps the first `terms`
  terms (Geng et al., 2021). Cost: `terms` VJPs of f at z*, no solve and
  no stored trajectory; exact for a map whose J_h^terms vanishes, close to
  the implicit gradient when J_h contracts fast. A sample whose series
  overflows adds zero gradient. Reverse mode only.

  Attributes:
    terms: terms of the series (>= 1); `terms=1` is damping * g df/dargs.
    damping: in (0, 1].

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdeq
    >>> def z_star(x):
    ...   return jaxdeq.fixed_point(lambda z, x: 0.5 * z + x, jnp.zeros(1), x,
    ...                             adjoint=jaxdeq.NeumannAdjoint(terms=30)
    ...                             ).value
    >>> round(float(jax.grad(lambda x: z_star(x).sum())(jnp.ones(1))[0]), 3)
    2.0
  """

  terms: int = 8
  damping: float = 1.0

  def __post_init__(self):
    base.check_int(self, "terms", minimum=1)
    _check_damping(self)

  def args_cotangent(self, fn, solver, z_star, solver_state, diff_args,
                     rebuild, cotangent):
    vjp = _state_vjp(fn, z_star, rebuild(diff_args))

    def term(_, carry):
      power, total = carry  # power = g J_h^k
      power = (1 - self.damping) * power + self.damping * vjp(power)
      return power, total + power

    _, total = control.fori_loop(0, self.terms - 1, term,
                                 (cotangent, cotangent))
    return _pull_to_args(fn, z_star, diff_args, rebuild,
                         self.damping * total)


@dataclasses.dataclass(frozen=True)
class SHINEAdjoint(_CheapAdjoint):
  """SHINE: the backward reuses the forward Broyden's inverse estimate.

  Broyden ends its solve with H ~ (J - I)^-1, the inverse Jacobian of
  g(z) = f(z) - z at z*; the implicit backward's u = g (I - J)^-1 is then
  approximately -g H, one low-rank product (Ramzi et al., 2022, "SHINE:
  SHaring the INverse Estimate from the forward pass"). Each sample's
  estimate is checked with one VJP: where the relative residual
  ||u - u J - g|| / ||g|| exceeds `fallback_tol`, the backward is solved
  as `ImplicitAdjoint` would, started from the SHINE estimate (samples
  whose estimate is good enough finish at once). Needs `Broyden` as the
  forward solver. Reverse mode only.

  Attributes:
    fallback_tol: relative residual above which a sample's estimate is
      refined by the backward solve (inf: never refine).
    linear_solver: solver of the fallback backward, as `ImplicitAdjoint`'s
      (default: the forward solver).

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdeq
    >>> def z_star(x):
    ...   return jaxdeq.fixed_point(lambda z, x: 0.5 * jnp.tanh(z) + x,
    ...                             jnp.zeros((2, 3)), x,
    ...                             solver=jaxdeq.Broyden(tol=1e-6),
    ...                             adjoint=jaxdeq.SHINEAdjoint()).value
    >>> g = jax.grad(lambda x: z_star(x).sum())(jnp.ones((2, 3)))
    >>> g.shape
    (2, 3)
  """

  fallback_tol: float = 0.1
  linear_solver: Any = None
  needs_solver_state = True

  def __post_init__(self):
    base.check_number(self, "fallback_tol", positive=True)
    _check_linear_solver(self)

  def solve(self, fn, z0, args, solver, *, budget=None, record_steps=()):
    if not isinstance(solver, broyden.Broyden):
      raise TypeError(
          "SHINEAdjoint reuses Broyden's inverse-Jacobian estimate: the"
          f" forward solver must be jaxdeq.Broyden, got {type(solver).__name__}")
    return _cheap(fn, solver, self, record_steps, z0, args, budget)

  def at_state(self, fn, z, args, solver):
    # An intermediate iterate has no matching inverse estimate.
    return ImplicitAdjoint(linear_solver=self.linear_solver).at_state(
        fn, z, args, solver)

  def args_cotangent(self, fn, solver, z_star, solver_state, diff_args,
                     rebuild, cotangent):
    vjp = _state_vjp(fn, z_star, rebuild(diff_args))
    estimate = -broyden.inverse_rmatvec(solver_state, cotangent)

    def relative_residual(u):
      error = jnp.linalg.norm(u - vjp(u) - cotangent, axis=1)
      scale = jnp.linalg.norm(cotangent, axis=1)
      return error / jnp.where(scale > 0, scale, 1)

    poor = ~(relative_residual(estimate) <= self.fallback_tol)
    linear_solver = linear_solve.as_linear_solver(self.linear_solver, solver)

    def refine(u0):
      u, _ = linear_solver.solve(lambda v: v - vjp(v), cotangent, x0=u0)
      return jnp.where(base.per_sample(poor, u), u, u0)

    u = control.cond(jnp.any(poor), refine, lambda u0: u0, estimate)
    return _pull_to_args(fn, z_star, diff_args, rebuild, u)


def _check_damping(adjoint) -> None:
  base.check_number(adjoint, "damping", positive=True)
  if adjoint.damping > 1:
    raise ValueError(f"{type(adjoint).__name__}: damping must be in (0, 1],"
                     f" got {adjoint.damping}")
