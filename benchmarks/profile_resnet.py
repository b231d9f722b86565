"""Where jaxdeq's ResNet-cell DEQ spends its time (XLA:CPU op profile).

python -m benchmarks.profile_resnet [--batch 10] [--repeats 5] [--record]

The setting of `python -m benchmarks.vs_torchdeq`: the tutorial's ResNet cell
(48 channels, 64 inner, 32x32, GroupNorm), Anderson (m=5, lam=1e-4, tol 1e-2,
max 25) forward and an implicit backward solved by Anderson. Profiles the
jitted forward and forward+backward separately with `jax.profiler` and sums
the XLA ops: convolutions (and fusions containing one), other fusions
(GroupNorm, ReLU, Anderson's bookkeeping), data movement, and the loops'
inclusive time; then the top ops of the forward+backward.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

import jaxdeq
from benchmarks import _profile, _results
from jaxdeq.nnx import DEQ, ResNetCell


def profile(batch: int, repeats: int) -> str:
  cell = ResNetCell(48, 64, rngs=nnx.Rngs(0))
  deq = DEQ(cell, jaxdeq.Anderson(tol=1e-2, max_steps=25, m=5),
            jaxdeq.ImplicitAdjoint())
  graphdef, params, rest = nnx.split(deq, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(batch), (batch, 32, 32, 48))
  cotangent = jax.random.normal(jax.random.key(1), x.shape)

  @jax.jit
  def forward(params, x):
    sol = nnx.merge(graphdef, params, rest, copy=True).solve(x)
    return sol.value, sol.stats.num_steps

  @jax.jit
  def forward_backward(params, x):
    def loss(params, x, probe):
      model = nnx.merge(graphdef, params, rest, copy=True)
      model.backward_probe.set_value(probe)
      return jnp.vdot(model(x), cotangent)
    return jax.grad(loss, argnums=(0, 1, 2))(params, x,
                                             jaxdeq.backward_probe())

  steps = int(forward(params, x)[1])
  backward_steps = int(jaxdeq.BackwardStats.from_probe_grad(
      forward_backward(params, x)[2]).num_steps)
  rows, tops = [], None
  for name, fn in (("forward", forward),
                   ("forward+backward", forward_backward)):
    hlo = fn.lower(params, x).compile().as_text()
    module = f"jit_{fn.__name__}"

    def run(fn=fn):
      out = None
      for _ in range(repeats):
        out = fn(params, x)
      return out

    wall = _results.median_seconds(fn, params, x, repeats=repeats) * 1e3
    r = _profile.op_profile(run, hlo, module, repeats)
    cats = r["categories"]
    rows.append([name, f"{wall:.1f}", f"{r['profiled_ms']:.1f}",
                 f"{cats.get('matmul/conv', 0):.1f}",
                 f"{cats.get('other fusions', 0):.1f}",
                 f"{cats.get('data movement', 0):.1f}",
                 f"{r['uncovered']:.1f}",
                 ", ".join(f"{n} {ms:.1f}" for n, ms in r["loops"][:3])])
    tops = r["top"]
  summary = _results.markdown_table(
      ["jitted", "ms (median)", "ms profiled", "conv/matmul ms",
       "other fusions ms", "data movement ms", "not in ops ms",
       "outermost loops (inclusive ms)"], rows)
  top = _results.markdown_table(
      ["op (forward+backward)", "ms", "calls", "us/call", "conv/matmul"],
      [[n, f"{ms:.2f}", f"{c:.0f}", f"{us:.0f}", "yes" if mm else ""]
       for n, ms, c, us, mm in tops])
  return (f"Batch {batch}: {steps} forward Anderson steps, {backward_steps}"
          f" backward steps.\n\n{summary}\n\n{top}")


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--record", action="store_true",
                      help="append the tables to benchmarks/RESULTS.md")
  args = parser.parse_args(argv)
  body = profile(args.batch, args.repeats)
  _results.report(body, record=args.record, module="profile_resnet",
                  argv=argv, title="Profile of the ResNet-cell DEQ")


if __name__ == "__main__":
  main()
