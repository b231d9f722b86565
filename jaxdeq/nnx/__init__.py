"""Flax NNX layers: equilibrium cells and the `DEQ` module."""

from jaxdeq._src.nnx.cells import MultiscaleCell
from jaxdeq._src.nnx.cells import ResNetCell
from jaxdeq._src.nnx.cells import TanhCell
from jaxdeq._src.nnx.conv import conv2d_same
from jaxdeq._src.nnx.deq import BackwardProbe
from jaxdeq._src.nnx.deq import DEQ
from jaxdeq._src.nnx.deq import DEQStats
from jaxdeq._src.nnx.deq import JacobianPenaltyVariable
from jaxdeq._src.nnx.deq import SolverStatsVariable
from jaxdeq._src.nnx.stabilizers import CellNormalization
from jaxdeq._src.nnx.stabilizers import DropoutKey
from jaxdeq._src.nnx.stabilizers import SpectralVector
from jaxdeq._src.nnx.stabilizers import VariationalDropout
from jaxdeq._src.nnx.stabilizers import WeightScale

__all__ = (
    "BackwardProbe",
    "CellNormalization",
    "conv2d_same",
    "DEQ",
    "DEQStats",
    "DropoutKey",
    "JacobianPenaltyVariable",
    "MultiscaleCell",
    "ResNetCell",
    "SolverStatsVariable",
    "SpectralVector",
    "TanhCell",
    "VariationalDropout",
    "WeightScale",
)
