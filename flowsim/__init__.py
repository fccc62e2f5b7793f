"""flowsim: high-precision gradient flow and gradient descent on homogeneous networks.

Importing flowsim enables JAX's float64 mode (`jax_enable_x64`): every array flowsim creates is
float64. Set ``FLOWSIM_FLOAT32=1`` before the import to opt out.
"""

import importlib.metadata

from . import (
    _precision,  # noqa: F401  (the float64 switch: must run first)
    data as data,
    init as init,
    invariants as invariants,
    losses as losses,
    models as models,
    problems as problems,
    schedules as schedules,
    sweep as sweep,
)
from ._cache import enable_compilation_cache as enable_compilation_cache
from ._chebyshev import RKC2 as RKC2
from ._compare import (
    DiscretizationError as DiscretizationError,
    discretization_error as discretization_error,
    modified_flow_loss as modified_flow_loss,
)
from ._descent import DivergenceWarning as DivergenceWarning, gradient_descent as gradient_descent
from ._estimate import estimate_error as estimate_error
from ._exact.solve import Events as Events
from ._flow import gradient_flow as gradient_flow
from ._precision import PrecisionWarning as PrecisionWarning
from ._results import (
    RESULTS as RESULTS,
    FlowFailed as FlowFailed,
    FlowWarning as FlowWarning,
)
from ._rosenbrock import ROS34PW2 as ROS34PW2, Rodas5P as Rodas5P
from ._spectral import sharpness as sharpness
from ._trajectory import Trajectory as Trajectory
from .kinks import (
    AutoKinks as AutoKinks,
    ExactKinks as ExactKinks,
    KinksWarning as KinksWarning,
    SmoothKinks as SmoothKinks,
)

try:
    __version__ = importlib.metadata.version("flowsim")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"
