"""The worker pool: one model at a time per long-lived process; a crash or a timeout is a row of the report."""
from __future__ import annotations

import collections
import dataclasses
import gc
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import warnings
from typing import Any, Callable, Sequence

from .pipeline import PipelineOptions, check_pipeline
from .result import DEFAULT_MAX_PARAMS, ModelResult, per_source
from .trace_check import check_model

DEFAULT_TIMEOUT_S = 120.0  # per model: the sweep's default, and where a per-source mapping names neither


# Worker start-up (importing torch, timm and torchvision) is not charged to any model, but a
# worker that cannot even start within this many seconds is an error of the sweep itself. A dead
# worker is seen at once; this bound is only for a live one that never gets ready. Generous: on a
# loaded machine a sweep at `nice 19` took over 300 s to import torch three times in a row (a
# 2-core machine with four other jobs), and the whole sweep stopped for it.
_STARTUP_TIMEOUT_S = 1200.0


def _worker_main(conn: multiprocessing.connection.Connection, options: dict[str, Any]) -> None:
    """A pool worker: import once, then check one model per message until told to stop (None)."""
    # Ctrl-C reaches the whole process group; the parent handles it and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _return_large_blocks()
    import torch

    torch.set_num_threads(options.get("threads", 1))
    warnings.filterwarnings("ignore")
    # the sweep records mode-dependent graphs itself; per-model log lines would bury the progress bar
    logging.getLogger("fxsparse").setLevel(logging.ERROR)
    import timm  # noqa: F401 -- paid once per worker, not per model
    import torchvision  # noqa: F401

    import fxsparse.testing  # noqa: F401

    _warm_up()
    # torch, timm and torchvision are ~500k long-lived objects: moved out of the collector's
    # reach, full collections (triggered often by tracing) stop costing a tenth of a trace
    gc.freeze()
    conn.send(("ready", os.getpid()))
    done = 0
    while True:
        task = conn.recv()
        if task is None:
            return
        spec, changes = (task, None) if isinstance(task, str) else task  # (spec, PipelineOptions changes)
        memory = _StagePeaks()
        if options.get("pipeline") is not None:
            def on_stage(stage: str) -> None:
                memory.enter(stage)
                conn.send(("stage", stage))

            pipeline = dataclasses.replace(options["pipeline"], **changes) if changes else options["pipeline"]
            result = check_pipeline(spec, max_params=options["max_params"], options=pipeline, on_stage=on_stage)
        else:
            result = check_model(spec, numeric=options["numeric"], max_params=options["max_params"])
        result.peak_rss_mb, result.stage_rss_mb = memory.finish()
        result.worker_models_before = done
        conn.send(("result", result))
        done += 1
        rss = _rss_mb("VmRSS")
        max_rss = options.get("max_rss_mb")
        if (options.get("max_tasks") and done >= options["max_tasks"]) or (max_rss and rss and rss > max_rss):
            # a fresh process for the next models: memory a long pipeline run fragments (glibc keeps
            # what a 384-px model's transform freed) is given back
            conn.send(("retire", done))
            return


# glibc's mallopt parameter: allocations of at least this many bytes are mapped on their own and
# given back to the system when freed (glibc.malloc.mmap_threshold)
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_BYTES = 1 << 20


def _return_large_blocks() -> bool:
    """Make every allocation of 1 MB or more its own mapping, returned to the system when freed.

    glibc raises its threshold for that (up to 32 MB) each time a large block is freed, so after
    a while the tensors under 32 MB (a ViT-H layer's weight is 26 MB) come from the heap, and a
    heap gives memory back only from its top: a pipeline stage's freed tensors stayed resident
    and raised the next stage's peak (LRsI on ViT-B/16: 5.0 GB peak and 4.3 GB resident after
    it; with a fixed threshold 3.9 GB and 1.6 GB). True where it was set (glibc).
    """
    try:
        import ctypes

        return bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # not glibc
        return False


def _machine_memory_mb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError, AttributeError):
        return math.inf


