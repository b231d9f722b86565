"""Diagnostics and regularisers of the Jacobian df/dz at a state.

Both work per sample on any pytree state (each sample's leaves raveled, as
`fixed_point` does), with matrix-free products only: no Jacobian is formed.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxdeq._src import control
from jaxdeq._src import tree


def _flat_map(f, z, args, batched):
  """f on (batch, d) vectors, the raveled z, and how to read them back."""
  if not batched:
    z = jax.tree.map(lambda x: jnp.asarray(x)[None], z)
    single = f
    f = lambda z, a: jax.tree.map(lambda x: x[None],
                                  single(jax.tree.map(lambda x: x[0], z), a))
  leaves = jax.tree.leaves(z)
  if not leaves:
    raise ValueError("z has no arrays (an empty pytree)")
  for x in leaves:
    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
      raise TypeError(f"z must hold floating arrays, got dtype {x.dtype}")
    if jnp.ndim(x) == 0:
      raise ValueError("batched=True expects a leading batch axis on every"
                       " leaf of z; pass batched=False for one sample")
  raveller = tree.Raveller.of(z)
  flat_f = lambda flat: raveller.ravel(f(raveller.unravel(flat), args))
  return flat_f, raveller.ravel(z)


def _check_key(key, name):
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if not (jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
          or (key.dtype == jnp.uint32 and key.shape[-1:] == (2,))):
    raise TypeError(f"{name}: key must be a jax.random.key, got dtype"
                    f" {key.dtype}")
  return key


def _check_count(value, name, what):
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name}: {what} must be a positive int, got {value!r}")


def jacobian_penalty(f: Callable[[Any, Any], Any], z: Any, args: Any,
                     key: jax.Array, *, num_probes: int = 1,
                     mode: str = "vjp", batched: bool = True) -> jax.Array:
  """Per-sample Hutchinson estimate of ||df/dz||_F^2 at `z`.

  E ||e^T J||^2 = ||J||_F^2 for Gaussian probes e (Bai et al., 2021,
  "Stabilizing equilibrium models by Jacobian regularization"). Each probe
  costs one VJP (or JVP) of `f`; the estimate is differentiable in `args`
  and `z` like any JAX function (its gradient is an ordinary
  second-order derivative, no fragile double backward). Add
  `weight * penalty.mean()` to the loss, evaluated at z* (a stopped or
  differentiable z*: both are valid choices, Bai et al. use the latter).

  Args:
    f: the map `f(z, args)`, as given to `fixed_point`.
    z: the state (any pytree, batch leading with `batched=True`).
    args: the map's arguments.
    key: `jax.random.key` for the probes.
    num_probes: probes averaged (>= 1).
    mode: "vjp" (default; works for maps with `custom_vjp` parts) or "jvp".
    batched: False for a single unbatched state (returns a scalar).

  Returns:
    (batch,) estimates (a scalar with `batched=False`), in z's compute
    dtype.

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdeq
    >>> a = 0.5 * jnp.eye(3)
    >>> p = jaxdeq.jacobian_penalty(lambda z, _: z @ a, jnp.ones((2, 3)),
    ...                             None, jax.random.key(0), num_probes=4000)
    >>> bool(jnp.allclose(p, 0.75, rtol=0.1))  # ||A||_F^2 = 3 * 0.25
    True
  """
  key = _check_key(key, "jacobian_penalty")
  _check_count(num_probes, "jacobian_penalty", "num_probes")
  if mode not in ("vjp", "jvp"):
    raise ValueError(f"jacobian_penalty: mode must be 'vjp' or 'jvp', got"
                     f" {mode!r}")
  flat_f, flat_z = _flat_map(f, z, args, batched)
  probes = jax.random.normal(key, (num_probes,) + flat_z.shape, flat_z.dtype)
  if mode == "vjp":
    _, pullback = jax.vjp(flat_f, flat_z)
    products = jax.vmap(lambda e: pullback(e)[0])(probes)
  else:
    _, push = jax.linearize(flat_f, flat_z)
    products = jax.vmap(push)(probes)
  estimate = jnp.mean(jnp.sum(products * products, axis=2), axis=0)
  return estimate if batched else estimate[0]


def spectral_radius(f: Callable[[Any, Any], Any], z: Any, args: Any,
                    key: jax.Array, *, num_iters: int = 20,
                    batched: bool = True) -> jax.Array:
  """Per-sample power-iteration estimate of rho(df/dz) at `z`.

  A contracting DEQ has rho < 1 at its fixed point; a value creeping up to
  1 during training is why forward steps grow. Power iteration on J^T
  (one VJP per iteration, after one linearisation; J^T has J's
  eigenvalues) from a random start: exact for a dominant real eigenvalue,
  an estimate between |lambda_2| and |lambda_1| when the top eigenvalues
  are close or complex. A diagnostic: no gradient flows through it.

  Args:
    f: the map `f(z, args)`.
    z: the state (any pytree, batch leading with `batched=True`).
    args: the map's arguments.
    key: `jax.random.key` for the start vector.
    num_iters: power iterations (>= 1).
    batched: False for a single unbatched state (returns a scalar).

  Returns:
    (batch,) estimates (a scalar with `batched=False`).

  Examples:
    >>> import jax, jax.numpy as jnp, jaxdeq
    >>> a = jnp.array([[0.9, 0.0], [0.0, -0.2]])
    >>> rho = jaxdeq.spectral_radius(lambda z, _: z @ a, jnp.ones((1, 2)),
    ...                              None, jax.random.key(0))
    >>> round(float(rho[0]), 3)
    0.9
  """
  key = _check_key(key, "spectral_radius")
  _check_count(num_iters, "spectral_radius", "num_iters")
  z, args = jax.lax.stop_gradient((z, args))
  flat_f, flat_z = _flat_map(f, z, args, batched)
  _, pullback = jax.vjp(flat_f, flat_z)
  apply = lambda v: pullback(v)[0]

  def normalize(v):
    norm = jnp.linalg.norm(v, axis=1, keepdims=True)
    return v / jnp.where(norm > 0, norm, 1), norm[:, 0]

  def power_step(_, carry):
    v, _ = carry
    return normalize(apply(v))

  v, _ = normalize(jax.random.normal(key, flat_z.shape, flat_z.dtype))
  _, norm = control.fori_loop(0, num_iters, power_step,
                              (v, jnp.zeros(flat_z.shape[:1], flat_z.dtype)))
  return norm if batched else norm[0]
