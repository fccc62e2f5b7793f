"""Equinox models of homogeneous networks; each exposes `.layers` and `.hidden_units()`."""

from ._activations import (
    AbstractActivation as AbstractActivation,
    AbstractPiecewiseLinear as AbstractPiecewiseLinear,
    LeakyReLU as LeakyReLU,
    Linear as Linear,
    ReLU as ReLU,
    Tanh as Tanh,
    as_activation as as_activation,
)
from ._base import AbstractModel as AbstractModel
from ._conv import ConvNet as ConvNet
from ._factorization import MatrixFactorization as MatrixFactorization
from ._mlp import MLP as MLP
from ._two_layer import TwoLayerReLU as TwoLayerReLU

__all__ = [
    "MLP",
    "AbstractActivation",
    "AbstractModel",
    "AbstractPiecewiseLinear",
    "ConvNet",
    "LeakyReLU",
    "Linear",
    "MatrixFactorization",
    "ReLU",
    "Tanh",
    "TwoLayerReLU",
    "as_activation",
]
