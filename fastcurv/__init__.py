"""fastcurv: fast per-example gradient norms, curvature contractions and flat-minima regularizers."""
from fastcurv import ops, reference
from fastcurv._backend import BackendUnavailable, available

__version__ = "0.1.0"

__all__ = ["ops", "reference", "available", "BackendUnavailable", "__version__"]
