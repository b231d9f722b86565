"""`fixed_point`: the entry point that checks input and picks the adjoint."""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxdeq._src import adjoint as adjoint_lib
from jaxdeq._src import control
from jaxdeq._src import loop
from jaxdeq._src import solution as solution_lib
from jaxdeq._src import tree
from jaxdeq._src.solvers import anderson
from jaxdeq._src.solvers import base


def fixed_point(
    f: Callable[[Any, Any], Any],
    z0: Any,
    args: Any = None,
    *,
    solver: Optional[base.FixedPointSolver] = None,
    adjoint: Optional[adjoint_lib.AbstractAdjoint] = None,
    has_aux: bool = False,
    throw: bool = False,
    batched: bool = True,
    backward_probe: Optional[jax.Array] = None,
    max_steps: Union[int, jax.Array, None] = None,
    record_steps: Sequence[int] = (),
) -> solution_lib.Solution:
  """Finds z* = f(z*, args), differentiable in `args` and closed-over arrays.

  The solve runs outside autodiff; `adjoint` says how derivatives are
  formed. Arrays `f` closes over are differentiated exactly as `args` are
  (`f` is closure-converted, as `jax.closure_convert` does), so
  `lambda z, _: cell(z, x)` is as good as passing `x` in `args`.

  `fixed_point` jits itself: repeated calls with the same `f` object, solver,
  adjoint and input shapes reuse one compilation. Arrays in `args` are traced;
  other leaves (Python numbers, strings) are static and must be hashable.

  Args:
    f: the map `f(z, args) -> z_next` (or `(z_next, aux)` with `has_aux`),
      `z_next` with the structure, shapes and dtypes of `z`. With
      `batched=True` samples along every leaf's leading axis must be
      independent. A map object may offer `residual_jacobian(z, args)`, the
      (batch, d, d) Jacobian of g(z) = z - f(z, args) over each sample's
      raveled state, which `Newton` uses.
    z0: initial state, any pytree of floating or complex arrays (a mixed
      pytree is solved in complex arithmetic; its real leaves stay real);
      with `batched=True` every leaf's leading axis is the batch.
    args: the map's arguments (any pytree).
    solver: a jaxdeq solver; default `Anderson()`.
    adjoint: `ImplicitAdjoint()` (default), `UnrolledAdjoint()`,
      `PhantomAdjoint()`, `NeumannAdjoint()` or `SHINEAdjoint()` (with
      `Broyden`).
    has_aux: `f` returns `(z_next, aux)`; `Solution.aux` is the aux at the
      returned value.
    throw: raise `FixedPointError` if the forward solve fails (see
      `catch_failures` under `jax.jit`).
    batched: treat `z0` as one sample when False (stats then have no batch
      axis).
    backward_probe: optional `backward_probe()` (implicit adjoint only); the
      gradient with respect to it carries the backward's `BackwardStats`.
    max_steps: a step budget below `solver.max_steps`, which stays the
      static cap: an int or a traced int scalar (clipped to [0, cap]), so
      that a jitted caller can change it without recompiling (test-time
      compute). Default: the cap.
    record_steps: step counts k1 < k2 < ... for fixed-point correction:
      `Solution.states` then holds one state per k, each differentiable
      through the adjoint's rule applied at it (see the table below).

  Which iterate each returned state is, per sample (a sample stops moving
  once it converges or goes non-finite):

  ===================  =================================  ==================
  returned             iterate                            gradient
  ===================  =================================  ==================
  `value`              the best iterate (lowest residual  the adjoint's
                       seen, usually the last)
  `states[i]`          the trajectory's iterate after     the adjoint's
                       min(record_steps[i], steps taken)  rule at that
                       steps (not the best one)           iterate
  ===================  =================================  ==================

  Returns:
    A `Solution`: `value` (the best iterate found), `stats`, `aux` and
    `states`.

  Raises:
    TypeError: a bad solver, adjoint, flag or non-floating state.
    ValueError: `f(z0, args)` differs from `z0` in structure, shape or dtype;
      leaves disagree on the batch size; `tol` is below what a half-precision
      state can resolve.
    FixedPointError: with `throw=True`, on failure.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdeq
    >>> sol = jaxdeq.fixed_point(lambda z, a: jnp.cos(z), jnp.zeros(()), None,
    ...                          solver=jaxdeq.Anderson(tol=1e-6),
    ...                          batched=False)
    >>> round(float(sol.value), 4), bool(sol.stats.converged)
    (0.7391, True)

    A pytree state, a closed-over parameter and forward mode:

    >>> w = jnp.array(0.5)
    >>> def state(w):
    ...   f = lambda z, x: {"a": w * jnp.tanh(z["b"]) + x, "b": w * z["a"]}
    ...   z0 = {"a": jnp.zeros((2, 3)), "b": jnp.zeros((2, 3))}
    ...   return jaxdeq.fixed_point(f, z0, jnp.ones((2, 3))).value["b"]
    >>> dz_dw = jax.jvp(state, (w,), (1.0,))[1]
    >>> bool(jnp.allclose(dz_dw, jax.grad(lambda w: state(w)[0, 0])(w),
    ...                   rtol=1e-3))
    True

    A run-time step budget and two supervised intermediate iterates:

    >>> sol = jaxdeq.fixed_point(lambda z, x: 0.5 * jnp.tanh(z) + x,
    ...                          jnp.zeros((2, 3)), jnp.ones((2, 3)),
    ...                          max_steps=jnp.asarray(2), record_steps=(1, 2))
    >>> int(sol.stats.num_steps), len(sol.states)
    (2, 2)
  """
  solver = anderson.Anderson() if solver is None else solver
  adjoint = adjoint_lib.ImplicitAdjoint() if adjoint is None else adjoint
  _check_options(f, solver, adjoint, has_aux, throw, batched, backward_probe)
  budget = _check_budget(max_steps, solver)
  record_steps = _check_record_steps(record_steps, adjoint)
  z0 = _as_state(z0)
  if backward_probe is not None:
    backward_probe = jnp.asarray(backward_probe)

  dynamic, static, treedef = _partition_args(args)
  key = (f, solver, adjoint, has_aux, batched, record_steps, treedef,
         tuple(static))
  try:
    hash(key)
  except TypeError as error:  # unhashable static parts: no jit cache
    if not _traced((z0, dynamic)):
      # Inside the caller's own jit the solve is traced once with it;
      # called eagerly, every call would trace and compile it again.
      warnings.warn(
          f"fixed_point: {_unhashable(key)} cannot be hashed ({error}), so"
          " this eager call is not cached: every call traces and compiles"
          " the solve again. Make it hashable (a frozen dataclass, a tuple"
          " rather than a list), pass arrays, or call fixed_point inside"
          " your own jax.jit", stacklevel=2)
    run = functools.partial(_solve_entry, *key)
  else:
    run = functools.partial(_jitted_entry, *key)
  sol = run(z0, dynamic, backward_probe, budget)
  if throw:
    solution_lib.raise_if_failed(sol.stats.status, sol.stats.residual,
                                 solver.tol, "forward")
  return sol


