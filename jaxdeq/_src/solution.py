"""Result codes, solver statistics and the `Solution` a solve returns."""

from __future__ import annotations

import enum
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Status(enum.IntEnum):
  """Outcome of a solve, stored as an int32 in `SolverStats.status`.

  The codes are ordered by severity: a batch reports the worst code of its
  samples.
  """

  SUCCESSFUL = 0
  MAX_STEPS_REACHED = 1
  NONFINITE = 2

  @property
  def message(self) -> str:
    return _MESSAGES[self]


_MESSAGES = {
    Status.SUCCESSFUL: "every sample reached the tolerance",
    Status.MAX_STEPS_REACHED: (
        "max_steps was reached before every sample reached the tolerance; the"
        " value returned for those samples is the best iterate seen (raise"
        " max_steps, loosen tol, or try another solver)"
    ),
    Status.NONFINITE: (
        "the map produced a non-finite value (NaN or inf) for some samples; the"
        " value returned for those samples is the last finite best iterate and"
        " is flagged as not converged"
    ),
}


class SolverStats(NamedTuple):
  """Diagnostics of one solve. All fields are arrays, usable under `jax.jit`.

  Attributes:
    num_steps: () int32, solver steps taken by the loop (the slowest sample).
    residual: (batch,) residual of the returned value of each sample.
    converged: (batch,) bool, whether each sample met the tolerance.
    trace: (min(max_steps, 1024), batch) residual after each of the first
      steps, NaN past the last one (steps beyond 1024 are not traced, so a
      huge `max_steps` costs no memory).
    status: () int32, a `Status` code: the worst over the batch.
    sample_steps: (batch,) int32, steps each sample took before it was frozen.
    best_step: (batch,) int32, the step after which the returned value was
      the iterate (0: the initial guess).
  """

  num_steps: jax.Array
  residual: jax.Array
  converged: jax.Array
  trace: jax.Array
  status: jax.Array
  sample_steps: jax.Array
  best_step: jax.Array


class Solution(NamedTuple):
  """What `jaxdeq.fixed_point` returns.

  Attributes:
    value: the fixed point z*, same structure, shapes and dtypes as `z0`.
    stats: a `SolverStats` of the forward solve.
    aux: with `has_aux=True`, f's auxiliary output at `value`; else None.
    states: with `fixed_point(..., record_steps=ks)`, one state per k in
      `ks`: the iterate after min(k, steps the sample took) steps, each
      differentiable through the adjoint's rule applied at it (fixed-point
      correction); else None.
  """

  value: Any
  stats: SolverStats
  aux: Any = None
  states: Any = None


class FixedPointError(RuntimeError):
  """Raised by `fixed_point(..., throw=True)` when a solve fails.

  Called outside `jax.jit`, `fixed_point` raises it directly. Inside a
  jitted function the failure is found when the computation runs and JAX
  raises `jax.errors.JaxRuntimeError` around it; `jaxdeq.catch_failures`
  turns that back into a `FixedPointError` whose message starts with the
  failure.
  """


def failure_message(status: int, residual: Any, tol: float, where: str) -> str:
  """Readable text for a failed solve, naming the worst samples."""
  status = Status(int(status))
  residual = np.asarray(residual).reshape(-1)
  finite = np.isfinite(residual)
  lines = [f"jaxdeq: the {where} solve failed: {status.message}."]
  bad = np.flatnonzero(~(residual <= tol))
  if bad.size:
    shown = ", ".join(
        f"{i}: {residual[i]:.3g}" for i in bad[:8]
    ) + (" ..." if bad.size > 8 else "")
    lines.append(
        f"{bad.size} of {residual.size} samples above tol={tol:g}"
        f" (sample: residual) {shown}."
    )
  if not finite.all():
    lines.append(f"{int((~finite).sum())} samples have non-finite residuals.")
  return " ".join(lines)


def raise_if_failed(status: jax.Array, residual: jax.Array, tol: float,
                    where: str) -> None:
  """Raises `FixedPointError` when `status` is not SUCCESSFUL.

  Concrete values are checked at once; traced ones through a host callback, so
  the error surfaces when the jitted computation runs.
  """

  traced = isinstance(status, jax.core.Tracer)

  def check(status, residual):
    if int(status) != Status.SUCCESSFUL:
      message = failure_message(status, residual, tol, where)
      _last_failure.append(message)
      del _last_failure[:-1]
      raise FixedPointError(message + (_JITTED_HINT if traced else ""))

  if traced:
    jax.debug.callback(check, status, residual)
  else:
    check(status, residual)


_JITTED_HINT = (
    " (Raised in a jitted computation, so JAX reports it as"
    " jax.errors.JaxRuntimeError: wrap the jitted function in"
    " jaxdeq.catch_failures to get this FixedPointError with its message"
    " first.)")

# The message of the last failure a host callback raised: JAX wraps the
# callback's exception in a JaxRuntimeError; `catch_failures` reads it back.
_last_failure: list[str] = []


def catch_failures(fn: Callable) -> Callable:
  """Wraps `fn` so that a jitted `throw=True` failure raises FixedPointError.

  Under `jax.jit` a failed solve with `throw=True` stops the computation
  from a host callback, and JAX reports it as `jax.errors.JaxRuntimeError`
  with jaxdeq's message deep inside. The wrapped function waits for its
  result and re-raises such an error as `FixedPointError` with the message
  first. Other errors pass unchanged.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdeq
    >>> @jaxdeq.catch_failures
    ... @jax.jit
    ... def solve(x):
    ...   return jaxdeq.fixed_point(lambda z, x: 2 * z + x, jnp.ones((1, 2)), x,
    ...                             solver=jaxdeq.FixedPointIteration(
    ...                                 max_steps=5), throw=True).value
    >>> try:
    ...   solve(jnp.ones((1, 2)))
    ... except jaxdeq.FixedPointError as error:
    ...   print(str(error)[:34])
    jaxdeq: the forward solve failed: 
  """

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    del _last_failure[:]
    try:
      return jax.block_until_ready(fn(*args, **kwargs))
    except jax.errors.JaxRuntimeError as error:
      if _last_failure and _last_failure[-1] in str(error):
        raise FixedPointError(_last_failure[-1]) from None
      raise

  return wrapped


def batch_status(converged: jax.Array, nonfinite: jax.Array) -> jax.Array:
  """The worst `Status` over a batch of per-sample flags."""
  not_converged = jnp.any(~converged)
  return jnp.where(
      jnp.any(nonfinite),
      Status.NONFINITE,
      jnp.where(not_converged, Status.MAX_STEPS_REACHED, Status.SUCCESSFUL),
  ).astype(jnp.int32)
