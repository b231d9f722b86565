"""Strict promotion for the whole suite: tests and doctests alike.

Every test and doctest runs under `jax_numpy_rank_promotion="raise"` and
`jax_numpy_dtype_promotion="strict"`, as optimistix's and equinox's suites
do: a library that broadcasts or promotes implicitly breaks its users'
strict code.
"""

import jax
import pytest


@pytest.fixture(autouse=True)
def strict_promotion():
  """Fails on implicit rank or dtype promotion, in the library and tests."""
  with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
    yield
