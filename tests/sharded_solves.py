"""Solves and derivatives on two host devices, against one device.

Run by tests/test_sharding.py in a subprocess whose environment sets
`XLA_FLAGS=--xla_force_host_platform_device_count=2` (the device count is
fixed when jax starts): prints one JSON object, for each case the largest
difference from the single-device result, in float64.
"""

import json

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import jaxdeq


def cell(z, args):
  w, x = args
  return jnp.tanh(z @ w + x)


CASES = {
    "fixed_point_iteration/implicit": (
        jaxdeq.FixedPointIteration(tol=1e-10, max_steps=200),
        jaxdeq.ImplicitAdjoint()),
    "anderson/implicit_gmres": (
        jaxdeq.Anderson(tol=1e-10, max_steps=100),
        jaxdeq.ImplicitAdjoint(linear_solver=jaxdeq.GMRES(tol=1e-10))),
    "anderson/unrolled": (jaxdeq.Anderson(tol=1e-10, max_steps=100),
                          jaxdeq.UnrolledAdjoint()),
    # SHINE's estimate of a sample depends on the steps the batch took after
    # the sample was done (one more Broyden update), so the estimate is
    # always refined here, and the refined gradient compared.
    "broyden/shine": (jaxdeq.Broyden(tol=1e-10, max_steps=100),
                      jaxdeq.SHINEAdjoint(fallback_tol=1e-30)),
    "newton/phantom": (jaxdeq.Newton(tol=1e-10), jaxdeq.PhantomAdjoint()),
    "newton_gmres/neumann": (
        jaxdeq.Newton(tol=1e-10, linear_solver=jaxdeq.GMRES(
            tol=1e-8, max_restarts=0)),
        jaxdeq.NeumannAdjoint()),
}


def differences(solver, adjoint, forward_mode):
  w0 = 0.3 * jax.random.normal(jax.random.key(0), (3, 3), jnp.float64)
  x0 = jax.random.normal(jax.random.key(1), (4, 3), jnp.float64)

  def value(w, x):
    return jaxdeq.fixed_point(cell, jnp.zeros_like(x), (w, x), solver=solver,
                              adjoint=adjoint).value

  def loss(w, x):
    return jnp.sum(value(w, x) ** 2)

  def gradients(w, x):
    return jax.grad(loss, argnums=(0, 1))(w, x)

  def tangent(w, x):
    return jax.jvp(value, (w, x), (jnp.ones_like(w), jnp.ones_like(x)))[1]

  mesh = jax.make_mesh((2,), ("b",),
                       axis_types=(jax.sharding.AxisType.Auto,))

  def sharded(fn, out_specs):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P(), P("b")),
                                 out_specs=out_specs))

  pairs = [(sharded(value, P("b"))(w0, x0), value(w0, x0)),
           (sharded(gradients, (P(), P("b")))(w0, x0), gradients(w0, x0))]
  if forward_mode:
    pairs.append((sharded(tangent, P("b"))(w0, x0), tangent(w0, x0)))
  # A mesh with explicit sharding, the batch sharded, no shard_map.
  explicit = jax.make_mesh((2,), ("b",),
                           axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(explicit):
    w = jax.sharding.reshard(w0, P())
    x = jax.sharding.reshard(x0, P("b"))
    pairs.append((jax.jit(gradients)(w, x), gradients(w0, x0)))
  return max(
      float(jnp.max(jnp.abs(a - b)))
      for got, want in pairs
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))


def main():
  assert jax.device_count() == 2, jax.devices()
  jax.config.update("jax_enable_x64", True)
  jax.config.update("jax_numpy_rank_promotion", "raise")
  jax.config.update("jax_numpy_dtype_promotion", "strict")
  out = {}
  for name, (solver, adjoint) in CASES.items():
    forward_mode = isinstance(adjoint, jaxdeq.ImplicitAdjoint)
    out[name] = differences(solver, adjoint, forward_mode)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
