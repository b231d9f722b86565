"""Shared fixtures: float64 where precision matters, strict dtype promotion."""

import jax
import pytest


@pytest.fixture
def x64():
  """Runs the test with 64-bit floats enabled."""
  with jax.enable_x64(True):
    yield


@pytest.fixture
def strict_promotion():
  """Fails on implicit dtype promotion inside the library."""
  with jax.numpy_dtype_promotion("strict"):
    yield