def _check_options(f, solver, adjoint, has_aux, throw, batched,
                   backward_probe) -> None:
  if not isinstance(solver, base.FixedPointSolver):
    raise TypeError(
        "fixed_point: solver must be a jaxdeq solver (FixedPointIteration,"
        f" Anderson, Broyden, Newton), got {solver!r}")
  if not isinstance(adjoint, adjoint_lib.AbstractAdjoint):
    raise TypeError(
        "fixed_point: adjoint must be ImplicitAdjoint(), UnrolledAdjoint(),"
        " PhantomAdjoint(), NeumannAdjoint() or SHINEAdjoint(), got"
        f" {adjoint!r}")
  if not callable(f):
    raise TypeError(f"fixed_point: f must be callable, got {f!r}")
  for name, value in (("has_aux", has_aux), ("throw", throw),
                      ("batched", batched)):
    if not isinstance(value, (bool, np.bool_)):
      raise TypeError(f"fixed_point: {name} must be a bool, got {value!r}")
  if backward_probe is not None:
    if not hasattr(adjoint, "solve_with_probe"):
      raise ValueError(
          f"fixed_point: backward_probe needs an adjoint with a backward solve"
          f" (ImplicitAdjoint), got {type(adjoint).__name__}")
    if jnp.shape(backward_probe) != (3,):
      raise ValueError(
          "fixed_point: backward_probe must be jaxdeq.backward_probe(), shape"
          f" (3,), got shape {jnp.shape(backward_probe)}")


