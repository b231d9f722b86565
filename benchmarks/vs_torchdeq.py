"""jaxdeq vs torchdeq on the tutorial's ResNet DEQ cell and the tanh cell.

python -m benchmarks.vs_torchdeq [--batches 1 10 100] [--repeats 5] [--rounds 5]
    [--tol 1e-2] [--max-steps 25] [--torch-device cpu|cuda] [--xla-defaults] [--record]

Needs `pip install torch==2.13.0 && pip install torchdeq==0.1.0 --no-deps`.
Same weights (copied from the jaxdeq cell into an equivalent PyTorch module),
same input, same solver settings: Anderson (m=5, lam=1e-4) forward and an
implicit backward solved by Anderson, both to relative tolerance `--tol`
within `--max-steps`. Times are medians after a warm-up (jaxdeq jitted) over
at least `--repeats` calls and at least a second of calls, for both
libraries, taken in `--rounds` rounds that alternate between the libraries
(`_results.interleaved_medians`): this host's speed drifts by tens of
percent within minutes, and both then see the same drift. Residuals are the
worst per-sample relative residual of the returned z*. jaxdeq's ResNet rows
are compiled with the XLA:CPU options of
`experiments.common.xla_cpu.CONV_OPTIONS` (the tanh rows with XLA's
defaults); `--xla-defaults` compiles them with XLA's defaults too.
jaxdeq runs on JAX's default device; on a GPU machine (jaxlib with CUDA and a
CUDA build of torch) pass `--torch-device cuda` so that torchdeq runs there
too (timings then wait for the device: `torch.cuda.synchronize`).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from torch import nn

import jaxdeq
from benchmarks import _results
from experiments.common import xla_cpu
from jaxdeq.nnx import DEQ, ResNetCell, TanhCell


class TorchResNetCell(nn.Module):
  """The tutorial's ResNetLayer (NCHW)."""

  def __init__(self, channels, inner, num_groups=8):
    super().__init__()
    self.conv1 = nn.Conv2d(channels, inner, 3, padding=1, bias=False)
    self.conv2 = nn.Conv2d(inner, channels, 3, padding=1, bias=False)
    self.norm1 = nn.GroupNorm(num_groups, inner)
    self.norm2 = nn.GroupNorm(num_groups, channels)
    self.norm3 = nn.GroupNorm(num_groups, channels)

  def forward(self, z, x):
    y = self.norm1(nn.functional.relu(self.conv1(z)))
    return self.norm3(nn.functional.relu(z + self.norm2(x + self.conv2(y))))

  @classmethod
  def from_jax(cls, cell: ResNetCell) -> "TorchResNetCell":
    channels, inner = cell.conv1.shape[2], cell.conv1.shape[3]
    out = cls(channels, inner)
    t = lambda a: torch.from_numpy(np.asarray(a, np.float32).copy())
    with torch.no_grad():
      out.conv1.weight.copy_(t(cell.conv1[...]).permute(3, 2, 0, 1))
      out.conv2.weight.copy_(t(cell.conv2[...]).permute(3, 2, 0, 1))
      for name in ("norm1", "norm2", "norm3"):
        getattr(out, name).weight.copy_(t(getattr(cell, name).scale[...]))
        getattr(out, name).bias.copy_(t(getattr(cell, name).bias[...]))
    return out


class TorchTanhCell(nn.Module):

  def __init__(self, cell: TanhCell):
    super().__init__()
    self.kernel = nn.Parameter(torch.from_numpy(
        np.asarray(cell.kernel[...], np.float32).copy()))

  def forward(self, z, x):
    return torch.tanh(z @ self.kernel + x)


def worst_residual(fz, z):
  b = z.shape[0]
  num = np.linalg.norm((fz - z).reshape(b, -1), axis=1)
  return float(np.max(num / (np.linalg.norm(fz.reshape(b, -1), axis=1) + 1e-5)))


