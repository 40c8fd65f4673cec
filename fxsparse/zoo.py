"""The zoo sweep: trace every timm / torchvision classification model and report what broke.

Each model is built on the meta device (``fxsparse.models.create(spec, device="meta")``) and
traced with ``fxsparse.trace``; nothing is computed, so the whole timm zoo takes minutes. With
``numeric=True`` the models up to ``max_params`` parameters are also built on CPU with random
weights and the traced graph's eval-mode output is compared with the module's.

Models run in a small pool of long-lived worker processes (importing torch and timm costs
seconds, so one process per model would dominate the sweep). A worker that crashes or runs past
the per-model timeout is killed and replaced, and the model it was on is recorded as
``"crashed"`` / ``"timeout"``: one bad model never stops the sweep.

``sweep(specs)`` returns one ``ModelResult`` per model; ``write_report`` writes them as JSON
plus a markdown summary beside it.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
import fnmatch
import gc
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import platform
import re
import signal
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = [
    "ModelResult",
    "list_specs",
    "select",
    "check_model",
    "sweep",
    "summarize",
    "write_report",
    "render_markdown",
    "load_report",
]

SOURCES = ("timm", "torchvision", "all")
DEFAULT_MAX_PARAMS = 30_000_000
# Worker start-up (importing torch, timm and torchvision) is not charged to any model, but a
# worker that cannot even start within this many seconds is an error of the sweep itself.
_STARTUP_TIMEOUT_S = 300.0
_ERROR_CHARS = 300  # error messages are cut to this length in the report


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


# --------------------------------------------------------------------------- model lists
def list_specs(source: str = "timm", *, filter: str | None = None, limit: int | None = None) -> list[str]:
    """The MODEL specs a sweep covers: timm names and/or ``tv:NAME`` for torchvision classifiers.

    ``filter`` is a glob matched against the name with and without the ``tv:`` prefix
    (``"resnet*"`` selects both timm's and torchvision's ResNets); ``limit`` keeps the first N.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}; got {source!r}")
    specs: list[str] = []
    if source in ("timm", "all"):
        import timm

        specs += timm.list_models()
    if source in ("torchvision", "all"):
        import torchvision

        # module=torchvision.models lists the classification models only (no detection etc.)
        specs += [f"tv:{n}" for n in torchvision.models.list_models(module=torchvision.models)]
    return select(specs, filter=filter, limit=limit)


def select(specs: Sequence[str], *, filter: str | None = None, limit: int | None = None) -> list[str]:
    """``specs`` matching the glob ``filter`` (with or without a ``tv:`` prefix), the first ``limit``."""
    specs = list(specs)
    if filter:
        specs = [s for s in specs if fnmatch.fnmatchcase(s, filter) or fnmatch.fnmatchcase(_bare(s), filter)]
    if limit is not None:
        specs = specs[: max(limit, 0)]
    return specs


def _bare(spec: str) -> str:
    return spec[3:] if spec.startswith("tv:") else spec


# --------------------------------------------------------------------------- one model
def check_model(spec: str, *, numeric: bool = False, max_params: int = DEFAULT_MAX_PARAMS) -> ModelResult:
    """Build ``spec`` on the meta device and trace it; with ``numeric`` also check outputs on CPU.

    Never raises for a model's own failure: exceptions become ``status="error"`` with the stage,
    type and first line of the message.
    """
    import fxsparse
    from fxsparse.models import create, source_of

    result = ModelResult(model=spec, source=source_of(spec), status="ok")
    stage = "build"
    try:
        t0 = time.perf_counter()
        model = create(spec, device="meta")
        result.build_s = round(time.perf_counter() - t0, 4)
        result.params = sum(p.numel() for p in model.parameters())
        stage = "trace"
        t0, c0 = time.perf_counter(), time.process_time()
        gm = fxsparse.trace(model)
        result.trace_s = round(time.perf_counter() - t0, 4)
        result.trace_cpu_s = round(time.process_time() - c0, 4)
        result.nodes = len(gm.graph.nodes)
        result.mode_dependent = bool(gm.meta["fxsparse"].mode_dependent)
    except Exception as e:
        result.status, result.stage = "error", stage
        result.error_type, result.error = type(e).__name__, _first_line(e)
    finally:
        model = gm = None  # noqa: F841 -- free the meta model before the numeric check
    if numeric:
        if not result.ok:
            result.numeric, result.numeric_detail = "skipped", "the meta trace failed"
        elif result.params > max_params:
            result.numeric, result.numeric_detail = "skipped", f"{result.params:,} parameters > {max_params:,}"
        else:
            t0 = time.perf_counter()
            result.numeric, result.numeric_detail = _check_numeric(spec)
            result.numeric_s = round(time.perf_counter() - t0, 3)
    return result


