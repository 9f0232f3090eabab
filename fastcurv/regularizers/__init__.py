"""Regularizers as drop-in loss terms: construct, track the forward if needed, call, add to the loss."""
from fastcurv.regularizers.curvature import Curvature
from fastcurv.regularizers.fisher import FisherNorm, fisher_norm
from fastcurv.regularizers.metric import Metric, SelectiveL2
from fastcurv.regularizers.norms import L2, GroupLasso, SpectralNorm
from fastcurv.regularizers.subbatch import SubBatchGradNorm

__all__ = [
    "Curvature",
    "fisher_norm",
    "FisherNorm",
    "SubBatchGradNorm",
    "Metric",
    "SelectiveL2",
    "L2",
    "SpectralNorm",
    "GroupLasso",
]
