"""fastcurv: fast per-example gradient norms, curvature contractions and flat-minima regularizers."""
from fastcurv import capture, ops, reference  # capture: callable module, fastcurv.capture(model)
from fastcurv.capture import Capture, CapturedLayer
from fastcurv._backend import BackendUnavailable, available

__version__ = "0.1.0"

__all__ = ["capture", "Capture", "CapturedLayer", "ops", "reference", "available", "BackendUnavailable", "__version__"]
