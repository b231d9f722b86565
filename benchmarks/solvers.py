"""jaxdeq's solvers against jaxopt and optimistix on the same problems.

python -m benchmarks.solvers [--repeats 5] [--quick] [--record]

Needs `pip install jaxopt optimistix` (the `benchmarks` extra). Every solver
targets tol 1e-4; tolerances are defined differently across libraries (jaxopt:
absolute l2 norm of the whole batch; optimistix: elementwise rtol/atol; jaxdeq:
per-sample relative), so the table reports the worst per-sample relative
residual each one actually reached, next to its time and steps. Times are
medians over `--repeats` jitted calls after a warm-up; "fwd+bwd" is the
gradient of sum(z*) with respect to the map's parameters (implicit in all
three libraries).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jaxdeq
from benchmarks import _results

TOL = 1e-4
MAX_STEPS = 200


def tanh_problem(width, batch, seed=0):
  kw, kx = jax.random.split(jax.random.key(seed))
  w = jax.random.normal(kw, (width, width)) * (0.9 / jnp.sqrt(width))
  x = jax.random.normal(kx, (batch, width))
  return (lambda z, p: jnp.tanh(z @ p[0] + p[1])), (w, x), jnp.zeros_like(x)


def linear_problem(width, batch, seed=0):
  """z = z A + b, A symmetric with eigenvalues spread over [0, 0.98]."""
  kq, kb = jax.random.split(jax.random.key(seed))
  q, _ = jnp.linalg.qr(jax.random.normal(kq, (width, width)))
  a = (q * jnp.linspace(0.0, 0.98, width)) @ q.T
  b = jax.random.normal(kb, (batch, width))
  return (lambda z, p: z @ p[0] + p[1]), (a, b), jnp.zeros_like(b)


def resnet_problem(batch, seed=0):
  from flax import nnx

  from jaxdeq.nnx import ResNetCell

  cell = ResNetCell(48, 64, rngs=nnx.Rngs(seed))
  graphdef, state = nnx.split(cell)
  x = jax.random.normal(jax.random.key(seed), (batch, 16, 16, 48))
  f = lambda z, p: nnx.merge(graphdef, p[0])(z, p[1])
  return f, (state, x), jnp.zeros_like(x)


def worst_relative_residual(f, z, params):
  fz = f(z, params)
  b = z.shape[0]
  num = jnp.linalg.norm((fz - z).reshape(b, -1), axis=1)
  return float(jnp.max(num / (jnp.linalg.norm(fz.reshape(b, -1), axis=1)
                              + 1e-5)))


def jaxdeq_solver(solver):
  def run(f, params, z0):
    sol = jaxdeq.fixed_point(f, z0, params, solver=solver)
    return sol.value, sol.stats.num_steps
  return run


def jaxopt_solver(name):
  import jaxopt

  def run(f, params, z0):
    fun = lambda z, params: f(z, params)
    if name == "anderson":
      solver = jaxopt.AndersonAcceleration(fun, history_size=5, maxiter=MAX_STEPS,
                                           tol=TOL, ridge=1e-4, jit=True)
    else:
      solver = jaxopt.FixedPointIteration(fun, maxiter=MAX_STEPS, tol=TOL,
                                          jit=True)
    out = solver.run(z0, params)
    return out.params, out.state.iter_num
  return run


def optimistix_solver():
  import optimistix as optx

  def run(f, params, z0):
    sol = optx.fixed_point(f, optx.FixedPointIteration(rtol=TOL, atol=TOL),
                           z0, params, max_steps=MAX_STEPS, throw=False)
    return sol.value, sol.stats["num_steps"]
  return run


def contenders():
  return {
      "jaxdeq FixedPointIteration": jaxdeq_solver(
          jaxdeq.FixedPointIteration(TOL, MAX_STEPS)),
      "jaxdeq Anderson": jaxdeq_solver(jaxdeq.Anderson(TOL, MAX_STEPS)),
      "jaxdeq Broyden": jaxdeq_solver(jaxdeq.Broyden(TOL, MAX_STEPS)),
      "jaxopt FixedPointIteration": jaxopt_solver("iteration"),
      "jaxopt AndersonAcceleration": jaxopt_solver("anderson"),
      "optimistix FixedPointIteration": optimistix_solver(),
  }


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--quick", action="store_true",
                      help="small cases only (a smoke run)")
  parser.add_argument("--record", action="store_true",
                      help="append the table to benchmarks/RESULTS.md")
  args = parser.parse_args(argv)
  problems = {}
  sizes = [(100, 1), (100, 100)] if args.quick else [
      (100, 1), (100, 100), (100, 1000), (1000, 1), (1000, 100), (1000, 1000)]
  for width, batch in sizes:
    problems[f"tanh d={width} B={batch}"] = tanh_problem(width, batch)
  problems["linear d=100 B=100 (eig up to 0.98)"] = linear_problem(100, 100)
  if not args.quick:
    problems["ResNet cell B=4 16x16x48"] = resnet_problem(4)
  rows = []
  for pname, (f, params, z0) in problems.items():
    for cname, run in contenders().items():
      forward = jax.jit(lambda p, z0, run=run, f=f: run(f, p, z0))
      value, steps = forward(params, z0)
      residual = worst_relative_residual(f, value, params)
      seconds = _results.median_seconds(forward, params, z0,
                                        repeats=args.repeats)
      t_fwd = f"{seconds * 1e3:.2f}"
      loss = lambda p, z0, run=run, f=f: jnp.sum(run(f, p, z0)[0])
      try:
        grad = jax.jit(jax.grad(loss))
        seconds = _results.median_seconds(grad, params, z0,
                                          repeats=args.repeats)
        t_bwd = f"{seconds * 1e3:.2f}"
      except Exception as error:  # optimistix's dense backward can OOM
        t_bwd = f"failed ({type(error).__name__}: {str(error)[:60]})"
      rows.append([pname, cname, t_fwd, t_bwd, int(steps), f"{residual:.1e}"])
      print(rows[-1], flush=True)
  body = _results.markdown_table(
      ["problem", "solver", "fwd ms", "fwd+bwd ms", "steps",
       "worst per-sample rel. residual"], rows)
  _results.report(body, record=args.record, module="solvers", argv=argv,
                  title="Solvers vs jaxopt and optimistix")


if __name__ == "__main__":
  main()
