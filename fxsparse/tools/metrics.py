"""``metrics.jsonl``: one JSON object per line, appended as training goes.

Record types (the ``type`` key):

===============  =============================================================================
``step``         ``epoch``, ``step`` (optimizer steps done), ``loss`` (the training loss, smoothed
                 labels included), ``train_acc`` (of the batch), ``lr``, ``gates`` ({group:
                 value}), ``label_smoothing``, ``step_time`` (seconds since the previous step)
``event``        a ghost removal: ``event``, ``group``, ``step``, ``fraction``, ``parameters``, ...
``removal``      with ``[training] eval_at_removal`` / ``bn_recalibrate``: ``group``, ``step``,
                 ``val_loss_before`` / ``val_acc_before`` / ``..._after`` (``..._removed``,
                 ``bn_recalibrated`` with ``bn_recalibrate``)
``epoch``        ``epoch``, ``step``, ``train_loss`` and ``train_acc`` (means over the epoch),
                 ``val_loss``, ``val_acc`` (with validation on), ``lr``, ``epoch_time``, ``elapsed``
``mask_update``  a ``[dynamic]`` mask update (RigL/SET/gmp): ``step``, ``fraction``, ``method``,
                 ``drop_fraction`` (rigl/set) or ``sparsity`` (gmp), ``dropped``, ``grown``,
                 ``kept``, ``total`` and ``layers`` ({parameter: {``kept``, ``dropped``,
                 ``grown``}}): the churn
``precise_bn``   with ``[training] precise_bn = N``: ``step``, ``batches``, ``test_loss_before``,
                 ``test_acc_before``, ``val_loss_before``, ``val_acc_before`` (before BatchNorm
                 statistics were re-estimated at the end)
``test``         at the end: ``test_loss``, ``test_acc``, ``val_loss``, ``val_acc``
===============  =============================================================================

Epochs count from 1 in records (``epoch = 1`` is the first). Lines are flushed as they are
written, so a killed run keeps what it logged; a resumed run cuts the file back to the records
its checkpoint had seen and logs the replayed steps again.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

__all__ = ["MetricsLog", "read_metrics"]


def read_metrics(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, Any]]:
    """The records of a metrics file (at most ``limit``); a last line cut short by a kill is dropped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(records) >= limit:
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a partial last line
    return records


class MetricsLog:
    """Append-only JSON-lines log, also kept in memory (``records``) for plots and summaries.

    Args:
        path: the file.
        keep: ``None`` starts a new file; an int keeps that many records of an existing one
            (resuming from a checkpoint taken when the log held ``keep`` records).
    """

    def __init__(self, path: str | os.PathLike, keep: int | None = None):
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        if keep is not None and self.path.exists():
            self.records = read_metrics(self.path, limit=keep)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", encoding="utf-8") as f:  # rewrite: drops what came after the checkpoint
            f.writelines(json.dumps(r) + "\n" for r in self.records)
        self._file = open(self.path, "a", encoding="utf-8")

    def __len__(self) -> int:
        return len(self.records)

    def write(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def extend(self, records: Iterable[dict[str, Any]]) -> None:
        for r in records:
            self.write(r)

    def sync(self) -> None:
        """Flush to the disk (called before each checkpoint, which records ``len(self)``)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("type") == kind]

    def close(self) -> None:
        self._file.close()
