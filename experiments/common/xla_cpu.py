"""XLA:CPU settings under which convolutional DEQs run faster.

With jaxlib 0.10.2's defaults XLA:CPU hands each convolution to YNNPACK,
which ran the ResNet cell's 3x3 convolutions on one of this machine's two
cores (4.2 ms at batch 10 on either one or two cores; PyTorch's oneDNN 2.0
ms on two). Without YNNPACK's convolutions XLA runs them on Eigen's threaded
convolution (2.3 ms). YNNPACK keeps the reductions (GroupNorm's statistics
and the sums in its VJP): XLA's own emitter ran a 10 x 32 x 32 x 64 spatial
sum 2.5-4x slower (0.50-0.81 vs 0.20 ms). Region-based copy insertion
removes copies of the Anderson histories that XLA otherwise inserts in the
solver's loop body. Turning all YNNPACK fusions off took the tutorial's
ResNet-cell DEQ forward+backward from 0.57x to 0.73x torchdeq's speed at
batch 10 (216.6 -> 152.8 ms in one run of `python -m benchmarks.vs_torchdeq`,
with and without `--xla-defaults`); keeping its reductions then made it
faster again: 245.5 -> 208.4 ms at batch 10, 29.2 -> 26.8 ms at batch 1
and 2580 -> 2355 ms at batch 100 (medians of interleaved runs in one
process; RESULTS.md).

The options only concern the CPU backend and are not part of jaxdeq's API:
they are XLA debug options, one named `experimental`, and XLA refuses names
it does not know (`XLA_FLAGS` aborts the process), so they are used only
with the jaxlib releases they were checked on (`conv_options`). Dense
models (the MNIST layers) keep XLA's defaults, under which their small
matrix products were faster. Give them to `jax.jit` as
`compiler_options=conv_options()`, or to every compilation of a process as
`XLA_FLAGS` (`use_conv_flags`).
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Optional

CONV_OPTIONS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE",
    "xla_cpu_copy_insertion_use_region_analysis": True,
}

# (major, minor) jaxlib releases on which CONV_OPTIONS were checked.
CHECKED_JAXLIB = ((0, 10),)


def _jaxlib_release(version: Optional[str] = None) -> tuple[int, ...]:
  if version is None:
    import jaxlib
    version = jaxlib.__version__
  return tuple(int(part) for part in re.findall(r"\d+", version)[:2])


def conv_options(version: Optional[str] = None) -> Optional[dict]:
  """`CONV_OPTIONS` if this jaxlib (or `version`) is one they were checked
  on, else None (XLA's defaults) with a warning.

  Examples:
    >>> conv_options("0.10.2") == CONV_OPTIONS
    True
  """
  release = _jaxlib_release(version)
  if release in CHECKED_JAXLIB:
    return dict(CONV_OPTIONS)
  warnings.warn(
      f"XLA:CPU convolution options not used: they were checked on jaxlib"
      f" {', '.join('.'.join(map(str, r)) for r in CHECKED_JAXLIB)}.x, this"
      f" is {'.'.join(map(str, release))} (set them yourself if it knows"
      f" them: {as_flags(CONV_OPTIONS)})", stacklevel=2)
  return None


def as_flags(options: dict) -> str:
  """The `XLA_FLAGS` form of compiler options: "--name=value ...".

  Examples:
    >>> as_flags({"xla_cpu_copy_insertion_use_region_analysis": True})
    '--xla_cpu_copy_insertion_use_region_analysis=true'
  """
  def text(value):
    return str(value).lower() if isinstance(value, bool) else str(value)

  return " ".join(f"--{name}={text(value)}" for name, value in options.items())


def _backend_started() -> bool:
  try:
    from jax._src import xla_bridge
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # a jax without that function
    return False


def use_conv_flags() -> bool:
  """Adds `conv_options()` to `XLA_FLAGS` for the rest of the process.

  XLA reads `XLA_FLAGS` once, when JAX's backend starts, so this must run
  before the first computation. Options the environment already sets keep
  the environment's value.

  Returns:
    Whether the options will take effect (False, with a warning, on a jaxlib
    they were not checked on or when the backend had already started).
  """
  options = conv_options()
  if options is None:
    return False
  current = os.environ.get("XLA_FLAGS", "")
  missing = {name: value for name, value in options.items()
             if f"--{name}=" not in current}
  if not missing:
    return True
  if _backend_started():
    warnings.warn("XLA:CPU convolution settings not applied: JAX's backend"
                  " has already started (set them in XLA_FLAGS before the"
                  f" first computation: {as_flags(missing)})", stacklevel=2)
    return False
  os.environ["XLA_FLAGS"] = f"{current} {as_flags(missing)}".strip()
  return True
