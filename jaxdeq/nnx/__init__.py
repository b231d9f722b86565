"""Flax NNX layers: equilibrium cells and the `DEQ` module."""

from jaxdeq._src.nnx.cells import ResNetCell
from jaxdeq._src.nnx.cells import TanhCell
from jaxdeq._src.nnx.conv import conv2d_same
from jaxdeq._src.nnx.deq import BackwardProbe
from jaxdeq._src.nnx.deq import DEQ
from jaxdeq._src.nnx.deq import DEQStats
from jaxdeq._src.nnx.deq import SolverStatsVariable

__all__ = (
    "BackwardProbe",
    "conv2d_same",
    "DEQ",
    "DEQStats",
    "ResNetCell",
    "SolverStatsVariable",
    "TanhCell",
)
