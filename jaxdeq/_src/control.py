"""`lax` control flow that also type-checks inside `jax.shard_map`.

Inside `shard_map` (with its default `check_vma=True`) every value has a
set of mesh axes along which it varies, and `while_loop`, `fori_loop` and
`cond` demand that a loop's carry (a branch's output) has the same set
before and after the body. A solver's carry mixes values made inside the
solve (a zero step counter, an empty trace: varying along no axis) with
values computed from the sharded inputs (varying along the batch axis), so
a plain `while_loop` fails there with "manual axis types do not match".

These wrappers make each carried value vary along the axes that it and the
body's output for it vary along: the axes of the inputs it is computed
from, never more (a step counter stays replicated). Outside `shard_map` they are the `lax` functions
themselves, at no cost.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax


def _manual_axes() -> tuple:
  """Mesh axes of an enclosing `shard_map` (empty outside one)."""
  try:
    return tuple(jax.sharding.get_abstract_mesh().manual_axes)
  except Exception:  # an older jax without abstract meshes
    return ()


def _varying(x: Any) -> frozenset:
  """The manual axes along which a value (or a `ShapeDtypeStruct`) varies."""
  aval = x if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x)
  for name in ("mat", "manual_axis_type"):
    axis_type = getattr(aval, name, None)
    if axis_type is not None:
      return frozenset(axis_type.varying)
  return frozenset(getattr(aval, "vma", ()))


def _axes_of(tree: Any) -> frozenset:
  axes = frozenset()
  for leaf in jax.tree.leaves(tree):
    axes |= _varying(leaf)
  return axes


def vary(tree: Any, axes: frozenset) -> Any:
  """Every leaf of `tree` made to vary along `axes` (no-op where it does)."""
  if not axes:
    return tree

  def cast(x):
    missing = tuple(sorted(axes - _varying(x), key=str))
    return jax.lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(cast, tree)


def vary_together(tree: Any) -> Any:
  """`tree` with every leaf varying along the axes any of its leaves does.

  A solve whose inputs all vary alike computes nothing that JAX must cast
  implicitly: its steps, their linearisations and the custom derivative
  rules then see one type per value, and the cast's own derivative (a
  `psum` for a replicated parameter) is taken by JAX outside the solve.
  """
  if not _manual_axes():
    return tree
  return vary(tree, _axes_of(tree))


def spec_of(x: Any) -> Optional[tuple]:
  """The explicit sharding of `x` (an array or a shape struct), per axis.

  None outside a mesh with explicit axis types, or when no axis is sharded:
  then arrays made to hold `x` need no sharding of their own.
  """
  aval = x if isinstance(x, jax.ShapeDtypeStruct) else jax.typeof(x)
  spec = getattr(getattr(aval, "sharding", None), "spec", None)
  if spec is None or not any(a is not None for a in spec):
    return None
  return tuple(spec) + (None,) * (len(aval.shape) - len(spec))


def batch_spec(x: Any) -> Optional[tuple]:
  """`spec_of` for arrays shaped like `x`'s batch axis only, (batch,)."""
  spec = spec_of(x)
  return None if spec is None or spec[0] is None else (spec[0],)


def full(shape: tuple, fill: Any, dtype: Any,
         spec: Optional[tuple] = None) -> jax.Array:
  """`jnp.full`, sharded per axis as `spec` says (None: as jax chooses).

  Under a mesh with explicit sharding, a buffer that rows of a sharded
  iterate are written into must be sharded like them: a replicated buffer
  refuses a sharded update. `spec` may name the trailing axes only.
  """
  if spec is None:
    return jax.numpy.full(shape, fill, dtype)
  spec = (None,) * (len(shape) - len(spec)) + tuple(spec)
  return jax.numpy.full(shape, fill, dtype,
                        out_sharding=jax.sharding.PartitionSpec(*spec))


def zeros_like(x: Any) -> jax.Array:
  """Zeros shaped, typed and varying like `x` (an array or a shape struct)."""
  zeros = full(x.shape, 0, x.dtype, spec_of(x))
  return vary(zeros, _varying(x)) if _manual_axes() else zeros