def _check_budget(max_steps, solver) -> Optional[jax.Array]:
  if max_steps is None:
    return None
  if isinstance(max_steps, bool):
    raise TypeError(f"fixed_point: max_steps must be an int, got {max_steps!r}")
  if isinstance(max_steps, int):
    if not 0 <= max_steps <= solver.max_steps:
      raise ValueError(
          f"fixed_point: max_steps={max_steps} must be in [0,"
          f" solver.max_steps={solver.max_steps}] (the solver's max_steps is"
          " the static cap; raise it to allow more)")
    return jnp.asarray(max_steps, jnp.int32)
  budget = jnp.asarray(max_steps)
  if budget.shape != () or not jnp.issubdtype(budget.dtype, jnp.integer):
    raise TypeError(
        "fixed_point: max_steps must be an int or an integer scalar array,"
        f" got {budget.dtype} of shape {budget.shape}")
  return budget.astype(jnp.int32)


def _check_record_steps(record_steps, adjoint) -> tuple[int, ...]:
  steps = tuple(record_steps)
  for k in steps:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
      raise ValueError(
          "fixed_point: record_steps must be non-negative ints, got"
          f" {record_steps!r}")
  if list(steps) != sorted(set(steps)):
    raise ValueError(
        f"fixed_point: record_steps must increase strictly, got {steps}")
  if steps and isinstance(adjoint, adjoint_lib.UnrolledAdjoint):
    raise ValueError(
        "fixed_point: record_steps (fixed-point correction) needs an adjoint"
        " with a gradient at any iterate (ImplicitAdjoint, PhantomAdjoint,"
        " NeumannAdjoint, SHINEAdjoint), not UnrolledAdjoint")
  return tuple(int(k) for k in steps)


def _as_state(z0: Any) -> Any:
  """z0's leaves as arrays; each must be floating or complex."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(z0)
  if not leaves:
    raise ValueError("fixed_point: z0 has no arrays (an empty pytree)")
  out = []
  for path, leaf in leaves:
    leaf = jnp.asarray(leaf)
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      raise TypeError(
          f"fixed_point: z0{jax.tree_util.keystr(path)} must be a floating or"
          f" complex array, got dtype {leaf.dtype}; cast it, e.g."
          " z0.astype(jnp.float32)")
    out.append(leaf)
  return jax.tree.unflatten(treedef, out)


def _is_traced_leaf(x: Any) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _traced(tree: Any) -> bool:
  return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(tree))


def _unhashable(key: tuple) -> str:
  """Which part of the jit cache's key cannot be hashed, in words."""
  names = ("f", "solver", "adjoint", "has_aux", "batched", "record_steps",
           "the structure of args")
  for name, part in zip(names, key):
    try:
      hash(part)
    except TypeError:
      return name
  return "a non-array leaf of args"


def _partition_args(args: Any):
  """Array leaves (traced by the jit) and the other leaves (static)."""
  leaves, treedef = jax.tree.flatten(args)
  dynamic = [x for x in leaves if _is_traced_leaf(x)]
  static = [None if _is_traced_leaf(x) else x for x in leaves]
  return dynamic, static, treedef


