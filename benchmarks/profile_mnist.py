"""Where a jaxdeq MNIST training step spends its time (XLA:CPU profile).

python -m benchmarks.profile_mnist [--layers fixed_point newton_implicit] [--record]
    [--warmup 100] [--steps 20] [--data-dir DIR]

For each layer: trains `--warmup` batches of Fashion-MNIST (so that the solver
takes as many steps as in training), times `--steps` jitted train steps, then
records them with `jax.profiler` and sums the XLA ops of the trace: matmuls
(dots and fusions containing one, read from the compiled HLO), other fusions
(elementwise work, reductions), data movement (copies, slices, buffer
updates), the solver loops' inclusive time, and the wall time no op covers
(dispatch, host work, gaps). The top ops follow. Appends to RESULTS.md.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks import _profile, _results
from experiments.common import data, training
from experiments.mnist import models

def _train_step(graphdef, state, x, y, learning_rate=0.1, skip_norm=100.0):
  """SGD step; like the experiments with `--skip-grad-norm 100`, an update
  with a non-finite or exploding gradient is dropped (unrolled Newton)."""
  model = nnx.merge(graphdef, state)

  def loss_fn(model):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  params = nnx.state(model, nnx.Param)
  keep = optax.global_norm(grads) <= skip_norm  # False for NaN too
  nnx.update(model, jax.tree.map(
      lambda p, g: jnp.where(keep, p - learning_rate * g, p), params, grads))
  return nnx.state(model), loss


def profile_layer(layer: str, dataset, warmup: int, steps: int,
                  top: int = 12) -> dict:
  model = models.make_model(layer, nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  images = jnp.asarray(dataset.train_images.reshape(
      len(dataset.train_images), -1).astype(np.float32) / 255.0)
  labels = jnp.asarray(dataset.train_labels.astype(np.int32))
  batches = len(images) // 100
  # The training order of `python -m experiments.mnist --seed 0`, epoch 1.
  order = training.epoch_order(0, 1, len(images))
  images, labels = images[order], labels[order]
  step = jax.jit(_train_step, static_argnums=0, donate_argnums=1)

  def batch(i):
    i = i % batches
    return images[i * 100:(i + 1) * 100], labels[i * 100:(i + 1) * 100]

  for i in range(warmup):
    state, loss = step(graphdef, state, *batch(i))
  jax.block_until_ready(loss)
  timed = [batch(warmup + i) for i in range(steps)]
  started = time.perf_counter()
  for x, y in timed:
    state, loss = step(graphdef, state, x, y)
  jax.block_until_ready(loss)
  wall_ms = (time.perf_counter() - started) / steps * 1e3
  solver_steps = float(nnx.merge(graphdef, state).layers[1]
                       .stats.get_value().num_steps)

  hlo = step.lower(graphdef, state, *timed[0]).compile().as_text()

  def run():
    nonlocal state
    for x, y in timed:
      state, loss = step(graphdef, state, x, y)
    return loss

  profile = _profile.op_profile(run, hlo, "jit__train_step", steps, top=top)
  return dict(layer=layer, wall_ms=wall_ms, solver_steps=solver_steps,
              **profile)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", nargs="+",
                      default=["fixed_point", "newton_implicit"])
  parser.add_argument("--warmup", type=int, default=100)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--data-dir", default=None)
  parser.add_argument("--record", action="store_true",
                      help="append the table to benchmarks/RESULTS.md")
  args = parser.parse_args(argv)
  if args.warmup < 1 or args.steps < 1:
    parser.error("--warmup and --steps must be positive")
  dataset = data.load("fashion_mnist", args.data_dir)
  sections = []
  for layer in args.layers:
    r = profile_layer(layer, dataset, args.warmup, args.steps)
    cats = r["categories"]
    summary = _results.markdown_table(
        ["layer", "ms/step", "ms/step profiled", "solver steps (last batch)",
         "matmul ms", "other fusions ms", "data movement ms",
         "not in ops ms"],
        [[layer, f"{r['wall_ms']:.2f}", f"{r['profiled_ms']:.2f}",
          f"{r['solver_steps']:.0f}",
          f"{cats.get('matmul/conv', 0):.2f}", f"{cats.get('other fusions', 0):.2f}",
          f"{cats.get('data movement', 0):.2f}", f"{r['uncovered']:.2f}"]])
    loops = ", ".join(f"{n} {ms:.2f} ms" for n, ms in r["loops"])
    top = _results.markdown_table(
        ["op", "ms/step", "calls/step", "us/call", "matmul"],
        [[n, f"{ms:.3f}", f"{c:.1f}", f"{us:.1f}", "yes" if mm else ""]
         for n, ms, c, us, mm in r["top"]])
    section = (f"{summary}\n\nOutermost loops (inclusive, per train step):"
               f" {loops or 'none'}.\n\nTop ops of `{layer}`:\n\n{top}")
    print(section, flush=True)
    sections.append(section)
  body = "\n\n".join(sections) + (
      "\n\nThe profiled step is `jax.jit(value_and_grad + SGD)` on the"
      " experiment's model (batch 100, seed-0 training order, after the"
      " warm-up batches). Op times are summed over the profiled steps; 'not in"
      " ops' is the profiled wall time they leave (dispatch, host, gaps).")
  _results.report(body, record=args.record, module="profile_mnist", argv=argv,
                  title="Profile of an MNIST training step")


if __name__ == "__main__":
  main()
