"""Per-epoch training history: one dict of numbers per epoch."""
from __future__ import annotations

import math

# Keys whose values are wall-clock measurements: they differ between otherwise identical runs.
TIMING_KEYS = ("time_per_step", "epoch_time", "wall_time")


class History:
    """A list of per-epoch records (dicts of floats/ints/bools), with column access.

    Record keys written by :func:`fastcurv.train.fit`: ``epoch``, ``lr``, ``regularizing``,
    ``train_loss``, ``test_loss``, ``gap`` (test loss - train loss), ``train_accuracy`` /
    ``test_accuracy`` (classification) or ``train_error`` / ``test_error`` (regression, the MSE),
    ``param_norm`` (L2 norm of all parameters), ``time_per_step`` (seconds), ``epoch_time``, ``wall_time``
    (training seconds so far), ``steps`` (steps so far) and, when
    asked for, ``top_eigenvalue`` and ``fisher_trace``, and with ``fit(measure_loss=...)``
    ``measure_train_loss``, ``measure_test_loss`` and ``measure_gap`` (that loss; ``top_eigenvalue`` is
    then of that loss too).
    """

    def __init__(self, records: list[dict] | None = None):
        self.records: list[dict] = [dict(r) for r in (records or [])]

    def append(self, record: dict) -> None:
        self.records.append(dict(record))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]

    def __iter__(self):
        return iter(self.records)

    def column(self, key: str) -> list:
        """The values of ``key`` per epoch (``nan`` where an epoch lacks it)."""
        if self.records and not any(key in r for r in self.records):
            raise KeyError(f"history has no column {key!r}; columns: {sorted(self.columns())}")
        return [r.get(key, math.nan) for r in self.records]

    def columns(self) -> set[str]:
        return set().union(*self.records) if self.records else set()

    @property
    def last(self) -> dict:
        if not self.records:
            raise IndexError("history is empty: no epoch has finished")
        return self.records[-1]

    def without_timing(self) -> list[dict]:
        """The records minus wall-clock keys (to compare runs for equality)."""
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in self.records]

    def to_list(self) -> list[dict]:
        return [dict(r) for r in self.records]

    @classmethod
    def from_list(cls, records: list[dict]) -> "History":
        return cls(records)

    def __repr__(self) -> str:
        return f"History({len(self)} epochs, columns={sorted(self.columns())})"
