"""Curvature operators (Hessian, generalized Gauss-Newton, empirical Fisher) with batched products, and the algorithms that run
on any such operator: top eigenpairs, spectral radius, trace and Frobenius-norm estimators, the spectral density (SLQ), and any of them over disjoint data batches (data uncertainty)."""
from fastcurv.curvature._operator import CurvatureOperator, as_operator
from fastcurv.curvature.density import SpectralDensity, spectral_density
from fastcurv.curvature.eigen import ConvergenceWarning, spectral_radius, top_eigenvalues
from fastcurv.curvature.estimators import frobenius_sq, quadratic_form, trace
from fastcurv.curvature.fisher import EmpiricalFisher
from fastcurv.curvature.ggn import GGN
from fastcurv.curvature.hessian import Hessian
from fastcurv.curvature.uncertainty import BatchEstimates, disjoint_batches, over_batches

__all__ = [
    "CurvatureOperator",
    "as_operator",
    "Hessian",
    "EmpiricalFisher",
    "GGN",
    "top_eigenvalues",
    "spectral_radius",
    "trace",
    "frobenius_sq",
    "quadratic_form",
    "spectral_density",
    "SpectralDensity",
    "ConvergenceWarning",
    "over_batches",
    "BatchEstimates",
    "disjoint_batches",
]
