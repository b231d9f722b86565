"""The XLA:CPU options of the convolutional experiment and benchmarks."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest
from flax import nnx

from experiments.common import xla_cpu
from jaxdeq.nnx import ResNetCell

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_options_only_on_the_jaxlib_they_were_checked_on():
  assert xla_cpu.conv_options("0.10.2") == xla_cpu.CONV_OPTIONS
  with pytest.warns(UserWarning, match=r"checked on jaxlib 0\.10\.x, this is"
                    r" 0\.11"):
    assert xla_cpu.conv_options("0.11.0") is None
  assert xla_cpu.as_flags({"a": "", "b": True, "c": 3}) == "--a= --b=true --c=3"


def test_resnet_cell_under_the_options_computes_the_same():
  options = xla_cpu.conv_options()
  if options is None:
    pytest.skip(f"jaxlib {jaxlib.__version__}: options not checked there")
  # The tutorial's channel counts (YNNPACK leaves smaller convolutions to
  # XLA anyway), on a small map.
  cell = ResNetCell(48, 64, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(cell)
  z, x = jax.random.normal(jax.random.key(0), (2, 2, 8, 8, 48))
  evaluate = lambda state, z, x: nnx.merge(graphdef, state)(z, x)
  tuned = jax.jit(evaluate, compiler_options=options)
  np.testing.assert_allclose(tuned(state, z, x), jax.jit(evaluate)(state, z, x),
                             rtol=1e-5, atol=1e-5)
  # What the options are for: the convolutions leave YNNPACK, the
  # reductions (GroupNorm's statistics) stay in it.
  default = _ynn_fused_ops(jax.jit(evaluate).lower(state, z, x).compile(
      ).as_text())
  assert "convolution" in default
  ops = _ynn_fused_ops(tuned.lower(state, z, x).compile().as_text())
  assert "convolution" not in ops
  assert "reduce" in ops


def _ynn_fused_ops(hlo: str) -> set[str]:
  """Opcodes inside the computations that YNNPACK fusions call."""
  bodies, name = {}, None
  for line in hlo.splitlines():
    header = re.match(r"^%?([\w.\-]+) .*\{$", line)
    if header:
      name = header.group(1)
      bodies[name] = []
    elif name is not None:
      bodies[name].append(line)
  called = re.findall(r"kind=kCustom, calls=%?([\w.\-]+)", "\n".join(
      line for line in hlo.splitlines() if "ynn_fusion" in line))
  return {op for c in called for line in bodies.get(c, ())
          for op in re.findall(r"\s([a-z][\w\-]*)\(", line)}


def test_flags_set_before_the_backend_starts_keep_the_users():
  env = dict(os.environ,
             XLA_FLAGS="--xla_cpu_copy_insertion_use_region_analysis=false")
  code = ("import os; from experiments.common import xla_cpu;"
          " print(xla_cpu.use_conv_flags()); print(os.environ['XLA_FLAGS'])")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                       capture_output=True, text=True, check=True)
  applied, flags = out.stdout.splitlines()
  if xla_cpu.conv_options() is None:
    assert applied == "False"
    return
  assert applied == "True"
  assert flags == ("--xla_cpu_copy_insertion_use_region_analysis=false"
                   " --xla_cpu_experimental_ynn_fusion_type="
                   "LIBRARY_FUSION_TYPE_REDUCE")


def test_flags_after_the_backend_started_are_refused(monkeypatch):
  jnp.zeros(1).block_until_ready()
  monkeypatch.setattr(xla_cpu, "CHECKED_JAXLIB",
                      (xla_cpu._jaxlib_release(),))
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
  with pytest.warns(UserWarning, match="backend has already started"):
    assert not xla_cpu.use_conv_flags()
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false"