def _rss_mb(field: str) -> float | None:
    """This process's resident memory (``VmRSS``) or its peak since the last reset (``VmHWM``), in
    MB; None where /proc is not there (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


class _StagePeaks:
    """The worker's peak resident memory per pipeline stage: the kernel's high-water mark
    (``VmHWM``), reset to the current RSS when a stage starts (``/proc/self/clear_refs``)."""

    def __init__(self) -> None:
        self.stage = "model"  # before the first stage (check_model has none)
        self.peaks: dict[str, float] = {}
        self._reset()

    @staticmethod
    def _reset() -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass

    def _close(self) -> None:
        peak = _rss_mb("VmHWM")
        if peak is not None:
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0.0), round(peak, 1))

    def enter(self, stage: str) -> None:
        self._close()
        self.stage = stage
        self._reset()

    def finish(self) -> tuple[float | None, dict[str, float] | None]:
        self._close()
        if not self.peaks:
            return None, None
        stages = {k: v for k, v in self.peaks.items() if k != "model"} or None
        return max(self.peaks.values()), stages


def _warm_up() -> None:
    """Trace a tiny model once so the first real model's time excludes torch's lazy imports."""
    import torch
    from torch import nn

    import fxsparse

    with torch.device("meta"):
        tiny = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    fxsparse.trace(tiny, torch.randn(1, 3, 8, 8, device="meta"))


class _Worker:
    """One worker process, its pipe, and the model it is working on."""

    def __init__(self, ctx: Any, options: dict[str, Any]):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, options), daemon=True, name="fxsparse-zoo")
        self.process.start()
        child.close()
        self.started = time.monotonic()
        self.ready = False
        self.spec: str | None = None
        self.retry: str | None = None  # why the current model runs a second time, with what change
        self.stage: str | None = None  # the pipeline stage the current model is in
        self.deadline = math.inf
        self.done = 0  # models it returned a result for
        # it has done its max_tasks and is about to send "retire" and exit: give it no model (one
        # sent between its result and its "retire" message would be lost with it)
        self.retiring = False

    def submit(self, spec: str, timeout: float, retry: tuple[dict[str, Any], str] | None = None) -> None:
        self.conn.send((spec, retry[0]) if retry else spec)
        self.spec, self.stage, self.deadline = spec, None, time.monotonic() + timeout
        self.retry = retry[1] if retry else None

    def stop(self, *, kill: bool = False) -> None:
        if not kill and self.process.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                kill = True
            self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()


def sweep(
    specs: Sequence[str],
    *,
    timeout: float | dict[str, float] = DEFAULT_TIMEOUT_S,
    workers: int = 2,
    numeric: bool = False,
    max_params: float | dict[str, float] = DEFAULT_MAX_PARAMS,
    pipeline: PipelineOptions | bool | None = None,
    max_tasks: int | None = None,
    max_rss_mb: float | None = None,
    time_budget: float | None = None,
    progress: bool = True,
    on_result: Callable[[ModelResult], None] | None = None,
) -> list[ModelResult]:
    """Check every spec (see ``check_model``) in ``workers`` processes; results in ``specs`` order.

    A model that takes longer than ``timeout`` seconds (a number, or one per source as
    ``{"torchvision": 3600, "default": 900}``), or whose worker dies, is recorded as
    ``"timeout"`` / ``"crashed"`` and its worker replaced. ``workers=0`` runs everything in this
    process: no isolation and no timeout, but easy to debug. After ``time_budget`` seconds no
    new model is started: the models not reached are left out of the results.

    ``pipeline`` (``True`` or a ``PipelineOptions``) runs ``check_pipeline`` on each model instead
    (``max_params`` is then its budget). ``max_tasks``: a worker is replaced by a fresh process
    after that many models (default: 10 with ``pipeline``, never without), and sooner when its
    resident memory after a model is above ``max_rss_mb`` (default with ``pipeline``: 4096, or a
    quarter of the machine's memory if that is less; memory freed inside a process is not always
    given back: one worker held 19.8 GB after ten models, leaving the next large one too little).
    """
    if pipeline is True:
        pipeline = PipelineOptions()
    pipeline = pipeline or None
    if max_tasks is None and pipeline is not None:
        max_tasks = 10
    if max_rss_mb is None and pipeline is not None:
        max_rss_mb = min(4096.0, _machine_memory_mb() / 4)
    specs = list(dict.fromkeys(specs))  # each model once
    stop_at = time.monotonic() + time_budget if time_budget is not None else math.inf
    bar = _progress_bar(len(specs), progress)
    results: dict[str, ModelResult] = {}

    def record(r: ModelResult) -> None:
        results[r.model] = r
        if on_result:
            on_result(r)
        if bar is not None:
            failed = sum(not x.ok for x in results.values())
            bar.set_postfix_str(f"failed={failed}" + (f" last={r.model}" if not r.ok else ""), refresh=False)
            bar.update(1)

    try:
        if workers <= 0:
            for spec in specs:
                if time.monotonic() >= stop_at:
                    break
                if pipeline is not None:
                    record(check_pipeline(spec, max_params=max_params, options=pipeline))
                else:
                    record(check_model(spec, numeric=numeric, max_params=max_params))
        else:
            options = {"numeric": numeric, "max_params": max_params, "pipeline": pipeline, "max_tasks": max_tasks,
                       "max_rss_mb": max_rss_mb}
            _run_pool(specs, record, timeout=timeout, workers=min(workers, max(len(specs), 1)),
                      options=options, stop_at=stop_at)
    finally:
        if bar is not None:
            bar.close()
    return [results[s] for s in specs if s in results]


def _run_pool(specs: list[str], record: Callable[[ModelResult], None], *, timeout: float | dict[str, float],
              workers: int, options: dict[str, Any], stop_at: float = math.inf) -> None:
    from fxsparse.models import source_of

    def seconds(spec: str) -> float:
        return per_source(timeout, source_of(spec), DEFAULT_TIMEOUT_S)

    ctx = multiprocessing.get_context("spawn")  # fork would copy the parent's threads and state
    pending = collections.deque(specs)
    retries: dict[str, tuple[dict[str, Any], str]] = {}  # spec -> its second try: the changes, and why
    pool = [_Worker(ctx, options) for _ in range(workers)]
    failed_starts = 0
    try:
        while (pending and time.monotonic() < stop_at) or any(w.spec is not None for w in pool):
            for w in pool:
                if w.ready and not w.retiring and w.spec is None and pending and time.monotonic() < stop_at:
                    spec = pending.popleft()
                    w.submit(spec, seconds(spec), retries.get(spec))
            now = time.monotonic()
            deadlines = [w.deadline if w.ready else w.started + _STARTUP_TIMEOUT_S for w in pool]
            wait_s = max(0.0, min(deadlines) - now)
            handles = [w.conn for w in pool] + [w.process.sentinel for w in pool]
            multiprocessing.connection.wait(handles, timeout=min(wait_s, 1.0))
            for i, w in enumerate(pool):
                replace, reason = _poll(w, record, max_tasks=options.get("max_tasks"))
                if not replace and time.monotonic() > (w.deadline if w.ready else w.started + _STARTUP_TIMEOUT_S):
                    replace, reason = True, "timeout"
                if not replace:
                    continue
                if reason == "retired" and w.spec is None:
                    pass  # it did its share of models; a fresh one takes its place
                elif reason == "retired":  # it retired holding a model it never started: not the model's fault
                    pending.appendleft(w.spec)
                elif w.spec is not None:
                    retry = _memory_retry(w, reason, options) if w.spec not in retries else None
                    if retry is not None:
                        retries[w.spec] = retry
                        pending.appendleft(w.spec)
                    else:
                        lost = _lost(w.spec, reason, seconds(w.spec), w.process, stage=w.stage,
                                     pipeline=options.get("pipeline") is not None)
                        lost.retried = w.retry  # the second try died too
                        record(lost)
                    failed_starts = 0
                elif not w.ready:
                    failed_starts += 1
                    if failed_starts >= 3:
                        raise RuntimeError(
                            f"zoo workers fail to start (exit code {w.process.exitcode}); run with "
                            f"workers=0 (--workers 0) to see the error in this process."
                        )
                w.stop(kill=True)
                pool[i] = _Worker(ctx, options)
    finally:
        for w in pool:
            w.stop()


def _poll(w: _Worker, record: Callable[[ModelResult], None], *, max_tasks: int | None = None) -> tuple[bool, str]:
    """Read what worker ``w`` sent; (True, reason) if it died and must be replaced."""
    try:
        while w.conn.poll():
            kind, payload = w.conn.recv()
            if kind == "ready":
                w.ready = True
            elif kind == "stage":
                w.stage = payload
            elif kind == "retire":
                return True, "retired"
            else:
                if w.retry:
                    payload.retried = w.retry
                record(payload)
                w.spec, w.stage, w.deadline, w.retry = None, None, math.inf, None
                w.done += 1
                w.retiring = bool(max_tasks) and w.done >= max_tasks
    except (EOFError, OSError):
        return True, "retired" if w.retiring and w.spec is None else "crashed"
    if not w.process.is_alive():
        return True, "retired" if w.retiring and w.spec is None else "crashed"
    return False, ""


def _memory_retry(w: _Worker, reason: str, options: dict[str, Any]) -> tuple[dict[str, Any], str] | None:
    """The second try of a pipeline model whose worker was SIGKILLed (what the kernel's
    out-of-memory killer sends): on a batch of 1, which halves the activations LRsI's double
    backward keeps (a 384-px XCiT needs over 20 GB at batch 2), and without the eager float copies
    of the masks (a copy of the weights' size: 2.5 GB on ViT-H/14). None when that does not apply."""
    pipeline = options.get("pipeline")
    if reason != "crashed" or pipeline is None or pipeline.batch_size <= 1:
        return None
    w.process.join(1)
    if w.process.exitcode != -signal.SIGKILL:
        return None
    return {"batch_size": 1, "mask_cache": "off"}, (
        f"at batch 1, without the float mask copies: on a batch of {pipeline.batch_size} its worker was "
        f"killed (SIGKILL, most likely out of memory) in stage {w.stage or 'meta-trace'}")


def _lost(spec: str, reason: str, timeout: float, process: Any, *, stage: str | None = None,
          pipeline: bool = False) -> ModelResult:
    from fxsparse.models import source_of

    if reason == "timeout":
        error = f"still running after {timeout:g} s; the worker was killed"
    else:
        process.join(1)  # the pipe closes a moment before the process is reaped: wait for its exit code
        code = process.exitcode
        how = f"signal {-code} ({_signal_name(-code)})" if code is not None and code < 0 else f"exit code {code}"
        error = f"the worker process died ({how})"
    if stage:
        error += f" (in stage {stage})"
    r = ModelResult(model=spec, source=source_of(spec), status=reason, error_type=reason, error=error)
    if pipeline:
        r.pipeline, r.pipeline_stage, r.pipeline_error = "error", stage or "meta-trace", f"{reason}: {error}"
        r.pipeline_failures = {r.pipeline_stage: r.pipeline_error}
    return r


def _signal_name(num: int) -> str:
    try:
        return signal.Signals(num).name
    except ValueError:
        return "?"


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="model", dynamic_ncols=True, smoothing=0.05)


