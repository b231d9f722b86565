"""The unrolled adjoint's cost against max_steps, per mode and dtype.

python -m benchmarks.unrolled [--max-steps 100 500 2000] [--repeats 20] [--record]

Forward + backward (`jax.grad`, jitted) of the tutorial's tanh fixed point
(batch 100, width 100, plain iteration) that stops after the same ~15 steps
whatever `max_steps` is: the time must not grow with `max_steps` (the
checkpoint buffers it sizes are written one row per step, and the backward
visits only the steps taken). `UnrolledAdjoint()` keeps a tape of each
step's VJP residuals while max_steps rows fit its memory budget and
checkpoints beyond (each cell says which);
`memory_budget=0` always checkpoints. float32 and float64.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jaxdeq
from benchmarks import _results

MODES = {"default budget": jaxdeq.UnrolledAdjoint(),
         "memory_budget=0": jaxdeq.UnrolledAdjoint(memory_budget=0)}


def tanh_map(z, args):
  w, x = args
  return jnp.tanh(z @ w + x)


def timed_gradient(mode: str, dtype, max_steps: int, repeats: int):
  """(median seconds of one gradient, steps taken, memory bytes)."""
  keys = jax.random.split(jax.random.key(0), 2)
  w = (0.6 * jax.random.normal(keys[0], (100, 100)) / 10).astype(dtype)
  x = jax.random.normal(keys[1], (100, 100)).astype(dtype)
  solver = jaxdeq.FixedPointIteration(tol=1e-4, max_steps=max_steps)

  def loss(w, x):
    sol = jaxdeq.fixed_point(tanh_map, jnp.zeros_like(x), (w, x),
                             solver=solver, adjoint=MODES[mode])
    return jnp.sum(sol.value ** 2), sol.stats.num_steps

  grad = jax.jit(jax.grad(loss, has_aux=True))
  compiled = grad.lower(w, x).compile()
  analysis = compiled.memory_analysis()
  memory = analysis.temp_size_in_bytes if analysis is not None else 0
  steps = int(grad(w, x)[1])
  tape_rows, every = MODES[mode]._plan(tanh_map, x, (w, x), solver)
  stored = ("tape" if every is None else "checkpointed" if not tape_rows
            else f"{tape_rows} on tape, rest replayed")
  return (_results.median_seconds(grad, w, x, repeats=repeats), steps, memory,
          stored)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--max-steps", type=int, nargs="+",
                      default=[100, 500, 2000])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--record", action="store_true",
                      help="append the table to benchmarks/RESULTS.md")
  args = parser.parse_args(argv)
  rows = []
  for dtype in ("float32", "float64"):
    jax.config.update("jax_enable_x64", dtype == "float64")
    for mode in MODES:
      times, memories, taken, used = [], [], set(), []
      for max_steps in args.max_steps:
        seconds, steps, memory, stored = timed_gradient(
            mode, jnp.dtype(dtype), max_steps, args.repeats)
        times.append(seconds)
        memories.append(memory)
        taken.add(steps)
        used.append(stored)
        print(dtype, mode, max_steps, f"{seconds * 1e3:.2f} ms", steps,
              flush=True)
      rows.append([dtype, mode, "/".join(map(str, sorted(taken)))]
                  + [f"{t * 1e3:.2f} ms, {m / 2**20:.1f} MiB ({u})"
                     for t, m, u in zip(times, memories, used)]
                  + [f"{times[-1] / times[0]:.2f}x"])
  jax.config.update("jax_enable_x64", False)
  body = _results.markdown_table(
      ["dtype", "UnrolledAdjoint", "steps taken"]
      + [f"max_steps {s}: time, temp memory" for s in args.max_steps]
      + [f"time {args.max_steps[-1]} vs {args.max_steps[0]}"], rows)
  _results.report(body, record=args.record, module="unrolled", argv=argv,
                  title="Unrolled adjoint: cost against max_steps")


if __name__ == "__main__":
  main()
