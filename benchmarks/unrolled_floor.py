"""How close the unrolled fixed_point layer is to a hand-written loop's cost.

python -m benchmarks.unrolled_floor [--steps 30] [--repeats 50] [--record]

Forward + backward of the tutorial's tanh fixed point (batch 100, width 100,
float32, plain iteration for exactly `--steps` steps, cotangent of ones), three
ways, each jitted:

- `matmul`: a `while_loop` of `--steps` (100x100) @ (100x100) products, the
  unit of work (the solve needs three per step: forward, and two in the
  backward);
- `hand-written, per-step parameter gradient`: a forward `while_loop` that
  stores each iterate and a reverse loop doing one product for the iterate's
  cotangent and one for the kernel's gradient per step -- nothing else;
- `hand-written, folded parameter gradient`: the same, but the kernel's
  gradient is one (steps*100 x 100)^T (steps*100 x 100) product after the loop;
- `jaxdeq.fixed_point(FixedPointIteration, UnrolledAdjoint())` with the
  tolerance set so that it never stops early (the driver's per-sample
  residuals, freezing, best iterate and trace included).

The hand-written loops are the floor a general library can approach: the
difference is the driver's per-step bookkeeping.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jaxdeq
from benchmarks import _results

BATCH = WIDTH = 100


def _problem():
  keys = jax.random.split(jax.random.key(0), 2)
  w = 0.06 * jax.random.normal(keys[0], (WIDTH, WIDTH), jnp.float32)
  x = jax.random.normal(keys[1], (BATCH, WIDTH), jnp.float32)
  return w, x


def _forward(w, x, steps):
  """Iterates z_1 .. z_steps, stored after a zero row for z_0."""

  def body(carry):
    i, z, trajectory = carry
    z = jnp.tanh(z @ w + x)
    return (i + 1, z,
            jax.lax.dynamic_update_index_in_dim(trajectory, z, i + 1, 0))

  trajectory = jnp.zeros((steps + 1, BATCH, WIDTH), jnp.float32)
  return jax.lax.while_loop(lambda c: c[0] < steps, body,
                            (0, jnp.zeros_like(x), trajectory))[2]


def matmuls(w, x, steps):
  """`steps` products z <- z W, nothing else."""
  return jax.lax.fori_loop(0, steps, lambda i, z: z @ w, x)


def hand_written_per_step(w, x, steps):
  trajectory = _forward(w, x, steps)
  w_t = w.T

  def body(carry):
    i, u, grad_w, grad_x = carry
    z = jax.lax.dynamic_index_in_dim(trajectory, i + 1, 0, False)
    previous = jax.lax.dynamic_index_in_dim(trajectory, i, 0, False)
    delta = u * (1 - z * z)
    return i - 1, delta @ w_t, grad_w + previous.T @ delta, grad_x + delta

  _, _, grad_w, grad_x = jax.lax.while_loop(
      lambda c: c[0] >= 0, body,
      (steps - 1, jnp.ones_like(x), jnp.zeros_like(w), jnp.zeros_like(x)))
  return grad_w, grad_x


def hand_written_folded(w, x, steps):
  trajectory = _forward(w, x, steps)
  w_t = w.T

  def body(carry):
    i, u, deltas = carry
    z = jax.lax.dynamic_index_in_dim(trajectory, i + 1, 0, False)
    delta = u * (1 - z * z)
    return (i - 1, delta @ w_t,
            jax.lax.dynamic_update_index_in_dim(deltas, delta, i, 0))

  deltas = jnp.zeros((steps, BATCH, WIDTH), jnp.float32)
  _, _, deltas = jax.lax.while_loop(lambda c: c[0] >= 0, body,
                                    (steps - 1, jnp.ones_like(x), deltas))
  grad_w = jnp.einsum("sbi,sbj->ij", trajectory[:-1], deltas)
  return grad_w, deltas.sum(axis=0)


def jaxdeq_unrolled(w, x, steps):
  solver = jaxdeq.FixedPointIteration(tol=1e-30, max_steps=steps)

  def total(w, x):
    return jaxdeq.fixed_point(lambda z, a: jnp.tanh(z @ a[0] + a[1]),
                              jnp.zeros_like(x), (w, x), solver=solver,
                              adjoint=jaxdeq.UnrolledAdjoint()).value.sum()

  return jax.grad(total, argnums=(0, 1))(w, x)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=30)
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--record", action="store_true",
                      help="append the table to benchmarks/RESULTS.md")
  args = parser.parse_args(argv)
  if args.steps < 1 or args.repeats < 1:
    parser.error("--steps and --repeats must be positive")
  w, x = _problem()
  reference = jax.jit(hand_written_per_step, static_argnums=2)(w, x,
                                                               args.steps)
  rows = []
  products = jax.jit(matmuls, static_argnums=2)
  unit = _results.median_seconds(products, w, x, args.steps,
                                 repeats=args.repeats) / args.steps
  rows.append(["matmul (100x100 @ 100x100) in a loop",
               f"{unit * 1e3:.3f}", f"{unit * 1e6:.1f}", "0.33"])
  for name, fn in [
      ("hand-written, per-step parameter gradient", hand_written_per_step),
      ("hand-written, folded parameter gradient", hand_written_folded),
      ("jaxdeq UnrolledAdjoint (default budget)", jaxdeq_unrolled)]:
    jitted = jax.jit(fn, static_argnums=2)
    grads = jitted(w, x, args.steps)
    # Every variant computes the same gradient.
    for got, want in zip(grads, reference):
      if not jnp.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise AssertionError(f"{name}: gradient differs from the reference")
    seconds = _results.median_seconds(jitted, w, x, args.steps,
                                      repeats=args.repeats)
    rows.append([name, f"{seconds * 1e3:.3f}",
                 f"{seconds / args.steps * 1e6:.1f}",
                 f"{seconds / (3 * args.steps * unit):.2f}"])
  body = _results.markdown_table(
      ["forward + backward", "ms", "us per solver step",
       "per step / 3 matmuls"], rows)
  body += (f"\n\n{args.steps} steps of z <- tanh(z W + x), batch {BATCH},"
           f" width {WIDTH}, float32, jitted; median of {args.repeats}"
           " calls. All variants return the same gradients (checked).")
  _results.report(body, record=args.record, module="unrolled_floor",
                  argv=argv, title="Unrolled fixed_point vs a hand-written"
                  " loop")


if __name__ == "__main__":
  main()