def _merge_args(dynamic, static, treedef):
  # None marks a traced slot: None is never a leaf of a flattened pytree.
  it = iter(dynamic)
  return jax.tree.unflatten(
      treedef, [next(it) if s is None else s for s in static])


def _solve_entry(f, solver, adjoint, has_aux, batched, record_steps, treedef,
                 static, z0, dynamic, probe, budget):
  """Solves on the array leaves of args; the static leaves are baked in."""

  def with_args(fn):
    return lambda z, dynamic: fn(z, _merge_args(dynamic, list(static),
                                                treedef))

  # A closed form in the solver's config moves into the map, where every
  # solver (and the implicit adjoint's linear solves) can find it.
  jacobian = getattr(solver, "jacobian", None)
  if jacobian is not None:
    solver = dataclasses.replace(solver, jacobian=None)
  else:
    jacobian = getattr(f, "residual_jacobian", None)
  return _solve(with_args(f),
                None if jacobian is None else with_args(jacobian),
                z0, dynamic, solver, adjoint, has_aux, batched, probe, budget,
                record_steps)


_jitted_entry = jax.jit(_solve_entry, static_argnums=tuple(range(8)))


def _solve(f, jacobian, z0, args, solver, adjoint, has_aux, batched, probe,
           budget, record_steps):
  """The traced body of `fixed_point`: checks, ravel, closure-convert, solve.

  `args` holds only arrays here; `jacobian` is the closed form of the
  residual's Jacobian or None.
  """
  if not batched:
    z0 = jax.tree.map(lambda x: x[None], z0)
    f = _batched_map(f, has_aux)
  batch = _check_batch(z0)
  _check_output(f, z0, args, has_aux, batched)
  _check_tolerance(solver, z0)
  z0, args = control.vary_together((z0, args))

  if jacobian is not None and not batched:
    jacobian = _batched_jacobian(jacobian)
  f_converted, f_consts = jax.closure_convert(f, z0, args)
  jac_converted, jac_consts = None, []
  if jacobian is not None:
    jac_converted, jac_consts = jax.closure_convert(jacobian, z0, args)
  raveller = tree.Raveller.of(z0)

  def flat_map(z, all_args):
    a, fc, _ = all_args
    out = f_converted(raveller.unravel(z), a, *fc)
    return raveller.ravel(out[0] if has_aux else out)

  def flat_jacobian(z, all_args):
    a, _, jc = all_args
    return jac_converted(raveller.unravel(z), a, *jc).astype(raveller.dtype)

  problem = base.Map(flat_map, None if jacobian is None else flat_jacobian)
  all_args = (args, list(f_consts), list(jac_consts))
  flat_z0 = raveller.ravel(z0)

  options = dict(budget=budget, record_steps=record_steps)
  if batch == 0:
    sol = loop.empty_solution(flat_z0, solver)
    if record_steps:
      sol = sol._replace(states=(flat_z0,) * len(record_steps))
  elif probe is not None:
    sol = adjoint.solve_with_probe(problem, flat_z0, all_args, solver, probe,
                                   **options)
  else:
    sol = adjoint.solve(problem, flat_z0, all_args, solver, **options)
  value = raveller.unravel(sol.value)
  aux = f_converted(value, args, *f_consts)[1] if has_aux else None
  states = None
  if record_steps:
    states = tuple(
        raveller.unravel(s if batch == 0 else adjoint.at_state(
            problem, jax.lax.stop_gradient(s), all_args, solver))
        for s in sol.states)
  if not batched:
    unbatch = lambda tree_: jax.tree.map(lambda x: x[0], tree_)
    stats = sol.stats
    stats = stats._replace(
        residual=stats.residual[0], converged=stats.converged[0],
        trace=stats.trace[:, 0], sample_steps=stats.sample_steps[0],
        best_step=stats.best_step[0])
    return solution_lib.Solution(
        unbatch(value), stats, aux,
        None if states is None else tuple(unbatch(s) for s in states))
  return solution_lib.Solution(value, sol.stats, aux, states)


