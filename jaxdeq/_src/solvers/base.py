"""The interface every fixed-point solver implements."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp



@dataclasses.dataclass(frozen=True)
class Map:
  """The map a solver iterates, z -> f(z, args) on (batch, d) states.

  Attributes:
    fn: (z, args) -> f(z, args).
    residual_jacobian: optional closed form (z, args) -> (batch, d, d) of the
      Jacobian of g(z) = z - f(z, args); solvers that can use it (Newton)
      do, the others ignore it.
  """

  fn: Callable[[jax.Array, Any], jax.Array]
  residual_jacobian: Optional[Callable[[jax.Array, Any], jax.Array]] = None

  def __call__(self, z: jax.Array, args: Any) -> jax.Array:
    return self.fn(z, args)


def per_sample(mask: jax.Array, like: jax.Array) -> jax.Array:
  """Broadcasts a (batch,) mask against a (batch, ...) array."""
  return mask.reshape(mask.shape + (1,) * (like.ndim - 1))


@dataclasses.dataclass(frozen=True)
class FixedPointSolver:
  """Configuration shared by all solvers; subclasses add `init` and `step`.

  A solver holds configuration only. The loop driver (`jaxdeq._src.loop`)
  evaluates the map once per step and hands each solver the current iterate
  `z` together with `fz = f(z, args)`, so that stopping, freezing of converged
  samples, the best-iterate rule and the residual trace are the same for every
  solver and no solver pays for an extra evaluation of `f`. Solvers see each
  sample's state raveled: `z` is (batch, d), whatever pytree the user's state
  is, in at least float32.

  Attributes:
    tol: residual tolerance per sample (> 0).
    max_steps: most solver steps (>= 1).
    relative: residual ||f(z) - z|| / (||f(z)|| + eps) when True (the default),
      the absolute ||f(z) - z|| when False.
    eps: guards the relative residual against ||f(z)|| = 0.
    stop_active: end the solve once at most this many samples are still
      iterating (0, the default: once all are done). `DEQ(compact=True)`
      sets it for the phases after which it moves the remaining samples
      into a smaller batch.
  """

  tol: float = 1e-4
  max_steps: int = 50
  relative: bool = dataclasses.field(default=True, kw_only=True)
  eps: float = dataclasses.field(default=1e-5, kw_only=True)
  stop_active: int = dataclasses.field(default=0, kw_only=True, repr=False)

  def __post_init__(self):
    check_number(self, "tol", positive=True, finite=True)
    check_int(self, "max_steps", minimum=1)
    check_number(self, "eps", positive=False)
    check_int(self, "stop_active", minimum=0)
    if not isinstance(self.relative, bool):
      raise TypeError(
          f"{type(self).__name__}: relative must be a bool, got"
          f" {self.relative!r}")

  def init(self, f: Map, z: jax.Array, fz: jax.Array, args: Any) -> Any:
    """Returns the solver's state before the first step."""
    raise NotImplementedError

  def step(self, f: Map, z: jax.Array, fz: jax.Array, args: Any, state: Any,
           step_index: jax.Array) -> tuple[jax.Array, Any]:
    """Returns the next iterate and state from `z` and `fz = f(z, args)`.

    Args:
      f: the map, (batch, d) -> (batch, d); it may offer
        `residual_jacobian(z, args)`, the (batch, d, d) Jacobian of
        g(z) = z - f(z, args).
      z: (batch, d) current iterate.
      fz: f(z, args).
      args: the map's arguments.
      state: the solver's state.
      step_index: () int32, the number of steps taken before this one.
    """
    raise NotImplementedError


def check_number(obj, name: str, positive: bool, finite: bool = False) -> None:
  """Checks a real-valued setting; `finite` refuses inf (NaN always fails)."""
  value = getattr(obj, name)
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(
        f"{type(obj).__name__}: {name} must be a real number, got {value!r}")
  if finite and not math.isfinite(value):
    raise ValueError(
        f"{type(obj).__name__}: {name} must be finite, got {value!r} (an"
        " infinite tolerance reports every sample converged before a step)")
  if positive and not value > 0:
    raise ValueError(f"{type(obj).__name__}: {name} must be > 0, got {value!r}")
  if not positive and not value >= 0:
    raise ValueError(
        f"{type(obj).__name__}: {name} must be >= 0, got {value!r}")


def check_int(obj, name: str, minimum: int) -> None:
  value = getattr(obj, name)
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(
        f"{type(obj).__name__}: {name} must be an integer, got {value!r}")
  if value < minimum:
    raise ValueError(
        f"{type(obj).__name__}: {name} must be >= {minimum}, got {value!r}")

