"""Plain (optionally damped) fixed-point iteration."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax

from jaxdeq._src.solvers import base


class FixedPointIterationState(NamedTuple):
  """Plain iteration keeps no state."""


@dataclasses.dataclass(frozen=True)
class FixedPointIteration(base.FixedPointSolver):
  """Damped fixed-point iteration z <- (1 - damping) z + damping f(z).

  Attributes:
    tol: residual tolerance per sample.
    max_steps: most steps.
    damping: step size in (0, 1]; 1 is plain iteration.

  Examples:
    >>> import jax.numpy as jnp, jaxdeq
    >>> sol = jaxdeq.fixed_point(lambda z, a: jnp.cos(z), jnp.zeros(1), None,
    ...                          solver=jaxdeq.FixedPointIteration(tol=1e-6,
    ...                                                            max_steps=200))
    >>> round(float(sol.value[0]), 4)
    0.7391
  """

  damping: float = 1.0

  def __post_init__(self):
    super().__post_init__()
    base.check_number(self, "damping", positive=True)
    if self.damping > 1:
      raise ValueError(
          f"FixedPointIteration: damping must be in (0, 1], got {self.damping}")

  def init(self, f, z, fz, args) -> FixedPointIterationState:
    return FixedPointIterationState()

  def step(self, f, z, fz, args, state, step_index
           ) -> tuple[jax.Array, FixedPointIterationState]:
    if self.damping == 1.0:
      return fz, state
    return z + self.damping * (fz - z), state