def _batched_map(f, has_aux):
  """The single-sample map as a map on a batch of one."""

  def batched(z, args):
    out = f(jax.tree.map(lambda x: x[0], z), args)
    if has_aux:
      if not (isinstance(out, tuple) and len(out) == 2):
        return out  # _check_output names the problem
      return jax.tree.map(lambda x: jnp.asarray(x)[None], out[0]), out[1]
    return jax.tree.map(lambda x: jnp.asarray(x)[None], out)

  return batched


def _batched_jacobian(jacobian):
  def batched(z, args):
    return jacobian(jax.tree.map(lambda x: x[0], z), args)[None]
  return batched


def _check_batch(z0) -> int:
  leaves = jax.tree_util.tree_flatten_with_path(z0)[0]
  for path, leaf in leaves:
    if leaf.ndim == 0:
      raise ValueError(
          f"fixed_point: z0{jax.tree_util.keystr(path)} is a scalar but"
          " batched=True expects a leading batch axis on every leaf; pass"
          " batched=False for a single unbatched state")
  sizes = {int(leaf.shape[0]) for _, leaf in leaves}
  if len(sizes) > 1:
    shapes = ", ".join(f"z0{jax.tree_util.keystr(p)}: {x.shape}"
                       for p, x in leaves)
    raise ValueError(
        "fixed_point: every leaf of a batched z0 needs the same leading"
        f" (batch) axis, got {shapes}")
  return sizes.pop()


def _check_output(f, z0, args, has_aux, batched) -> None:
  skip = 0 if batched else 1
  try:
    out = jax.eval_shape(f, z0, args)
  except (TypeError, ValueError, IndexError) as error:
    raise ValueError(
        f"fixed_point: f(z0, args) fails for z0 {tree.describe(z0)}; check"
        f" z0's shape against what f expects ({type(error).__name__}:"
        f" {error})") from error
  if has_aux:
    if not (isinstance(out, tuple) and len(out) == 2):
      raise ValueError(
          "fixed_point: with has_aux=True, f(z, args) must return a pair"
          f" (z_next, aux), got {type(out).__name__}")
    out = out[0]
  want = jax.tree.structure(z0)
  got = jax.tree.structure(out)
  if want != got:
    raise ValueError(
        "fixed_point: f(z, args) must return a state with z's structure;"
        f" z is {want}, f(z, args) returned {got}")
  for (path, z), o in zip(jax.tree_util.tree_flatten_with_path(z0)[0],
                          jax.tree.leaves(out)):
    name = f"z{jax.tree_util.keystr(path)}"
    if o.shape != z.shape:
      raise ValueError(
          "fixed_point: f(z, args) must return arrays shaped like z;"
          f" {name} has shape {z.shape[skip:]}, f(z, args) returned"
          f" {o.shape[skip:]}")
    if o.dtype != z.dtype:
      raise ValueError(
          f"fixed_point: f(z, args) returned dtype {o.dtype} for {name} of"
          f" dtype {z.dtype}; make f keep the state's dtype (check the dtypes"
          " of args)")


def _check_tolerance(solver, z0) -> None:
  """A tolerance the state's dtype cannot resolve never converges."""
  dtypes = {jnp.dtype(x.dtype) for x in jax.tree.leaves(z0)}
  eps = max(float(jnp.finfo(d).eps) for d in dtypes)
  coarsest = max(dtypes, key=lambda d: float(jnp.finfo(d).eps))
  if solver.tol >= eps:
    return
  message = (
      f"fixed_point: tol={solver.tol:g} is below the resolution of the"
      f" {coarsest} state (eps {eps:.3g}); the residual cannot get there."
      f" Use tol >= {eps:.3g}, or a wider dtype")
  if coarsest in tree.HALF_DTYPES:
    raise ValueError(message)
  if solver.relative:
    warnings.warn(message, stacklevel=4)
