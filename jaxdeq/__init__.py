"""jaxdeq: fixed-point solvers, implicit differentiation and DEQ layers in JAX."""

from jaxdeq._src.adjoint import AbstractAdjoint
from jaxdeq._src.adjoint import BackwardStats
from jaxdeq._src.adjoint import backward_probe
from jaxdeq._src.adjoint import ImplicitAdjoint
from jaxdeq._src.adjoint import NeumannAdjoint
from jaxdeq._src.adjoint import PhantomAdjoint
from jaxdeq._src.adjoint import SHINEAdjoint
from jaxdeq._src.adjoint import UnrolledAdjoint
from jaxdeq._src.fixed_point import fixed_point
from jaxdeq._src.linear_solve import AbstractLinearSolver
from jaxdeq._src.linear_solve import DenseLU
from jaxdeq._src.linear_solve import GMRES
from jaxdeq._src.regularizers import jacobian_penalty
from jaxdeq._src.regularizers import spectral_radius
from jaxdeq._src.solution import catch_failures
from jaxdeq._src.solution import FixedPointError
from jaxdeq._src.solution import Solution
from jaxdeq._src.solution import SolverStats
from jaxdeq._src.solution import Status
from jaxdeq._src.solvers.anderson import Anderson
from jaxdeq._src.solvers.anderson import AndersonState
from jaxdeq._src.solvers.base import FixedPointSolver
from jaxdeq._src.solvers.broyden import Broyden
from jaxdeq._src.solvers.broyden import BroydenState
from jaxdeq._src.solvers.fixed_point_iteration import FixedPointIteration
from jaxdeq._src.solvers.fixed_point_iteration import FixedPointIterationState
from jaxdeq._src.solvers.newton import Newton
from jaxdeq._src.solvers.newton import NewtonState

__version__ = "0.1.0"

__all__ = (
    "AbstractAdjoint",
    "Anderson",
    "AndersonState",
    "BackwardStats",
    "backward_probe",
    "Broyden",
    "BroydenState",
    "catch_failures",
    "FixedPointError",
    "FixedPointIteration",
    "FixedPointIterationState",
    "FixedPointSolver",
    "fixed_point",
    "AbstractLinearSolver",
    "DenseLU",
    "GMRES",
    "ImplicitAdjoint",
    "jacobian_penalty",
    "NeumannAdjoint",
    "Newton",
    "NewtonState",
    "PhantomAdjoint",
    "SHINEAdjoint",
    "Solution",
    "SolverStats",
    "spectral_radius",
    "Status",
    "UnrolledAdjoint",
)
