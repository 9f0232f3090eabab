"""Layer rules: one file per layer family, each rule registered for the module types it serves.

* ``registry.py``: ``@register(nn.X)`` and the look-up (fast rule, else why not).
* ``base.py``: :class:`CapturedLayer`, the interface every rule implements.
* ``linear.py``, ``conv.py``, ``conv_transpose.py``, ``embedding.py``, ``embedding_bag.py``, ``norm.py``,
  ``attention.py``, ``recurrent.py``,
  ``instance_norm.py``: fast exact rules.
* ``functional.py``: a module without a registered rule whose forward uses its parameters through
  ``F.linear`` / ``addmm`` / ``F.embedding`` / ``F.layer_norm`` / ``F.rms_norm`` / ``F.batch_norm`` / a
  broadcast ``x * w`` or ``x + w`` gets those rules' math (the other parameters: the generic rule).
* ``generic.py``: the exact materialized fallback for any other module holding parameters.

Adding a layer type: a new file here with a registered rule, imported below.
"""
from fastcurv.layers.registry import register, registered_types, rule_for
from fastcurv.layers.base import CapturedLayer, Record, describe
from fastcurv.layers import linear, conv, embedding, norm, recurrent  # noqa: F401  (registers the fast rules)
from fastcurv.layers import conv_transpose, instance_norm, embedding_bag  # noqa: F401
from fastcurv.layers import attention  # noqa: F401  (nn.MultiheadAttention, transformer layers)
from fastcurv.layers.generic import GenericLayer
from fastcurv.layers.functional import FunctionalLayer

__all__ = ["register", "rule_for", "registered_types", "CapturedLayer", "Record", "GenericLayer", "FunctionalLayer", "describe"]