def prepare_jaxdeq(cell, x, tol, max_steps, compiler_options=None):
  """jaxdeq's jitted forward and forward+backward as callables that return
  when done (compiled and run once here), with their steps and residual."""
  deq = DEQ(cell, jaxdeq.Anderson(tol=tol, max_steps=max_steps, m=5,
                                   lam=1e-4, lam_relative=False),
            jaxdeq.ImplicitAdjoint())
  graphdef, params, rest = nnx.split(deq, nnx.Param, ...)
  cotangent = jax.random.normal(jax.random.key(1), x.shape)

  jit = functools.partial(jax.jit, compiler_options=compiler_options)

  @jit
  def forward(params, x):
    model = nnx.merge(graphdef, params, rest, copy=True)
    sol = model.solve(x)
    return sol.value, sol.stats.num_steps

  @jit
  def forward_backward(params, x):
    def loss(params, x, probe):
      model = nnx.merge(graphdef, params, rest, copy=True)
      model.backward_probe.set_value(probe)
      return jnp.vdot(model(x), cotangent)
    return jax.grad(loss, argnums=(0, 1, 2))(params, x,
                                             jaxdeq.backward_probe())

  z, steps = forward(params, x)
  grads = forward_backward(params, x)
  fz = cell(z, x)
  backward = jaxdeq.BackwardStats.from_probe_grad(grads[2])
  return dict(fwd=lambda: jax.block_until_ready(forward(params, x)),
              both=lambda: jax.block_until_ready(
                  forward_backward(params, x)),
              steps=int(steps),
              bsteps=int(backward.num_steps),
              residual=worst_residual(np.asarray(fz), np.asarray(z)))


def prepare_torchdeq(cell, x, tol, max_steps, channels_last, device):
  """torchdeq's forward and forward+backward as callables that return when
  done, with their steps and residual."""
  from torchdeq import get_deq

  cell = cell.to(device)
  sync = (torch.cuda.synchronize if device.startswith("cuda")
          else lambda: None)
  deq = get_deq(f_solver="anderson", f_max_iter=max_steps, f_tol=tol,
                f_stop_mode="rel", b_solver="anderson", b_max_iter=max_steps,
                b_tol=tol, b_stop_mode="rel", ift=True)
  kwargs = {"solver_kwargs": {"m": 5, "lam": 1e-4}}
  xt = torch.from_numpy(np.asarray(x, np.float32).copy()).to(device)
  if channels_last:
    xt = xt.permute(0, 3, 1, 2).contiguous()
  cotangent = torch.randn_like(xt)
  func = lambda z: cell(z, xt)

  def forward():
    deq.eval()
    with torch.no_grad():
      z_out, info = deq(func, torch.zeros_like(xt), **kwargs)
    return z_out[-1], info

  backward_steps = []

  def forward_backward():
    deq.train()
    cell.zero_grad()
    z_out, info = deq(func, torch.zeros_like(xt), **kwargs,
                      backward_writer=lambda b_info: backward_steps.append(
                          int(b_info["nstep"].max())))
    (z_out[-1] * cotangent).sum().backward()
    return info

  z, info = forward()
  forward_backward()
  with torch.no_grad():
    fz = cell(z, xt)
  synced = lambda fn: lambda: (fn(), sync())
  return dict(fwd=synced(forward), both=synced(forward_backward),
              steps=int(info["nstep"].max()),
              bsteps=backward_steps[-1],
              residual=worst_residual(fz.cpu().numpy(), z.cpu().numpy()))


