"""Where jaxdeq's ResNet-cell DEQ spends its time (XLA:CPU op profile).

python -m benchmarks.profile_resnet [--batch 10] [--repeats 5] [--xla-defaults] [--record]

The setting of `python -m benchmarks.vs_torchdeq`: the tutorial's ResNet cell
(48 channels, 64 inner, 32x32, GroupNorm), Anderson (m=5, lam=1e-4, tol 1e-2,
max 25) forward and an implicit backward solved by Anderson. Profiles the
jitted forward and forward+backward separately with `jax.profiler` and sums
the XLA ops: convolutions (and fusions containing one), other fusions
(GroupNorm, ReLU, Anderson's bookkeeping), data movement, and the loops'
inclusive time; then the top ops of the forward+backward. With torch
installed, one evaluation of the cell and of its 48->64 convolution in both
frameworks (same weights and input): what one solver step costs before any
solver work. Compiled with `experiments.common.xla_cpu.CONV_OPTIONS`, as
`benchmarks.vs_torchdeq`'s ResNet rows, unless `--xla-defaults`. (Under
those options XLA runs the convolutions outside the ops the profiler sees:
their time is in "not in ops".)
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxdeq
from benchmarks import _profile, _results
from experiments.common import xla_cpu
from jaxdeq._src.nnx.conv import conv2d_same
from jaxdeq.nnx import DEQ, ResNetCell


def profile(batch: int, repeats: int, compiler_options=None) -> str:
  cell = ResNetCell(48, 64, rngs=nnx.Rngs(0))
  deq = DEQ(cell, jaxdeq.Anderson(tol=1e-2, max_steps=25, m=5,
                                   lam=1e-4, lam_relative=False),
            jaxdeq.ImplicitAdjoint())
  graphdef, params, rest = nnx.split(deq, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(batch), (batch, 32, 32, 48))
  cotangent = jax.random.normal(jax.random.key(1), x.shape)

  jit = functools.partial(jax.jit, compiler_options=compiler_options)

  @jit
  def forward(params, x):
    sol = nnx.merge(graphdef, params, rest, copy=True).solve(x)
    return sol.value, sol.stats.num_steps

  @jit
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


def cell_costs(batch: int, repeats: int, compiler_options=None) -> str:
  """ms of one cell evaluation and of its first convolution, jaxdeq (jitted)
  vs PyTorch (eager, no autograd); empty without torch."""
  try:
    import torch
    from benchmarks.vs_torchdeq import TorchResNetCell
  except ImportError:
    return ""
  cell = ResNetCell(48, 64, rngs=nnx.Rngs(0))
  keys = jax.random.split(jax.random.key(batch), 2)
  z = jax.random.normal(keys[0], (batch, 32, 32, 48))
  x = jax.random.normal(keys[1], (batch, 32, 32, 48))
  graphdef, state = nnx.split(cell)
  jit = functools.partial(jax.jit, compiler_options=compiler_options)
  evaluate = jit(lambda state, z, x: nnx.merge(graphdef, state)(z, x))
  conv = jit(conv2d_same)  # the convolution the cell runs
  ours = [_results.median_seconds(evaluate, state, z, x, repeats=repeats),
          _results.median_seconds(conv, z, cell.conv1[...], repeats=repeats)]
  torch_cell = TorchResNetCell.from_jax(cell)
  nchw = lambda a: torch.from_numpy(np.array(a)).permute(0, 3, 1, 2
                                                           ).contiguous()
  zt, xt = nchw(z), nchw(x)

  def torch_seconds(fn):  # eager torch: the call returns when done
    return _results.median_seconds(lambda: (fn(), None)[1], repeats=repeats)

  with torch.no_grad():
    theirs = [torch_seconds(lambda: torch_cell(zt, xt)),
              torch_seconds(lambda: torch_cell.conv1(zt))]
  rows = [[name, f"{t * 1e3:.2f}", f"{o * 1e3:.2f}", f"{t / o:.2f}x"]
          for name, t, o in zip(("cell f(z, x)", "conv 48->64, 3x3"),
                                theirs, ours)]
  return "\n\n" + _results.markdown_table(
      [f"one evaluation, batch {batch}", "PyTorch ms", "jaxdeq/XLA ms",
       "speed-up"], rows)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--xla-defaults", action="store_true",
                      help="compile with XLA's default CPU options")
  parser.add_argument("--record", action="store_true",
                      help="append the tables to benchmarks/RESULTS.md")
  args = parser.parse_args(argv)
  options = None if args.xla_defaults else xla_cpu.conv_options()
  body = profile(args.batch, args.repeats, options) + cell_costs(
      args.batch, max(args.repeats, 20), options)
  body += ("\n\nCompiled with " + ("XLA's default options." if options is None
                                   else f"`compiler_options={options}`."))
  _results.report(body, record=args.record, module="profile_resnet",
                  argv=argv, title="Profile of the ResNet-cell DEQ")


if __name__ == "__main__":
  main()
