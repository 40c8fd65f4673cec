"""One row of a zoo report (``ModelResult``) and the helpers every stage uses to record an error."""
from __future__ import annotations

import collections.abc
import dataclasses
import re
from dataclasses import dataclass
from typing import Any

SOURCES = ("timm", "torchvision", "all")
DEFAULT_MAX_PARAMS = 30_000_000
ERROR_CHARS = 300  # error messages are cut to this length in the report


@dataclass
class ModelResult:
    """What the sweep recorded about one model (one row of the report)."""

    model: str  # the MODEL spec: a timm name or tv:NAME
    source: str
    status: str  # "ok", "error" (an exception), "timeout" or "crashed" (the worker died)
    stage: str | None = None  # where it failed: "build" or "trace"
    error_type: str | None = None
    error: str | None = None  # first line of the message
    params: int | None = None
    nodes: int | None = None
    build_s: float | None = None
    trace_s: float | None = None  # wall time of fxsparse.trace on the meta device
    trace_cpu_s: float | None = None  # CPU time of the same call (less noisy on a shared machine)
    mode_dependent: bool | None = None
    # --numeric: "equal" (bit-identical), "close" (within rtol=1e-5, atol=1e-6), "mismatch",
    # "error", or "skipped" (too many parameters, or the meta trace failed); None when not asked
    numeric: str | None = None
    numeric_detail: str | None = None
    numeric_s: float | None = None
    # --pipeline: "ok" (every stage passed), "error" (a stage failed; also a timeout or a crash
    # during the pipeline), or "skipped" (over the parameter budget); None when not asked
    pipeline: str | None = None
    pipeline_stage: str | None = None  # the first stage that failed (or the one a dead worker was in)
    pipeline_error: str | None = None  # "ErrorType: first line" of that failure
    pipeline_cause: str | None = None  # the innermost exception it chains to, when that says more
    pipeline_failures: dict[str, str] | None = None  # every failed stage (mask methods go on after one fails)
    pipeline_detail: str | None = None  # why it was skipped
    pipeline_s: float | None = None
    stage_s: dict[str, float] | None = None  # seconds per stage
    input_size: list[int] | None = None  # C, H, W of the batch the pipeline ran on
    ghosts: list[str] | None = None  # the ghost groups the tost transform added
    identity: str | None = None  # gates at identity vs the mask-only graph: "equal" or "close"
    exported: str | None = None  # exported model vs the final graph: "equal" or "close"
    # the worker process's peak resident memory (MB) while it checked this model, and per stage
    # (Linux only; it includes what the worker held before the model started)
    peak_rss_mb: float | None = None
    stage_rss_mb: dict[str, float] | None = None
    worker_models_before: int | None = None  # models its worker had checked before it (0: a fresh process)
    retried: str | None = None  # how and why it ran a second time (a worker killed for memory: batch 1)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        d["ok"] = self.ok
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ModelResult":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def per_source(value: float | collections.abc.Mapping[str, float], source: str, default: float) -> float:
    """A setting that may differ per model source: ``value`` itself, or its entry for ``source``
    (else its ``"default"``, else ``default``) when it is a mapping."""
    if isinstance(value, collections.abc.Mapping):
        return value.get(source, value.get("default", default))
    return value


def budget_for(max_params: float | collections.abc.Mapping[str, float], source: str) -> float:
    """The parameter budget of a model from ``source`` (``per_source``; ``DEFAULT_MAX_PARAMS`` when a
    mapping names neither the source nor a default)."""
    return per_source(max_params, source, DEFAULT_MAX_PARAMS)


def bare(spec: str) -> str:
    return spec[3:] if spec.startswith("tv:") else spec


def first_line(e: BaseException | str) -> str:
    """The message's first line, with installed packages' paths made relative (timm/models/...)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    first = _SITE_PACKAGES.sub("", lines[0]) if lines else type(e).__name__
    return first if len(first) <= ERROR_CHARS else first[: ERROR_CHARS - 3] + "..."


_SITE_PACKAGES = re.compile(r"[^\s`'\"]*[/\\](?:site|dist)-packages[/\\]")