def _check_numeric(spec: str) -> tuple[str, str | None]:
    """Compare the traced graph with the module on CPU: eval mode, batch 1, the default input size."""
    import torch

    import fxsparse
    from fxsparse.models import create
    from fxsparse.testing import compare
    from fxsparse.trace import default_example_inputs

    try:
        torch.manual_seed(0)
        model = create(spec, device="cpu").eval()
        torch.manual_seed(1)
        x = default_example_inputs(model, batch_size=1)
        gm = fxsparse.trace(model, x)
        with torch.no_grad():
            # eval mode changes no state, and gm shares model's parameters: no copies needed
            diffs = compare(model, gm, x, modes=("eval",), grads=False, exact=True, copy_modules=False)
            if diffs:  # not bit-identical: within compare's default tolerance?
                beyond_tol = compare(model, gm, x, modes=("eval",), grads=False, copy_modules=False)
    except Exception as e:
        return "error", f"{type(e).__name__}: {_first_line(e)}"
    if not diffs:
        return "equal", None
    detail = "; ".join(str(m).strip() for m in diffs[:3])[:_ERROR_CHARS]
    return ("mismatch" if beyond_tol else "close"), detail


def _first_line(e: BaseException | str) -> str:
    """The message's first line, with installed packages' paths made relative (timm/models/...)."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    first = _SITE_PACKAGES.sub("", lines[0]) if lines else type(e).__name__
    return first if len(first) <= _ERROR_CHARS else first[: _ERROR_CHARS - 3] + "..."


_SITE_PACKAGES = re.compile(r"[^\s`'\"]*[/\\](?:site|dist)-packages[/\\]")


# --------------------------------------------------------------------------- worker pool
def _worker_main(conn: multiprocessing.connection.Connection, options: dict[str, Any]) -> None:
    """A pool worker: import once, then check one model per message until told to stop (None)."""
    # Ctrl-C reaches the whole process group; the parent handles it and stops the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
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
    while True:
        spec = conn.recv()
        if spec is None:
            return
        result = check_model(spec, numeric=options["numeric"], max_params=options["max_params"])
        conn.send(("result", result))


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
        self.deadline = math.inf

    def submit(self, spec: str, timeout: float) -> None:
        self.conn.send(spec)
        self.spec, self.deadline = spec, time.monotonic() + timeout

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
    timeout: float = 120.0,
    workers: int = 2,
    numeric: bool = False,
    max_params: int = DEFAULT_MAX_PARAMS,
    time_budget: float | None = None,
    progress: bool = True,
    on_result: Callable[[ModelResult], None] | None = None,
) -> list[ModelResult]:
    """Check every spec (see ``check_model``) in ``workers`` processes; results in ``specs`` order.

    A model that takes longer than ``timeout`` seconds, or whose worker dies, is recorded as
    ``"timeout"`` / ``"crashed"`` and its worker replaced. ``workers=0`` runs everything in this
    process: no isolation and no timeout, but easy to debug. After ``time_budget`` seconds no
    new model is started: the models not reached are left out of the results.
    """
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
                record(check_model(spec, numeric=numeric, max_params=max_params))
        else:
            options = {"numeric": numeric, "max_params": max_params}
            _run_pool(specs, record, timeout=timeout, workers=min(workers, max(len(specs), 1)),
                      options=options, stop_at=stop_at)
    finally:
        if bar is not None:
            bar.close()
    return [results[s] for s in specs if s in results]


def _run_pool(specs: list[str], record: Callable[[ModelResult], None], *, timeout: float,
              workers: int, options: dict[str, Any], stop_at: float = math.inf) -> None:
    ctx = multiprocessing.get_context("spawn")  # fork would copy the parent's threads and state
    pending = collections.deque(specs)
    pool = [_Worker(ctx, options) for _ in range(workers)]
    failed_starts = 0
    try:
        while (pending and time.monotonic() < stop_at) or any(w.spec is not None for w in pool):
            for w in pool:
                if w.ready and w.spec is None and pending and time.monotonic() < stop_at:
                    w.submit(pending.popleft(), timeout)
            now = time.monotonic()
            deadlines = [w.deadline if w.ready else w.started + _STARTUP_TIMEOUT_S for w in pool]
            wait_s = max(0.0, min(deadlines) - now)
            handles = [w.conn for w in pool] + [w.process.sentinel for w in pool]
            multiprocessing.connection.wait(handles, timeout=min(wait_s, 1.0))
            for i, w in enumerate(pool):
                replace, reason = _poll(w, record)
                if not replace and time.monotonic() > (w.deadline if w.ready else w.started + _STARTUP_TIMEOUT_S):
                    replace, reason = True, "timeout"
                if not replace:
                    continue
                if w.spec is not None:
                    record(_lost(w.spec, reason, timeout, w.process))
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


def _poll(w: _Worker, record: Callable[[ModelResult], None]) -> tuple[bool, str]:
    """Read what worker ``w`` sent; (True, reason) if it died and must be replaced."""
    try:
        while w.conn.poll():
            kind, payload = w.conn.recv()
            if kind == "ready":
                w.ready = True
            else:
                record(payload)
                w.spec, w.deadline = None, math.inf
    except (EOFError, OSError):
        return True, "crashed"
    if not w.process.is_alive():
        return True, "crashed"
    return False, ""


def _lost(spec: str, reason: str, timeout: float, process: Any) -> ModelResult:
    from fxsparse.models import source_of

    if reason == "timeout":
        error = f"still running after {timeout:g} s; the worker was killed"
    else:
        code = process.exitcode
        how = f"signal {-code} ({_signal_name(-code)})" if code is not None and code < 0 else f"exit code {code}"
        error = f"the worker process died ({how})"
    return ModelResult(model=spec, source=source_of(spec), status=reason, error_type=reason, error=error)


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


# --------------------------------------------------------------------------- reports
def environment() -> dict[str, Any]:
    """Versions and machine a report was produced with."""
    import timm
    import torch
    import torchvision

    import fxsparse

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "fxsparse": fxsparse.__version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "cpu": _cpu_name(),
        "cpu_cores": os.cpu_count(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _quantile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank quantile (q in [0, 1]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarize(results: Sequence[ModelResult]) -> dict[str, Any]:
    """The headline figures of a sweep (what the markdown summary shows)."""
    ok = [r for r in results if r.ok]
    times = [r.trace_s for r in ok if r.trace_s is not None]
    cpu = [r.trace_cpu_s for r in ok if r.trace_cpu_s is not None]
    slowest = max(ok, key=lambda r: r.trace_s or 0.0, default=None)
    largest = max(ok, key=lambda r: r.nodes or 0, default=None)
    failures: dict[str, list[str]] = collections.defaultdict(list)
    for r in results:
        if not r.ok:
            failures[error_key(r)].append(r.model)
    out: dict[str, Any] = {
        "models": len(results),
        "traced": len(ok),
        "success_rate": round(len(ok) / len(results), 4) if results else None,
        "by_status": dict(collections.Counter(r.status for r in results)),
        "trace_s": {
            "median": _round(statistics.median(times)) if times else None,
            "p90": _round(_quantile(times, 0.9)),
            "max": _round(slowest.trace_s) if slowest else None,
            "max_model": slowest.model if slowest else None,
            "total": _round(sum(times)),
        },
        "trace_cpu_s": {"median": _round(statistics.median(cpu)) if cpu else None, "p90": _round(_quantile(cpu, 0.9))},
        "largest_graph": {"model": largest.model, "nodes": largest.nodes} if largest else None,
        "mode_dependent": sorted(r.model for r in ok if r.mode_dependent),
        "failures": dict(sorted(failures.items(), key=lambda kv: (-len(kv[1]), kv[0]))),
    }
    checked = [r for r in results if r.numeric not in (None, "skipped")]
    if any(r.numeric is not None for r in results):
        out["numeric"] = {
            "checked": len(checked),
            **{k: sum(r.numeric == k for r in results) for k in ("equal", "close", "mismatch", "error", "skipped")},
            "not_equal": {r.model: f"{r.numeric}: {r.numeric_detail}" for r in checked if r.numeric != "equal"},
        }
    return out


def error_key(r: ModelResult) -> str:
    """How failures are grouped: the error type and first line, without the failing model's name."""
    name = re.escape(_bare(r.model))
    msg = re.sub(rf"(?<![\w.-]){name}(?![\w.-])", "<model>", r.error or "")
    return f"{r.error_type}: {msg}" if r.error_type not in (None, "timeout", "crashed") else f"{r.status}: {msg}"