# Issue #11's forward+backward speed-up targets for the ResNet cell by batch.
RESNET_TARGETS = {1: 1.2, 10: 1.0}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 10, 100])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--rounds", type=int, default=5,
                      help="alternating timing rounds of the two libraries")
  parser.add_argument("--tol", type=float, default=1e-2)
  parser.add_argument("--max-steps", type=int, default=25)
  parser.add_argument("--cells", nargs="+", default=["resnet", "tanh"])
  parser.add_argument("--torch-device", default="cpu",
                      help="torch device for torchdeq: cpu (default) or cuda")
  parser.add_argument("--xla-defaults", action="store_true",
                      help="compile jaxdeq's ResNet rows with XLA's default"
                      " CPU options too")
  parser.add_argument("--record", action="store_true",
                      help="append the table to benchmarks/RESULTS.md")
  args = parser.parse_args(argv)
  conv_options = None if args.xla_defaults else xla_cpu.conv_options()
  if args.torch_device.startswith("cuda") and not torch.cuda.is_available():
    parser.error("--torch-device cuda: this torch build sees no CUDA device")
  rows = []
  for cell_name in args.cells:
    for batch in args.batches:
      key = jax.random.key(batch)
      if cell_name == "resnet":
        cell = ResNetCell(48, 64, rngs=nnx.Rngs(0))
        x = jax.random.normal(key, (batch, 32, 32, 48))
        torch_cell = TorchResNetCell.from_jax(cell)
      else:
        cell = TanhCell(100, rngs=nnx.Rngs(0))
        x = jax.random.normal(key, (batch, 100))
        torch_cell = TorchTanhCell(cell)
      ours = prepare_jaxdeq(cell, x, args.tol, args.max_steps,
                            conv_options if cell_name == "resnet" else None)
      theirs = prepare_torchdeq(torch_cell, x, args.tol, args.max_steps,
                                cell_name == "resnet", args.torch_device)
      medians = _results.interleaved_medians(
          {("torchdeq", "fwd"): theirs["fwd"], ("jaxdeq", "fwd"): ours["fwd"],
           ("torchdeq", "both"): theirs["both"],
           ("jaxdeq", "both"): ours["both"]},
          repeats=args.repeats, rounds=args.rounds)
      for who, timed in (("torchdeq", theirs), ("jaxdeq", ours)):
        timed["fwd"] = medians[who, "fwd"]
        timed["both"] = medians[who, "both"]
      label = ("ResNet 48/64 32x32" if cell_name == "resnet"
               else "tanh d=100")
      rows.append([
          label, batch,
          f"{theirs['fwd'] * 1e3:.1f}", f"{ours['fwd'] * 1e3:.1f}",
          f"{theirs['fwd'] / ours['fwd']:.2f}x",
          f"{theirs['both'] * 1e3:.1f}", f"{ours['both'] * 1e3:.1f}",
          f"{theirs['both'] / ours['both']:.2f}x",
          _results.against_target(
              theirs["both"] / ours["both"],
              RESNET_TARGETS.get(batch) if cell_name == "resnet" else None),
          f"{theirs['steps']} (+{theirs['bsteps']} bwd) / {ours['steps']}"
          f" (+{ours['bsteps']} bwd)",
          f"{theirs['residual']:.1e} / {ours['residual']:.1e}"])
      print(rows[-1], flush=True)
  body = _results.markdown_table(
      ["cell", "batch", "torchdeq fwd ms", "jaxdeq fwd ms", "fwd speed-up",
       "torchdeq fwd+bwd ms", "jaxdeq fwd+bwd ms", "fwd+bwd speed-up",
       "fwd+bwd target",
       "steps torchdeq / jaxdeq: fwd (+bwd)", "worst rel. residual torchdeq / jaxdeq"],
      rows)
  jax_device = jax.devices()[0]
  body += (f"\n\nAnderson m=5, lam=1e-4, tol {args.tol:g} (relative), max"
           f" {args.max_steps} steps, implicit backward by Anderson; times are"
           f" medians over {args.rounds} rounds alternating between the"
           " libraries; jaxdeq on"
           f" {jax_device.platform} ({jax_device.device_kind}), torchdeq on"
           f" {args.torch_device} (torch threads ="
           f" {torch.get_num_threads()}); jaxdeq's ResNet rows compiled with "
           + ("XLA's default options"
              if conv_options is None else
              f"`compiler_options={conv_options}`"
              " (experiments.common.xla_cpu)")
           + ". Where the ResNet cell misses its"
           " target, `python -m benchmarks.profile_resnet` says where the"
           " time goes.")
  _results.report(body, record=args.record, module="vs_torchdeq", argv=argv,
                  title="vs torchdeq (ResNet and tanh cells)")


if __name__ == "__main__":
  main()
