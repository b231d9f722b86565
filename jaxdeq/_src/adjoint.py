"""How a fixed point is differentiated: implicit, unrolled or phantom."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxdeq._src import loop
from jaxdeq._src import solution as solution_lib
from jaxdeq._src.solvers import base


class BackwardStats(NamedTuple):
  """Diagnostics of `ImplicitAdjoint`'s backward solve.

  Attributes:
    num_steps: steps the backward solver took (summed over solves when read
      from a probe gradient that several solves share).
    residual: largest backward residual over the batch.
    not_converged: number of samples whose backward solve missed `tol`.
  """

  num_steps: jax.Array
  residual: jax.Array
  not_converged: jax.Array

  @classmethod
  def from_probe_grad(cls, probe_grad: jax.Array) -> "BackwardStats":
    """Reads the stats out of the gradient with respect to a probe.

    Example:
      >>> import jax, jax.numpy as jnp, jaxdeq
      >>> def loss(x, probe):
      ...   sol = jaxdeq.fixed_point(lambda z, x: 0.5 * jnp.tanh(z) + x,
      ...                            jnp.zeros((2, 3)), x, backward_probe=probe)
      ...   return sol.value.sum()
      >>> g = jax.grad(loss, argnums=1)(jnp.ones((2, 3)),
      ...                               jaxdeq.backward_probe())
      >>> int(jaxdeq.BackwardStats.from_probe_grad(g).not_converged)
      0
    """
    return cls(probe_grad[0], probe_grad[1], probe_grad[2])


def backward_probe(dtype: Any = jnp.float32) -> jax.Array:
  """A zero vector whose gradient carries `BackwardStats` out of a backward.

  Pass it to `fixed_point(..., backward_probe=probe)` and differentiate with
  respect to it as well: `BackwardStats.from_probe_grad` reads the gradient.
  It leaves every other gradient unchanged and needs no host callback.

  Example:
    >>> import jaxdeq
    >>> jaxdeq.backward_probe().shape
    (3,)
  """
  return jnp.zeros((3,), dtype)


class AbstractAdjoint:
  """How `fixed_point` differentiates the solution with respect to `args`."""

  def solve(self, f, z0, args, solver: base.FixedPointSolver, probe,
            throw: bool) -> solution_lib.Solution:
    raise NotImplementedError


# ---------------------------------------------------------------- implicit ---


@dataclasses.dataclass(frozen=True)
class ImplicitAdjoint(AbstractAdjoint):
  """Implicit-function-theorem gradients; memory independent of the steps.

  The backward pass solves u = u . df/dz(z*) + g matrix-free (one VJP of f per
  step, no Jacobian is formed) with a fixed-point solver, then returns
  u . df/dargs. The gradient with respect to `z0` is zero: z* does not depend
  on where the solve started.

  Attributes:
    solver: solver of the backward system; default: the forward solver's kind
      and settings (for Newton with a closed-form Jacobian, its transpose).
    callback: optional host function called with the backward `SolverStats`
      (through `jax.debug.callback`); None (the default) costs nothing.

  Example:
    >>> import jax, jax.numpy as jnp, jaxdeq
    >>> def z_star(x):
    ...   return jaxdeq.fixed_point(lambda z, x: 0.5 * z + x, jnp.zeros(1), x,
    ...                             solver=jaxdeq.Anderson(tol=1e-6),
    ...                             adjoint=jaxdeq.ImplicitAdjoint()).value
    >>> round(float(jax.grad(lambda x: z_star(x).sum())(jnp.ones(1))[0]), 3)
    2.0
  """

  solver: Optional[base.FixedPointSolver] = None
  callback: Optional[Callable[[solution_lib.SolverStats], Any]] = None

  def __post_init__(self):
    if self.solver is not None and not isinstance(self.solver,
                                                  base.FixedPointSolver):
      raise TypeError(
          f"ImplicitAdjoint: solver must be a jaxdeq solver, got"
          f" {self.solver!r}")

  def solve(self, f, z0, args, solver, probe, throw):
    return _implicit(f, solver, self, throw, z0, args, probe)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _implicit(f, solver, adjoint, throw, z0, args, probe):
  del adjoint, throw, probe
  sol, _ = loop.solve(f, z0, args, solver)
  return sol


def _implicit_fwd(f, solver, adjoint, throw, z0, args, probe):
  sol, _ = loop.solve(f, z0, args, solver)
  return sol, (sol.value, args, jnp.zeros_like(z0), probe)


def _implicit_bwd(f, solver, adjoint, throw, residuals, cotangent):
  z_star, args, zeros_z0, probe = residuals
  grad_z = cotangent.value
  diff_args, rebuild = _split_differentiable(args)
  _, vjp = jax.vjp(lambda z, a: f(z, rebuild(a)), z_star, diff_args)

  def backward_map(u, backward_args):
    return vjp(u)[0] + backward_args[2]

  backward_solver = adjoint.solver or solver.adjoint_solver()
  bsol, _ = loop.solve(backward_map, jnp.zeros_like(grad_z),
                       (z_star, args, grad_z), backward_solver)
  if adjoint.callback is not None:
    jax.debug.callback(adjoint.callback, bsol.stats)
  if throw:
    solution_lib.raise_if_failed(bsol.stats.status, bsol.stats.residual,
                                 backward_solver.tol, "backward")
  grad_args = _fill_nondifferentiable(args, vjp(bsol.value)[1])
  grad_probe = None
  if probe is not None:
    stats = bsol.stats
    grad_probe = jnp.stack([
        stats.num_steps.astype(probe.dtype),
        jnp.max(stats.residual).astype(probe.dtype),
        jnp.sum(~stats.converged).astype(probe.dtype),
    ])
  return zeros_z0, grad_args, grad_probe


_implicit.defvjp(_implicit_fwd, _implicit_bwd)


# ---------------------------------------------------------------- unrolled ---


@dataclasses.dataclass(frozen=True)
class UnrolledAdjoint(AbstractAdjoint):
  """Exact backpropagation through the steps the solver actually took.

  The forward loop stores the iterate every ~sqrt(max_steps) steps; the
  backward replays each segment from its checkpoint, keeping each step's VJP
  residuals, and backpropagates through it in reverse. Compute grows with the
  steps taken (each step is run twice and differentiated once), memory with
  sqrt(max_steps), never with max_steps. Only the iterate's update is
  differentiated (not the driver's residuals or best-iterate bookkeeping):
  each sample gets the exact gradient of its own trajectory up to the iterate
  returned for it, and a sample that went non-finite adds nothing (no NaN in
  shared parameter gradients). Gradients flow to `args` and to `z0`.

  Example:
    >>> import jax, jax.numpy as jnp, jaxdeq
    >>> def z_star(x):
    ...   return jaxdeq.fixed_point(lambda z, x: 0.5 * z + x, jnp.zeros(1), x,
    ...                             solver=jaxdeq.FixedPointIteration(1e-8, 100),
    ...                             adjoint=jaxdeq.UnrolledAdjoint()).value
    >>> round(float(jax.grad(lambda x: z_star(x).sum())(jnp.ones(1))[0]), 3)
    2.0
  """

  def solve(self, f, z0, args, solver, probe, throw):
    return _unrolled(f, solver, z0, args, probe)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _unrolled(f, solver, z0, args, probe):
  del probe
  sol, _ = loop.solve(f, z0, args, solver)
  return sol


def _unrolled_fwd(f, solver, z0, args, probe):
  every = loop.checkpoint_interval(solver.max_steps)
  sol, checkpoints = loop.solve(f, z0, args, solver, checkpoint_every=every)
  zeros_probe = None if probe is None else jnp.zeros_like(probe)
  stats = sol.stats
  return sol, (checkpoints, stats.num_steps, stats.sample_steps,
               stats.best_step, z0, args, zeros_probe)


def _finite(tree):
  """Non-finite floats set to zero (identity on a finite trajectory)."""
  return jax.tree.map(
      lambda x: jnp.where(jnp.isfinite(x), x, 0) if _is_differentiable(x)
      else x, tree)


def _unrolled_bwd(f, solver, residuals, cotangent):
  """Reverse sweep through the solver's steps, segment by segment.

  Only the iterate's own update is differentiated: z <- step(z, f(z)) with
  the driver's freezing, but not its residuals, best-iterate selection or
  stopping. That is exact: the returned value of sample b is its iterate
  after step best_step[b], and sample b moved only during its first
  sample_steps[b] steps, so its cotangent enters after step best_step[b] and
  flows back through the steps before it.
  """
  (checkpoints, num_steps, sample_steps, best_step, z0, args,
   zeros_probe) = residuals
  every = loop.checkpoint_interval(solver.max_steps)
  diff_args, rebuild = _split_differentiable(args)
  state_template = jax.tree.map(lambda c: c[0], checkpoints.solver_state)
  state_leaves, state_treedef = jax.tree.flatten(state_template)
  state_mask = [_is_differentiable(x) for x in state_leaves]

  def split_state(state):
    leaves = jax.tree.leaves(state)
    return ([x for x, m in zip(leaves, state_mask) if m],
            [x for x, m in zip(leaves, state_mask) if not m])

  def merge_state(diff, nondiff):
    diff, nondiff = iter(diff), iter(nondiff)
    return jax.tree.unflatten(state_treedef, [
        next(diff) if m else next(nondiff) for m in state_mask])

  def traced_step(carry, step_index):
    """One replayed step and its pullback (a pytree whose leaves are the
    residuals, so one loop can store them and a later one apply them)."""
    z, fz, state_diff, state_nondiff = carry
    active = step_index < sample_steps

    def step(z, fz, state_diff, a):
      # A sample that went non-finite gets zero cotangent; zeroing its
      # values keeps 0 * inf out of the shared parameter gradients.
      z, fz, state_diff = _finite((z, fz, state_diff))
      a = rebuild(a)
      z_next, state = solver.step(f, z, fz, a,
                                  merge_state(state_diff, state_nondiff),
                                  step_index)
      fz_next = f(z_next, a)
      frozen = base.per_sample(active, z)
      new_diff, new_nondiff = split_state(state)
      return ((jnp.where(frozen, z_next, z), jnp.where(frozen, fz_next, fz),
               new_diff), new_nondiff)

    (z, fz, state_diff), pullback, state_nondiff = jax.vjp(
        step, z, fz, state_diff, diff_args, has_aux=True)
    return (z, fz, state_diff, state_nondiff), pullback

  def checkpoint(seg):
    it = jax.tree.map(lambda c: c[seg], checkpoints)
    return (it.z, it.fz) + tuple(split_state(it.solver_state))

  residual_shapes = jax.eval_shape(
      lambda: jax.tree.leaves(traced_step(checkpoint(0),
                                          jnp.zeros((), jnp.int32))[1]))
  residual_buffer = [jnp.zeros((every,) + r.shape, r.dtype)
                     for r in residual_shapes]
  pullback_treedef = []
  cot_best = cotangent.value

  def inject(cot_z, after_step):
    hit = base.per_sample(best_step == after_step, cot_z)
    return cot_z + jnp.where(hit, cot_best, 0)

  def segment(carry):
    # The residual buffer travels in the carry: every slot a segment reads
    # it wrote first, so it needs no clearing between segments.
    seg, buffer, cot, cot_args = carry
    start = seg * every
    length = jnp.minimum(every, num_steps - start)

    def replay(j, state):
      buffer, carry = state
      carry, pullback = traced_step(carry, start + j)
      leaves, treedef = jax.tree.flatten(pullback)
      if not pullback_treedef:
        pullback_treedef.append(treedef)
      buffer = [jax.lax.dynamic_update_index_in_dim(b, r, j, 0)
                for b, r in zip(buffer, leaves)]
      return buffer, carry

    buffer, _ = jax.lax.fori_loop(0, length, replay,
                                  (buffer, checkpoint(seg)))

    def reverse(i, state):
      (cot_z, cot_fz, cot_state), cot_args = state
      j = length - 1 - i
      cot_z = inject(cot_z, start + j + 1)
      pullback = jax.tree.unflatten(pullback_treedef[0], [
          jax.lax.dynamic_index_in_dim(b, j, 0, keepdims=False)
          for b in buffer])
      cot_z, cot_fz, cot_state, cot_step_args = pullback(
          (cot_z, cot_fz, cot_state))
      return ((cot_z, cot_fz, cot_state),
              jax.tree.map(jnp.add, cot_args, cot_step_args))

    cot, cot_args = jax.lax.fori_loop(0, length, reverse, (cot, cot_args))
    return seg - 1, buffer, cot, cot_args

  first = checkpoint(0)
  cot = (jnp.zeros_like(z0), jnp.zeros_like(first[1]),
         [jnp.zeros_like(x) for x in first[2]])
  cot_args = jax.tree.map(jnp.zeros_like, diff_args)
  num_segments = -(-num_steps // every)
  _, _, (cot_z, cot_fz, cot_state), cot_args = jax.lax.while_loop(
      lambda c: c[0] >= 0, segment,
      (num_segments - 1, residual_buffer, cot, cot_args))
  cot_z = inject(cot_z, 0)

  # Through the initial evaluation f(z0) and solver.init to z0 and args.
  def start(z0, a):
    it = loop.init_iterate(f, solver, z0, rebuild(a))
    return it.z, it.fz, split_state(it.solver_state)[0]

  _, vjp_init = jax.vjp(start, z0, diff_args)
  cot_z0, cot_init_args = vjp_init((cot_z, cot_fz, cot_state))
  cot_args = jax.tree.map(jnp.add, cot_args, cot_init_args)
  return cot_z0, _fill_nondifferentiable(args, cot_args), zeros_probe


_unrolled.defvjp(_unrolled_fwd, _unrolled_bwd)


# ----------------------------------------------------------------- phantom ---


@dataclasses.dataclass(frozen=True)
class PhantomAdjoint(AbstractAdjoint):
  """Phantom gradient: backprop through `steps` damped steps from z*.

  The forward solve runs without autodiff; the returned value is z* itself,
  while its gradient is that of k steps z <- (1 - damping) z + damping f(z)
  started at z* (Geng et al., 2021). Cheap and approximate: close to the
  implicit gradient on contractive maps.

  Attributes:
    steps: number of differentiated steps (>= 1).
    damping: step size in (0, 1].

  Example:
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
    base.check_number(self, "damping", positive=True)
    if self.damping > 1:
      raise ValueError(
          f"PhantomAdjoint: damping must be in (0, 1], got {self.damping}")

  def solve(self, f, z0, args, solver, probe, throw):
    sol, _ = loop.solve(f, jax.lax.stop_gradient(z0),
                        jax.lax.stop_gradient(args), solver)
    z_star = jax.lax.stop_gradient(sol.value)

    def damped_step(_, z):
      return z + self.damping * (f(z, args) - z)

    z = jax.lax.fori_loop(0, self.steps, damped_step, z_star)
    # The value stays z* exactly; the gradient is that of the phantom steps.
    return sol._replace(value=z_star + (z - jax.lax.stop_gradient(z)))


# ------------------------------------------------------------------ pytrees ---


def _is_differentiable(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _split_differentiable(tree):
  """Floating leaves of `tree` and a function that puts them back."""
  leaves, treedef = jax.tree.flatten(tree)
  mask = [_is_differentiable(x) for x in leaves]
  diff = [x for x, m in zip(leaves, mask) if m]

  def rebuild(new_diff):
    it = iter(new_diff)
    return jax.tree.unflatten(
        treedef, [next(it) if m else x for x, m in zip(leaves, mask)])

  return diff, rebuild


def _fill_nondifferentiable(tree, diff_cotangents):
  """A cotangent for `tree`: the given floats, float0 zeros elsewhere."""
  leaves, treedef = jax.tree.flatten(tree)
  it = iter(diff_cotangents)
  out = [
      next(it) if _is_differentiable(x) else np.zeros(
          np.shape(x), jax.dtypes.float0) for x in leaves
  ]
  return jax.tree.unflatten(treedef, out)
