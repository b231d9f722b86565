"""Shared fixtures: float64 where precision matters (strict promotion for
every test comes from the top-level conftest.py)."""

import jax
import pytest


@pytest.fixture
def x64():
  """Runs the test with 64-bit floats enabled."""
  with jax.enable_x64(True):
    yield


@pytest.fixture(params=["float32", "float64"])
def dtype(request):
  """A floating dtype; float64 runs with x64 enabled."""
  if request.param == "float64":
    with jax.enable_x64(True):
      yield jax.numpy.float64
  else:
    yield jax.numpy.float32
