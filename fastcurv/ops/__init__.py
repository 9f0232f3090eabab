"""Custom ops (``torch.ops.fastcurv.*``) with a backend chosen per call; see ``fastcurv._backend``."""
from fastcurv.ops.per_example_gram import per_example_gram
from fastcurv.ops.per_example_sqnorm import per_example_sqnorm

__all__ = ["per_example_sqnorm", "per_example_gram"]
