"""Reports of a sweep: the JSON file, the markdown summary beside it, and the JSON-lines log ``--resume`` reads."""
from __future__ import annotations

import collections
import datetime
import json
import math
import os
import platform
import re
import statistics
from pathlib import Path
from typing import Any, Sequence

from .result import ModelResult, bare


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
    if any(r.pipeline is not None for r in results):
        out["pipeline"] = summarize_pipeline(results)
    return out


def summarize_pipeline(results: Sequence[ModelResult]) -> dict[str, Any]:
    """The pipeline figures: completed / ran, failures grouped by stage and message, skipped models."""
    ran = [r for r in results if r.pipeline in ("ok", "error")]
    ok = [r for r in ran if r.pipeline == "ok"]
    failures: dict[str, list[str]] = collections.defaultdict(list)
    for r in ran:
        if r.pipeline == "error":
            failures[pipeline_error_key(r)].append(r.model)
    times = [r.pipeline_s for r in ok if r.pipeline_s is not None]
    slowest = max(ok, key=lambda r: r.pipeline_s or 0.0, default=None)
    stage_totals: dict[str, float] = collections.defaultdict(float)
    for r in ok:
        for stage, t in (r.stage_s or {}).items():
            stage_totals[stage] += t
    by_source = {}
    for source in sorted({r.source for r in results}):
        mine = [r for r in results if r.source == source]
        by_source[source] = {"models": len(mine), "ran": sum(r.pipeline in ("ok", "error") for r in mine),
                             "ok": sum(r.pipeline == "ok" for r in mine),
                             "skipped": sum(r.pipeline == "skipped" for r in mine)}
    return {
        "models": len(results),
        "ran": len(ran),
        "ok": len(ok),
        "by_source": by_source,
        "error": len(ran) - len(ok),
        "skipped": sum(r.pipeline == "skipped" for r in results),
        "success_rate": round(len(ok) / len(ran), 4) if ran else None,
        "by_stage": dict(collections.Counter(r.pipeline_stage for r in ran if r.pipeline == "error").most_common()),
        "failures": dict(sorted(failures.items(), key=lambda kv: (-len(kv[1]), kv[0]))),
        "causes": {r.model: r.pipeline_cause for r in ran if r.pipeline_cause},
        "skipped_models": {r.model: r.pipeline_detail for r in results if r.pipeline == "skipped"},
        "retried": {r.model: r.retried for r in ran if r.retried},
        "identity": dict(collections.Counter(r.identity for r in ok)),
        "exported": dict(collections.Counter(r.exported for r in ok)),
        "ghosts": dict(collections.Counter(g for r in ok for g in (r.ghosts or ()))),
        "no_ghosts": sorted(r.model for r in ok if not r.ghosts),
        "input_sizes": dict(collections.Counter("x".join(map(str, r.input_size[1:])) for r in ran if r.input_size)),
        "pipeline_s": {
            "median": _round(statistics.median(times)) if times else None,
            "p90": _round(_quantile(times, 0.9)),
            "max": _round(slowest.pipeline_s) if slowest else None,
            "max_model": slowest.model if slowest else None,
            "total": _round(sum(r.pipeline_s or 0.0 for r in ran)),
        },
        "stage_share": {k: round(v / sum(stage_totals.values()), 3) for k, v in stage_totals.items()} if stage_totals else {},
        "peak_rss_mb": _memory_summary(ran),
    }


def _memory_summary(results: Sequence[ModelResult]) -> dict[str, Any] | None:
    """The workers' peak resident memory per model (median, p90, the largest with its stage)."""
    measured = [r for r in results if r.peak_rss_mb is not None]
    if not measured:
        return None
    peaks = [r.peak_rss_mb for r in measured]
    top = max(measured, key=lambda r: r.peak_rss_mb)
    stage = max((top.stage_rss_mb or {}).items(), key=lambda kv: kv[1], default=(None, None))[0]
    return {"median": round(statistics.median(peaks)), "p90": round(_quantile(peaks, 0.9)),
            "max": round(top.peak_rss_mb), "max_model": top.model, "max_stage": stage, "measured": len(measured)}


def pipeline_error_key(r: ModelResult) -> str:
    """How pipeline failures are grouped: the stage, then the message without the model's name."""
    name = re.escape(bare(r.model))
    msg = re.sub(rf"(?<![\w.-]){name}(?![\w.-])", "<model>", r.pipeline_error or "")
    return f"{r.pipeline_stage}: {msg}"


