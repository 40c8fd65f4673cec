"""The zoo sweep: trace every timm / torchvision classification model and report what broke.

Each model is built on the meta device (``fxsparse.models.create(spec, device="meta")``) and
traced with ``fxsparse.trace``; nothing is computed, so the whole timm zoo takes minutes. With
``numeric=True`` the models up to ``max_params`` parameters are also built on CPU with random
weights and the traced graph's eval-mode output is compared with the module's.

Models run in a small pool of long-lived worker processes (importing torch and timm costs
seconds, so one process per model would dominate the sweep). A worker that crashes or runs past
the per-model timeout is killed and replaced, and the model it was on is recorded as
``"crashed"`` / ``"timeout"``: one bad model never stops the sweep.

With ``pipeline=True`` (``fxsparse zoo --pipeline``) each model within ``max_params`` goes
through what a user of the ``tost`` recipe does, on CPU with random weights and a batch of 2 at
the smallest input size the model accepts (``check_pipeline``): trace, every mask method that
needs no training, ``fxsparse.transform`` with the shipped recipe (LRsI shortened), SGD steps at
every gate value, the equivalence of the identity gates with the mask-only graph, every removal,
``export`` loaded strict into a fresh instance, and its equivalence with the final graph. The
first stage that fails is recorded with its error; a worker that dies or times out is recorded
with the stage it was in.

``sweep(specs)`` returns one ``ModelResult`` per model; ``write_report`` writes them as JSON
plus a markdown summary beside it.

One module per concern: ``result`` (a report's row), ``trace_check`` (the model lists and the
trace check of one model), ``pipeline`` (the tost pipeline on one model), ``pool`` (the worker
processes and ``sweep``), ``report`` (JSON, markdown and the resume log).
"""
from .pipeline import GATE_VALUES, MASK_METHODS, PIPELINE_STAGES, PipelineCheckFailed, PipelineOptions, check_pipeline
from .pool import sweep
from .report import (
    append_log,
    environment,
    error_key,
    load_report,
    pipeline_error_key,
    read_log,
    render_markdown,
    summarize,
    summarize_pipeline,
    write_report,
)
from .result import DEFAULT_MAX_PARAMS, SOURCES, ModelResult
from .trace_check import check_model, list_specs, select

__all__ = [
    "ModelResult",
    "list_specs",
    "select",
    "check_model",
    "check_pipeline",
    "PipelineOptions",
    "PipelineCheckFailed",
    "PIPELINE_STAGES",
    "MASK_METHODS",
    "GATE_VALUES",
    "DEFAULT_MAX_PARAMS",
    "SOURCES",
    "sweep",
    "summarize",
    "summarize_pipeline",
    "error_key",
    "pipeline_error_key",
    "environment",
    "write_report",
    "render_markdown",
    "load_report",
    "append_log",
    "read_log",
]
