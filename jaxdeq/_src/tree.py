"""Pytree helpers: differentiable leaves, per-sample raveling of states."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def is_differentiable(x: Any) -> bool:
  """Whether a leaf carries a gradient (a floating or complex array)."""
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


class LeafSplit(NamedTuple):
  """Which leaves of a pytree are differentiable, to split and merge them.

  The one mechanism for separating what autodiff may see (floating leaves)
  from the rest (integer counters, flags): used for `args`, for solver
  states in the unrolled replay and for cotangents.

  Attributes:
    treedef: the tree's structure.
    mask: per leaf, whether it is differentiable.
  """

  treedef: Any
  mask: tuple

  @classmethod
  def of(cls, tree: Any) -> "LeafSplit":
    leaves, treedef = jax.tree.flatten(tree)
    return cls(treedef, tuple(is_differentiable(x) for x in leaves))

  def split(self, tree: Any) -> tuple[list, list]:
    """(differentiable leaves, other leaves) of a tree of this structure."""
    leaves = jax.tree.leaves(tree)
    return ([x for x, m in zip(leaves, self.mask) if m],
            [x for x, m in zip(leaves, self.mask) if not m])

  def merge(self, diff: list, nondiff: list) -> Any:
    """The tree with these differentiable and other leaves."""
    diff, nondiff = iter(diff), iter(nondiff)
    return jax.tree.unflatten(self.treedef, [
        next(diff) if m else next(nondiff) for m in self.mask])


def split_differentiable(tree: Any) -> tuple[list, Callable[[list], Any]]:
  """The differentiable leaves of `tree` and a function that puts them back.

  Examples:
    >>> import jax.numpy as jnp
    >>> diff, rebuild = split_differentiable((jnp.ones(2), 3, None))
    >>> len(diff), rebuild([jnp.zeros(2)])[1]
    (1, 3)
  """
  split = LeafSplit.of(tree)
  diff, nondiff = split.split(tree)
  return diff, lambda new_diff: split.merge(new_diff, nondiff)


def fill_nondifferentiable(tree: Any, diff_cotangents: list) -> Any:
  """A cotangent for `tree`: the given floats, float0 zeros elsewhere."""
  split = LeafSplit.of(tree)
  return split.merge(diff_cotangents,
                     [zero_tangent(x) for x in split.split(tree)[1]])


def zero_tangent(x: Any) -> Any:
  """A zero tangent for one leaf (float0 for integer and bool leaves)."""
  if is_differentiable(x):
    return jnp.zeros_like(x)
  return np.zeros(np.shape(x), jax.dtypes.float0)


def finite_or_zero(tree: Any) -> Any:
  """Non-finite floats set to zero (identity on finite values)."""
  return jax.tree.map(
      lambda x: _finite_or_zero(x) if is_differentiable(x) else x, tree)


@jax.custom_jvp
def _finite_or_zero(x: jax.Array) -> jax.Array:
  return jax.lax.select(jnp.isfinite(x), x, jnp.zeros_like(x))


@_finite_or_zero.defjvp
def _finite_or_zero_jvp(primals, tangents):
  # The tangent passes through: on finite values the map is the identity,
  # and a non-finite value has no derivative to keep. Every caller gives
  # such a sample a zero cotangent (it is done, frozen or masked out), and
  # masking the tangent as well would make a linearisation store the mask:
  # a row per step on UnrolledAdjoint's tape.
  (x,), (t,) = primals, tangents
  return jax.lax.select(jnp.isfinite(x), x, jnp.zeros_like(x)), t


HALF_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def compute_dtype(dtypes: list) -> jnp.dtype:
  """The dtype solvers work in for states of these leaf dtypes.

  The widest leaf precision, and at least float32: least-squares weights, LU
  factors and norms of half-precision states are computed in float32 (LAPACK
  has no bfloat16, and bfloat16 sums of squares lose the residual). Complex
  when any leaf is complex (complex128 for float64 beside complex64).
  """
  dtypes = [jnp.dtype(d) for d in dtypes]
  bits = max(max(jnp.finfo(d).bits for d in dtypes), 32)
  if any(jnp.issubdtype(d, jnp.complexfloating) for d in dtypes):
    return jnp.dtype(f"complex{2 * bits}")
  return jnp.dtype(f"float{bits}")


class Raveller(NamedTuple):
  """Per-sample raveling of a batched state pytree into (batch, d) vectors.

  Every leaf's leading axis is the batch; a sample's leaves are flattened
  and concatenated in leaf order, cast to `dtype`. `unravel` restores each
  leaf's own shape and dtype, so mixed-dtype states keep their dtypes.

  Attributes:
    treedef: structure of the state.
    shapes: per-sample shape of each leaf.
    dtypes: dtype of each leaf.
    dtype: dtype of the raveled vector (`compute_dtype` of the leaves).
  """

  treedef: Any
  shapes: tuple
  dtypes: tuple
  dtype: Any

  @classmethod
  def of(cls, tree: Any) -> "Raveller":
    leaves, treedef = jax.tree.flatten(tree)
    return cls(treedef, tuple(x.shape[1:] for x in leaves),
               tuple(jnp.dtype(x.dtype) for x in leaves),
               compute_dtype([x.dtype for x in leaves]))

  @property
  def size(self) -> int:
    """Length d of a sample's raveled state."""
    return sum(int(np.prod(s)) for s in self.shapes)

  def ravel(self, tree: Any) -> jax.Array:
    """(batch, d) vector of a batched state (a reshape for one leaf)."""
    leaves = jax.tree.leaves(tree)
    flat = [x.reshape(x.shape[0], int(np.prod(x.shape[1:]))).astype(self.dtype)
            for x in leaves]
    return flat[0] if len(flat) == 1 else jnp.concatenate(flat, axis=1)

  def unravel(self, flat: jax.Array) -> Any:
    """The batched state of a (batch, d) vector."""
    batch = flat.shape[0]
    leaves, start = [], 0
    for shape, dtype in zip(self.shapes, self.dtypes):
      size = int(np.prod(shape))
      part = flat if len(self.shapes) == 1 else flat[:, start:start + size]
      part = part.reshape((batch,) + shape)
      if not jnp.issubdtype(dtype, jnp.complexfloating):
        part = jnp.real(part)  # a real leaf of a complex state stays real
      leaves.append(part.astype(dtype))
      start += size
    return jax.tree.unflatten(self.treedef, leaves)


def describe(tree: Any) -> str:
  """Shapes and dtypes of a pytree's leaves, for error messages:
  `float32[4,8]` for one array, `(float32[4,8], int32[4])` for a tuple."""

  def leaf(x):
    try:
      return jax.typeof(x).str_short()
    except TypeError:
      return repr(x)

  leaves, treedef = jax.tree.flatten(tree)
  if treedef == jax.tree.structure(0):
    return leaf(leaves[0])
  return str(jax.tree.unflatten(treedef, [_Shown(leaf(x)) for x in leaves]))


class _Shown(str):
  """A string that prints without quotes inside a container's repr."""

  def __repr__(self) -> str:
    return str(self)
