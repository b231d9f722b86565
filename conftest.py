"""Suite-wide settings: strict promotion, and cheaper compilation.

Every test and doctest runs under `jax_numpy_rank_promotion="raise"` and
`jax_numpy_dtype_promotion="strict"`, as optimistix's and equinox's suites
do: a library that broadcasts or promotes implicitly breaks its users'
strict code.

On 2 CPU cores compilation is most of the suite's time (measured: 390 s of
XLA compilation in ~620 s of CPU for the end-to-end tests and docs), so:

- a persistent compilation cache in a temporary directory, shared by the
  xdist workers and the processes they start (through the environment),
  compiles each program once per run: the end-to-end tests build the same
  training steps afresh many times (it saved 120 s of compilation there);
- XLA's LLVM backend runs at optimisation level 0 (one MNIST training test
  and five adjoint tests: 36 s -> 26 s). That changes how fast the compiled
  code runs, not what it computes; speed is measured by benchmarks/, which
  never run with these settings.

`JAXDEQ_TEST_PLAIN=1` runs the suite with neither, as a user's code runs.
"""

import gc
import os
import shutil
import tempfile

import jax
import pytest

_CACHE_VARIABLE = "JAX_COMPILATION_CACHE_DIR"
# Set by the process that creates the directory (the xdist controller, or
# the only process without xdist), which removes it at the end.
_OWNER_VARIABLE = "JAXDEQ_TEST_CACHE_OWNER"
_FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
# jax options (each also read from its upper-case environment variable) and
# the suite's defaults. A size limit turns on the cache's file lock: workers
# that compile the same program at once never read a half-written entry.
_CACHE_OPTIONS = {"jax_persistent_cache_min_compile_time_secs": 0.1,
                  "jax_compilation_cache_max_size": 8 << 30}


def pytest_configure(config):
  if os.environ.get("JAXDEQ_TEST_PLAIN"):
    return
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_backend_optimization_level" not in flags:
    # Read when the backend starts (the first computation), not at import.
    os.environ["XLA_FLAGS"] = f"{flags} {_FAST_COMPILE_FLAG}".strip()
  if _CACHE_VARIABLE not in os.environ:
    os.environ[_CACHE_VARIABLE] = tempfile.mkdtemp(prefix="jaxdeq-tests-jit-")
    os.environ[_OWNER_VARIABLE] = str(os.getpid())
  jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_VARIABLE])
  # The environment reaches processes started from here (xdist workers,
  # the command-line tests); this process read its settings at import.
  for name, default in _CACHE_OPTIONS.items():
    value = os.environ.setdefault(name.upper(), str(default))
    jax.config.update(name, type(default)(value))


def pytest_unconfigure(config):
  if os.environ.get(_OWNER_VARIABLE) == str(os.getpid()):
    shutil.rmtree(os.environ[_CACHE_VARIABLE], ignore_errors=True)


# Every compiled program keeps memory mappings of its own (XLA:CPU's code
# and data), and a long-lived worker compiles thousands of programs: past
# the kernel's vm.max_map_count (65530 by default) the next mapping fails
# and XLA crashes (seen: segfaults and aborts in compilation late in the
# suite). After a test, a worker over this many mappings (a test adds a few
# thousand at most) drops its compiled programs; later tests reload theirs
# from the persistent cache. Counting them takes milliseconds.
_MAX_MAPPINGS = 50_000


def _mappings() -> int:
  try:
    with open("/proc/self/maps") as maps:
      return sum(1 for _ in maps)
  except OSError:  # no /proc: nothing to count
    return 0


@pytest.fixture(autouse=True)
def bounded_memory_mappings():
  yield
  if _mappings() > _MAX_MAPPINGS:
    jax.clear_caches()
    gc.collect()


@pytest.fixture(autouse=True)
def strict_promotion():
  """Fails on implicit rank or dtype promotion, in the library and tests."""
  with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
    yield