def error_key(r: ModelResult) -> str:
    """How failures are grouped: the error type and first line, without the failing model's name."""
    name = re.escape(bare(r.model))
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
    pipe = s.get("pipeline")
    if pipe:
        lines.append(
            f"| {settings.get('recipe', 'tost')} pipeline (CPU, random weights, batch "
            f"{settings.get('batch_size', 2)}) | **{pipe['ok']} / {pipe['ran']} completed** "
            f"({_pct(pipe['ok'], pipe['ran'])}); {pipe['skipped']} skipped by the parameter budget |"
        )
        pt = pipe["pipeline_s"]
        if len(pipe["by_source"]) > 1:
            for source, b in pipe["by_source"].items():
                lines.append(f"| {source} | {b['ok']} / {b['ran']} completed ({_pct(b['ok'], b['ran'])}); "
                             f"{b['skipped']} skipped |")
        if pt["median"] is not None:
            lines.append(f"| pipeline time per model (s) | median {pt['median']:.1f} · p90 {pt['p90']:.1f} · max "
                         f"{pt['max']:.1f} (`{pt['max_model']}`) · total {pt['total'] / 3600:.2f} h |")
        mem = pipe.get("peak_rss_mb")
        if mem:
            at = f", in {mem['max_stage']}" if mem["max_stage"] else ""
            lines.append(f"| worker peak memory per model (MB; {mem['measured']} measured) | median {mem['median']} · "
                         f"p90 {mem['p90']} · max {mem['max']} (`{mem['max_model']}`{at}) |")
        if pipe["ok"]:
            ident = ", ".join(f"{v} {k}" for k, v in pipe["identity"].items())
            exp = ", ".join(f"{v} {k}" for k, v in pipe["exported"].items())
            lines.append(f"| identity gates vs mask-only graph · exported vs final graph | {ident} · {exp} |")
            ghosts = ", ".join(f"{k} {v}" for k, v in pipe["ghosts"].items())
            lines.append(f"| models that got each ghost | {ghosts}; none: {len(pipe['no_ghosts'])} |")
    lines += ["", f"## Failures ({s['models'] - s['traced']})", ""]
    if not s["failures"]:
        lines.append("None.")
    for key, models in s["failures"].items():
        lines.append(f"- **{len(models)}×** `{_md_code(key)}`  ")
        lines.append("  " + ", ".join(f"`{m}`" for m in models))
    if pipe:
        lines += ["", f"## Pipeline failures ({pipe['error']})", ""]
        if pipe["by_stage"]:
            lines.append("By stage: " + ", ".join(f"{k} {v}" for k, v in pipe["by_stage"].items()) + ".")
            lines.append("")
        if not pipe["failures"]:
            lines.append("None.")
        failed = {m for models in pipe["failures"].values() for m in models}
        for key, models in pipe["failures"].items():
            lines.append(f"- **{len(models)}×** `{_md_code(key)}`  ")
            lines.append("  " + ", ".join(f"`{m}`" for m in models))
            causes = sorted({pipe["causes"][m] for m in models if m in pipe["causes"]})
            for c in causes[:3]:
                lines.append(f"  cause: `{_md_code(c)}`")
        if pipe.get("retried"):
            lines += ["", f"## Run a second time ({len(pipe['retried'])})", ""]
            lines += [f"- `{m}` ({'completed' if m not in failed else 'failed again'}) {why}"
                      for m, why in pipe["retried"].items()]
        if pipe["skipped_models"]:
            lines += ["", f"## Skipped by the parameter budget ({pipe['skipped']})", ""]
            lines.append(", ".join(f"`{m}` ({d.split(' ')[0]})" for m, d in pipe["skipped_models"].items()))
        if pipe["no_ghosts"]:
            lines += ["", f"## Completed without any ghost site ({len(pipe['no_ghosts'])})", ""]
            lines.append(", ".join(f"`{m}`" for m in pipe["no_ghosts"]))
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


def append_log(path: str | os.PathLike, result: ModelResult) -> None:
    """Append one result to a sweep's log (JSON lines): what ``--resume`` reads back."""
    with open(path, "a") as f:
        f.write(json.dumps(result.to_json()) + "\n")


def read_log(path: str | os.PathLike) -> list[ModelResult]:
    """The results in a sweep's log; a last line cut short by a kill is ignored."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(ModelResult.from_json(json.loads(line)))
        except (json.JSONDecodeError, TypeError):
            continue
    return out


def load_report(path: str | os.PathLike) -> list[ModelResult]:
    """The per-model results of a report written by ``write_report``."""
    return [ModelResult.from_json(d) for d in json.loads(Path(path).read_text())["models"]]