def _round(x: float | None, digits: int = 4) -> float | None:
    return None if x is None else round(x, digits)


def write_report(results: Sequence[ModelResult], path: str | os.PathLike, *, settings: dict[str, Any] | None = None,
                 title: str | None = None, env: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """Write ``path`` (JSON, one model per line) and the markdown summary beside it (``.md``).

    ``env`` (default: this machine now, see ``environment``) records where the results came from.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = env or environment()
    summary = summarize(results)
    head = {"environment": env, "settings": settings or {}, "summary": summary}
    # one model per line keeps the file small and its diffs readable
    body = ",\n".join("  " + json.dumps(r.to_json(), sort_keys=False) for r in results)
    text = json.dumps(head, indent=1)[:-2] + ',\n "models": [\n' + body + "\n ]\n}\n"
    path.write_text(text)
    md = path.with_suffix(".md")
    md.write_text(render_markdown(results, env=env, settings=settings or {}, summary=summary,
                                  title=title, json_name=path.name))
    return path, md


def render_markdown(results: Sequence[ModelResult], *, env: dict[str, Any], settings: dict[str, Any],
                    summary: dict[str, Any] | None = None, title: str | None = None, json_name: str = "") -> str:
    s = summary or summarize(results)
    t, c = s["trace_s"], s["trace_cpu_s"]
    lines = [
        f"# {title or 'fxsparse zoo sweep'}",
        "",
        f"{env['date']} · torch {env['torch']} · timm {env['timm']} · torchvision {env['torchvision']} · "
        f"Python {env['python']} · {env['cpu_cores']} CPU cores ({env['cpu']})",
        "",
        "Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()) if settings else "",
        "",
        "| | |",
        "|---|---|",
        f"| traced | **{s['traced']} / {s['models']}** ({_pct(s['traced'], s['models'])}) |",
    ]
    if t["median"] is not None:
        lines += [
            f"| trace time, wall (s) | median {t['median']:.3f} · p90 {t['p90']:.3f} · max {t['max']:.2f} "
            f"(`{t['max_model']}`) |",
            f"| trace time, CPU (s) | median {c['median']:.3f} · p90 {c['p90']:.3f} |",
        ]
    if s["largest_graph"]:
        lines.append(f"| largest graph | {s['largest_graph']['nodes']} nodes (`{s['largest_graph']['model']}`) |")
    lines.append(f"| mode-dependent graphs | {len(s['mode_dependent'])} |")
    num = s.get("numeric")
    if num:
        lines.append(
            f"| numeric check (eval, batch 1) | {num['checked']} checked: **{num['equal']} bit-identical**, "
            f"{num['close']} close, {num['mismatch']} mismatch, {num['error']} error; {num['skipped']} skipped |"
        )
    lines += ["", f"## Failures ({s['models'] - s['traced']})", ""]
    if not s["failures"]:
        lines.append("None.")
    for key, models in s["failures"].items():
        lines.append(f"- **{len(models)}×** `{_md_code(key)}`  ")
        lines.append("  " + ", ".join(f"`{m}`" for m in models))
    if num and num["not_equal"]:
        lines += ["", "## Numeric differences", ""]
        lines += [f"- `{m}`: {_md_code(d)}" for m, d in num["not_equal"].items()]
    if s["mode_dependent"]:
        lines += ["", "## Mode-dependent graphs", "",
                  "Traced in train mode; the eval-mode trace differs (the GraphModule refuses to run in eval mode):", "",
                  ", ".join(f"`{m}`" for m in s["mode_dependent"])]
    if json_name:
        lines += ["", f"Per-model results: `{json_name}`."]
    return "\n".join(lines) + "\n"


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "n/a"


def _md_code(s: str) -> str:
    return s.replace("`", "'").replace("|", "\\|")


def load_report(path: str | os.PathLike) -> list[ModelResult]:
    """The per-model results of a report written by ``write_report``."""
    return [ModelResult.from_json(d) for d in json.loads(Path(path).read_text())["models"]]
