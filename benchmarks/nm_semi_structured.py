"""2:4 masks on sparse tensor cores: dense vs semi-structured sparse Linear layers, timed.

    python benchmarks/nm_semi_structured.py                        # 12 ViT-B/16 MLPs (768 -> 3072 -> 768)
    python benchmarks/nm_semi_structured.py --model vit_base_patch16_224 --tokens 8192
    PYTHONPATH=. python3 benchmarks/nm_semi_structured.py --out "$OUT/nm.json"   # on the GPU machine

For every ``nn.Linear`` of the model: a 2:4 mask (``fxsparse.masks.compute(model, "nm",
pattern="2:4")``, magnitude, along the input features), folded into the weight as
``fxsparse.export`` folds it, cast to fp16 (``--dtype bf16``), converted with
``torch.sparse.to_sparse_semi_structured`` and timed as ``F.linear(x, w)`` on ``--tokens`` rows
against the same masked weight kept dense; outputs are checked close. Layers whose shape the
kernels do not take (see ``fits_semi_structured``) are listed and stay dense.

Needs a CUDA GPU with compute capability 8.0 or newer (Ampere, Hopper); anywhere else it says so
and exits 0 (the CPU test runs ``prepare`` and this exit).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _worktree import use_working_tree  # noqa: E402

use_working_tree()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import fxsparse  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Prepared:
    name: str
    weight: torch.Tensor  # masked (2:4 along the input features), in the timing dtype
    bias: torch.Tensor | None


def mlp_stack(dim: int = 768, hidden: int = 3072, depth: int = 12) -> nn.Module:
    """``depth`` transformer MLPs (fc1: dim -> hidden, GELU, fc2: hidden -> dim), ViT-B/16's by default."""

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

        def forward(self, x):
            return self.fc2(F.gelu(self.fc1(x)))

    return nn.Sequential(*(Mlp() for _ in range(depth)))


def fits_semi_structured(weight: torch.Tensor, dtype: torch.dtype = torch.float16) -> bool:
    """Whether ``to_sparse_semi_structured`` takes this 2-D weight in ``dtype``: both dimensions
    multiples of the minimum tile of the backend torch picks (cuSPARSELt fp16/bf16: 16 x 16; CUTLASS,
    used when cuSPARSELt is missing: 32 rows x 64 columns)."""
    sparse = torch.sparse
    cusparselt = torch.backends.cusparselt.is_available() and not sparse.SparseSemiStructuredTensor._FORCE_CUTLASS
    backend = sparse.SparseSemiStructuredTensorCUSPARSELT if cusparselt else sparse.SparseSemiStructuredTensorCUTLASS
    limits = backend._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
    rows, cols = weight.shape
    return limits is not None and rows % limits.sparse_min_rows == 0 and cols % limits.sparse_min_cols == 0 \
        and rows >= limits.sparse_min_rows and cols >= limits.sparse_min_cols


def prepare(model: nn.Module, dtype: torch.dtype = torch.float16) -> list[Prepared]:
    """The model's nn.Linear weights with their 2:4 masks folded in (what an exported 2:4 model holds)."""
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = [f"{n}.weight" for n in linears]
    masks = fxsparse.masks.compute(model, "nm", pattern="2:4", layers=names, incompatible="dense")
    out = []
    for name, module in linears.items():
        mask = masks[f"{name}.weight"]
        if mask.all():  # left dense: its input dimension is not a multiple of 4
            continue
        weight = (module.weight.detach() * mask).to(dtype).contiguous()
        bias = None if module.bias is None else module.bias.detach().to(dtype)
        out.append(Prepared(name, weight, bias))
    return out


def build(name: str) -> nn.Module:
    if name == "mlp":
        return mlp_stack()
    import timm

    return timm.create_model(name, pretrained=False)


def gpu_ready() -> str | None:
    """None on a CUDA GPU of compute capability 8.0+, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"{torch.cuda.get_device_name()} is sm{major}{minor}; semi-structured sparse kernels need sm80+"
    return None


def time_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run(layers: list[Prepared], tokens: int, reps: int, dtype: torch.dtype) -> list[dict]:
    from torch.sparse import to_sparse_semi_structured

    rows = []
    for layer in layers:
        w = layer.weight.cuda()
        b = None if layer.bias is None else layer.bias.cuda()
        row = {"layer": layer.name, "shape": list(w.shape)}
        if not fits_semi_structured(w, dtype):
            rows.append({**row, "skipped": "shape not a multiple of the kernel's tile"})
            continue
        x = torch.randn(tokens, w.shape[1], dtype=dtype, device="cuda")
        sparse = to_sparse_semi_structured(w)
        dense_out, sparse_out = F.linear(x, w, b), F.linear(x, sparse, b)
        err = ((dense_out - sparse_out).abs().max() / dense_out.abs().max().clamp_min(1e-6)).item()
        dense_ms = time_ms(lambda: F.linear(x, w, b), reps)
        sparse_ms = time_ms(lambda: F.linear(x, sparse, b), reps)
        rows.append({**row, "dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms,
                     "max_rel_err": err, "close": err < 1e-2})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mlp", help="'mlp' (ViT-B/16's 12 MLPs) or a timm model name")
    p.add_argument("--tokens", type=int, default=197 * 64, help="rows of x: ViT-B/16 tokens x batch 64")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp16")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = p.parse_args(argv)
    why = gpu_ready()
    if why is not None:
        print(f"nm_semi_structured: needs a CUDA GPU with compute capability 8.0+ ({why}); nothing timed.")
        return 0
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    rows = run(prepare(build(args.model), dtype), args.tokens, args.reps, dtype)
    timed = [r for r in rows if "speedup" in r]
    for r in rows:
        what = r.get("skipped") or (f"dense {r['dense_ms']:.3f} ms, 2:4 {r['sparse_ms']:.3f} ms, "
                                    f"x{r['speedup']:.2f}, max rel err {r['max_rel_err']:.1e}")
        print(f"{r['layer']:<24} {str(tuple(r['shape'])):<14} {what}")
    if timed:
        dense, sparse = sum(r["dense_ms"] for r in timed), sum(r["sparse_ms"] for r in timed)
        print(f"{len(timed)} layers on {torch.cuda.get_device_name()}, {args.dtype}, {args.tokens} tokens: "
              f"dense {dense:.2f} ms, 2:4 {sparse:.2f} ms, speedup x{dense / sparse:.2f}; "
              f"all close: {all(r['close'] for r in timed)}")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "dtype": args.dtype, "tokens": args.tokens,
                                        "device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
