"""`fixed_point`: the entry point that checks input and picks the adjoint."""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from jaxdeq._src import adjoint as adjoint_lib
from jaxdeq._src import solution as solution_lib
from jaxdeq._src.solvers import anderson
from jaxdeq._src.solvers import base


def fixed_point(
    f: Callable[[jax.Array, Any], jax.Array],
    z0: jax.Array,
    args: Any = None,
    *,
    solver: Optional[base.FixedPointSolver] = None,
    adjoint: Optional[adjoint_lib.AbstractAdjoint] = None,
    throw: bool = False,
    batched: bool = True,
    backward_probe: Optional[jax.Array] = None,
) -> solution_lib.Solution:
  """Finds z* = f(z*, args), differentiable with respect to `args`.

  The solve runs outside autodiff; `adjoint` says how gradients are formed.
  `f` must get every array it depends on through `args` (any pytree): arrays
  it closes over are treated as constants by the adjoints.

  Args:
    f: the map `f(z, args) -> z_next`, same shape and dtype as `z`. With
      `batched=True` samples along the leading axis must be independent.
    z0: initial iterate, a floating array; its leading axis is the batch.
    args: the map's differentiable arguments (parameters, injected input).
    solver: a jaxdeq solver; default `Anderson()`.
    adjoint: `ImplicitAdjoint()` (default), `UnrolledAdjoint()` or
      `PhantomAdjoint()`.
    throw: raise `FixedPointError` if the forward (or, for the implicit
      adjoint, the backward) solve fails; under `jit` the error is raised
      when the computation runs.
    batched: treat `z0` as one sample when False (stats then have no batch
      axis).
    backward_probe: optional `backward_probe()`; the gradient with respect to
      it carries the implicit backward's `BackwardStats`.

  Returns:
    A `Solution`: `value` (the best iterate found) and `stats`.

  Raises:
    TypeError: `z0` is not floating, or a bad solver / adjoint is given.
    ValueError: `f(z0, args)` differs from `z0` in shape or dtype, or a
      batched `z0` is a scalar.
    FixedPointError: with `throw=True`, on failure.

  Example:
    >>> import jax.numpy as jnp, jaxdeq
    >>> sol = jaxdeq.fixed_point(lambda z, a: jnp.cos(z), jnp.zeros(()), None,
    ...                          solver=jaxdeq.Anderson(tol=1e-6),
    ...                          batched=False)
    >>> round(float(sol.value), 4), bool(sol.stats.converged)
    (0.7391, True)
  """
  solver = anderson.Anderson() if solver is None else solver
  adjoint = adjoint_lib.ImplicitAdjoint() if adjoint is None else adjoint
  if not isinstance(solver, base.FixedPointSolver):
    raise TypeError(
        "fixed_point: solver must be a jaxdeq solver (FixedPointIteration,"
        f" Anderson, Broyden, Newton), got {solver!r}")
  if not isinstance(adjoint, adjoint_lib.AbstractAdjoint):
    raise TypeError(
        "fixed_point: adjoint must be ImplicitAdjoint(), UnrolledAdjoint() or"
        f" PhantomAdjoint(), got {adjoint!r}")
  if not callable(f):
    raise TypeError(f"fixed_point: f must be callable, got {f!r}")
  z0 = jnp.asarray(z0)
  if not jnp.issubdtype(z0.dtype, jnp.inexact):
    raise TypeError(
        f"fixed_point: z0 must be a floating array, got dtype {z0.dtype};"
        " cast it, e.g. z0.astype(jnp.float32)")
  if batched and z0.ndim == 0:
    raise ValueError(
        "fixed_point: z0 is a scalar but batched=True expects a leading batch"
        " axis; pass batched=False for a single unbatched state")
  if backward_probe is not None and jnp.shape(backward_probe) != (3,):
    raise ValueError(
        "fixed_point: backward_probe must be jaxdeq.backward_probe(), shape"
        f" (3,), got shape {jnp.shape(backward_probe)}")

  if not batched:
    inner = f
    f = lambda z, a: inner(z[0], a)[None]
    z0 = z0[None]

  out = jax.eval_shape(f, z0, args)
  if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != z0.shape:
    got = (out.shape[int(not batched):] if isinstance(out, jax.ShapeDtypeStruct)
           else type(out).__name__)
    raise ValueError(
        "fixed_point: f(z, args) must return an array shaped like z; z has"
        f" shape {z0.shape[int(not batched):]}, f(z, args) returned {got}")
  if out.dtype != z0.dtype:
    raise ValueError(
        f"fixed_point: f(z, args) returned dtype {out.dtype} for z of dtype"
        f" {z0.dtype}; make f keep the state's dtype (check the dtypes of"
        " args)")

  sol = adjoint.solve(f, z0, args, solver, backward_probe, throw)
  if throw:
    solution_lib.raise_if_failed(sol.stats.status, sol.stats.residual,
                                 solver.tol, "forward")
  if not batched:
    stats = sol.stats
    sol = solution_lib.Solution(
        sol.value[0],
        stats._replace(residual=stats.residual[0],
                       converged=stats.converged[0],
                       trace=stats.trace[:, 0],
                       sample_steps=stats.sample_steps[0],
                       best_step=stats.best_step[0]))
  return sol
