"""Gates: the scalars that blend ghosts in and out, stored as buffers and moved in place.

Every ghost group has one gate, a 0-dim float32 buffer ``gm.fxsparse.gates.<group>``. A gate of
1 means the ghost is fully on, 0 is the identity setting (the graph computes exactly what the
original computed). Because gates are buffers updated in place, a compiled module does not
recompile when they move.
"""
from __future__ import annotations

import torch
from torch import nn

from .pass_infra import CONTAINER, container, delete_container

__all__ = ["get", "set", "set_identity", "register", "target", "IDENTITY"]

IDENTITY = 0.0  # every gate's identity value: lam = alpha = gamma = 0
_GATES = "gates"


def target(group: str) -> str:
    """The get_attr target of a group's gate."""
    return f"{CONTAINER}.{_GATES}.{group}"


def register(gm: nn.Module, group: str, initial: float = 1.0) -> str:
    """Create the gate of ``group`` (if missing) and return its get_attr target."""
    gates = container(gm, _GATES)
    if group not in gates._buffers:
        device = next((p.device for p in gm.parameters()), torch.device("cpu"))
        gates.register_buffer(group, torch.tensor(float(initial), dtype=torch.float32, device=device))
    return target(group)


def unregister(gm: nn.Module, group: str) -> None:
    gates = container(gm, _GATES, create=False)
    if gates is not None and group in gates._buffers:
        del gates._buffers[group]
    if gates is not None and not gates._buffers:
        # the last gate gone: drop the empty container so removal leaves the module tree as it was
        delete_container(gm, _GATES)


def _buffers(gm: nn.Module) -> dict[str, torch.Tensor]:
    gates = container(gm, _GATES, create=False)
    return dict(gates._buffers) if gates is not None else {}


def get(gm: nn.Module) -> dict[str, float]:
    """``{gate name: value}`` for every gate in the module."""
    return {name: float(buf) for name, buf in _buffers(gm).items()}


def set(gm: nn.Module, name: str, value: float) -> None:  # noqa: A001 - mirrors get()
    """Move one gate in place (no recompilation under torch.compile)."""
    bufs = _buffers(gm)
    if name not in bufs:
        raise KeyError(f"no gate named {name!r}; this module has gates {sorted(bufs) or 'none'}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"gate {name!r} must lie in [0, 1]; got {value}")
    with torch.no_grad():
        bufs[name].fill_(float(value))


def set_identity(gm: nn.Module) -> None:
    """Every gate to its identity value: the graph then computes what the original computed."""
    for name in _buffers(gm):
        set(gm, name, IDENTITY)
