"""Which rule serves which module: the map from module types to layer rules.

    @register(nn.Linear)
    class LinearLayer(LinearMapLayer): ...

A rule is used for a module whose type is one of the registered types, or a subclass of one that
keeps its ``forward`` (a subclass that overrides ``forward`` computes something else, so it falls
to the generic rule). Adding a layer type is a one-file change: a new file in ``fastcurv/layers``
with a registered rule, imported by ``fastcurv/layers/__init__.py``.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

__all__ = ["register", "rule_for", "registered_types"]

_RULES: dict[type, type] = {}


def register(*module_types: type):
    """Class decorator: the decorated rule serves ``module_types`` (exactly, with their stock forward)."""
    if not module_types:
        raise TypeError("register() needs at least one module type")

    def decorate(rule):
        for t in module_types:
            if t in _RULES and _RULES[t] is not rule:
                raise ValueError(f"fastcurv.layers: {t.__name__} already has the rule {_RULES[t].__name__}")
            _RULES[t] = rule
        rule.module_types = tuple(rule.module_types) + tuple(module_types)
        return rule

    return decorate


def rule_for(module: nn.Module) -> tuple[Optional[type], str]:
    """``(rule class, "")`` for a module with a fast rule, else ``(None, why not)``."""
    for base in type(module).__mro__:
        rule = _RULES.get(base)
        if rule is None:
            continue
        if type(module).forward is not base.forward:
            return None, f"{type(module).__name__} overrides the forward of {base.__name__}"
        reason = getattr(rule, "not_supported_reason", None)
        why = reason(module) if reason is not None else ""
        if why:
            return None, why
        return rule, ""
    return None, f"no fast rule for {type(module).__name__}"


def registered_types() -> tuple[type, ...]:
    return tuple(_RULES)
