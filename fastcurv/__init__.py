"""fastcurv: fast per-example gradient norms, curvature contractions and flat-minima regularizers."""
from fastcurv import capture, ops, reference  # capture: callable module, fastcurv.capture(model)
from fastcurv._backend import BackendUnavailable, available
from fastcurv.capture import Capture, CapturedLayer
from fastcurv import curvature, losses, metrics, regularizers  # noqa: E402  (need capture/ops first)
from fastcurv import data, train  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "capture", "Capture", "CapturedLayer", "ops", "reference", "curvature", "metrics", "regularizers",
    "losses", "data", "train", "available", "BackendUnavailable", "__version__",
]