def sum_to_match(cotangents: Any, primals: Any) -> Any:
  """Cotangents summed over the axes their primal does not vary along.

  The transpose of making a replicated value vary is a `psum`: a custom
  backward rule whose cotangent of a replicated input (a shared parameter)
  varies along the batch axis returns its sum over that axis, as JAX's own
  derivative of the implicit cast would. `None` cotangents pass through.
  """
  if not _manual_axes():
    return cotangents

  def total(ct, primal):
    if ct is None or jax.dtypes.issubdtype(ct.dtype, jax.dtypes.float0):
      return ct
    extra = tuple(sorted(_varying(ct) - _varying(primal), key=str))
    return jax.lax.psum(ct, extra) if extra else ct

  return jax.tree.map(total, cotangents, primals, is_leaf=lambda x: x is None)


def vary_like(tangents: Any, primals: Any) -> Any:
  """Each tangent made to vary along the axes its primal does.

  For the output of a `custom_jvp` rule (with `symbolic_zeros=True`):
  integer and bool primals get symbolic zero tangents.
  """
  if not _manual_axes():
    return tangents

  def cast(t, p):
    if jax.dtypes.issubdtype(t.dtype, jax.dtypes.float0):
      # A float0 zero has no value to cast: a symbolic zero of the primal's
      # tangent type says the same with the right axes.
      return jax.custom_derivatives.SymbolicZero(
          jax.typeof(p).to_tangent_aval())
    return vary(t, _varying(p))

  return jax.tree.map(cast, tangents, primals)


def _vary_each(tree: Any, axes: list) -> Any:
  leaves, treedef = jax.tree.flatten(tree)
  return jax.tree.unflatten(
      treedef, [vary(x, a) for x, a in zip(leaves, axes)])


def _carry_axes(body: Callable[[Any], Any], init: Any) -> list:
  """Per carry leaf, the axes it must vary along for `body` to keep its type.

  Grows each leaf's set until the body's output varies along no axis its
  carry does not: each pass only adds axes, so it ends within one pass per
  mesh axis. Traces `body` abstractly, at trace time only.
  """
  axes = [_varying(x) for x in jax.tree.leaves(init)]
  while True:
    out = jax.eval_shape(body, _vary_each(init, axes))
    grown = [a | _varying(o) for a, o in zip(axes, jax.tree.leaves(out))]
    if grown == axes:
      return axes
    axes = grown


def while_loop(cond_fun: Callable[[Any], Any], body_fun: Callable[[Any], Any],
               init_val: Any) -> Any:
  """`jax.lax.while_loop`, also inside `shard_map` with checked types."""
  if not _manual_axes():
    return jax.lax.while_loop(cond_fun, body_fun, init_val)
  axes = _carry_axes(body_fun, init_val)
  return jax.lax.while_loop(cond_fun, lambda c: _vary_each(body_fun(c), axes),
                            _vary_each(init_val, axes))


def fori_loop(lower: Any, upper: Any, body_fun: Callable[[Any, Any], Any],
              init_val: Any) -> Any:
  """`jax.lax.fori_loop`, also inside `shard_map` with checked types."""
  if not _manual_axes():
    return jax.lax.fori_loop(lower, upper, body_fun, init_val)
  lower = jax.numpy.asarray(lower)
  upper = jax.numpy.asarray(upper, lower.dtype)

  def body(carry):
    i, value = carry
    return i + 1, body_fun(i, value)

  return while_loop(lambda carry: carry[0] < upper, body,
                    (lower, init_val))[1]


def cond(pred: Any, true_fun: Callable[..., Any], false_fun: Callable[..., Any],
         *operands: Any) -> Any:
  """`jax.lax.cond`, also inside `shard_map` with checked types."""
  if not _manual_axes():
    return jax.lax.cond(pred, true_fun, false_fun, *operands)
  axes = (_axes_of(operands) | _axes_of(pred)
          | _axes_of(jax.eval_shape(true_fun, *operands))
          | _axes_of(jax.eval_shape(false_fun, *operands)))
  return jax.lax.cond(pred, lambda *a: vary(true_fun(*a), axes),
                      lambda *a: vary(false_fun(*a), axes), *operands)
