"""Problem families: the data, loss, models and metrics of each experiment, defined once.

`flowsim sweep` (`[problem] kind = ...`), `flowsim reproduce` and the benchmarks build their
problems here. A problem is an `AbstractProblem`: `problem.loss`, `problem.init(key)` (a model),
`problem.inputs` and `problem.metrics(models)`.

| family | function | setting |
|---|---|---|
| `mlp` | `mlp(sizes, n=...)` | fully connected, Gaussian / teacher / separable data |
| `factorization` | `factorization(shape, rank, spectrum)` | ½‖UVᵀ − M‖², Du-Hu-Lee Thm 3.1 |
| `conv` | `conv(in_shape, channels, out_features, n=...)` | shared filters, Thm 2.3 |
| `two_layer_relu` | `two_layer_relu(dim, width, labels)` | orthogonal inputs, Boursier et al. |
| `deep_linear_logistic` | `deep_linear_logistic(sizes, n=...)` | separable data, Ji-Telgarsky |

A user's own problem subclasses `AbstractProblem`; a sweep loads it from a factory named
`"package.module:function"` (`flowsim.problems.user`).
"""

from . import user as user
from ._base import AbstractProblem as AbstractProblem, Panel as Panel
from .conv import ConvProblem as ConvProblem, conv as conv
from .deep_linear_logistic import (
    DeepLinearLogisticProblem as DeepLinearLogisticProblem,
    deep_linear_logistic as deep_linear_logistic,
)
from .factorization import (
    FactorizationProblem as FactorizationProblem,
    factorization as factorization,
)
from .mlp import MLPProblem as MLPProblem, mlp as mlp
from .two_layer import TwoLayerReLUProblem as TwoLayerReLUProblem, two_layer_relu as two_layer_relu

FAMILIES = {
    "mlp": mlp,
    "factorization": factorization,
    "conv": conv,
    "two_layer_relu": two_layer_relu,
    "deep_linear_logistic": deep_linear_logistic,
}
"""Family name (the sweep's `[problem] kind`) -> the function that builds a problem."""

__all__ = [
    "FAMILIES",
    "AbstractProblem",
    "ConvProblem",
    "DeepLinearLogisticProblem",
    "FactorizationProblem",
    "MLPProblem",
    "Panel",
    "TwoLayerReLUProblem",
    "conv",
    "deep_linear_logistic",
    "factorization",
    "mlp",
    "two_layer_relu",
    "user",
]
