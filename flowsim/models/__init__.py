"""Equinox models of homogeneous networks; each exposes `.layers` and `.hidden_units()`."""

from ._base import AbstractModel as AbstractModel
from ._conv import ConvNet as ConvNet
from ._factorization import MatrixFactorization as MatrixFactorization
from ._mlp import MLP as MLP
from ._two_layer import TwoLayerReLU as TwoLayerReLU

__all__ = ["MLP", "AbstractModel", "ConvNet", "MatrixFactorization", "TwoLayerReLU"]
