"""Fast forms of the elementwise ops fxsparse puts into graphs (issue 13: speed).

Each function computes, bit for bit, what the plain expression it replaces computes, values and
gradients; only the kernels differ. ``torch.compile`` sees the plain expression (inductor fuses it
better than any hand-written form), eager mode gets the fast form.

``apply_mask(weight, mask)`` is ``weight * mask`` with a bool ``mask`` (the ``masked_weight`` node
of a masked graph). In eager mode on CPU, a float multiply with a bool operand goes through
TensorIterator's dynamic-cast loop, which is not vectorized, and the mask buffer is stored
channels-last (for inductor) while the eager weight is contiguous, so every read is a transposed,
converting one: 4-5x the time of a float multiply, forward and backward (docs/benchmarks.md,
"Masks"). ``torch.nn.utils.prune`` keeps a float mask and pays only the float multiply.

The eager fast form keeps, per mask buffer, a copy of the mask in the weight's dtype and layout,
made on first use and made again whenever the mask buffer changes (its version counter: every
in-place write, ``copy_``, ``load_state_dict``, a dynamic-mask update, bumps it), and multiplies
by it: a plain float multiply, forward and backward, exactly what prune runs. Autograd saves the
cached copy for the backward, not a new tensor. Cost: 4 bytes per masked weight (float32), held
while the mask lives (``mask_cache_bytes()``); prune stores a float mask too, plus a second copy
of the weights. The copy is not a buffer: ``state_dict``, checkpoints and every reader of
``fxsparse.masks.*`` still see the bool mask. ``set_mask_cache("off")`` gives the plain multiply
(no memory, the slow loop). On CUDA, under ``torch.compile``, for tensor subclasses (FSDP's
DTensor) and for non-float weights it is always the plain ``weight * mask``.

``ghost_relu_blend(act, x, gate, soft)`` is ghost neurons' ``(1 - gate) * relu(x) + gate * soft(x)``
as one autograd node that saves only ``x`` (see its docstring).
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Iterator

import torch

__all__ = ["apply_mask", "MASK_CACHES", "set_mask_cache", "using_mask_cache", "mask_cache_bytes", "ghost_relu_blend", "FUSED_SOFTS"]

MASK_CACHES = ("float", "off")
_mode = "float"
_cache: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}  # id(mask) -> (mask ref, version, copy)


def set_mask_cache(mode: str) -> None:
    """The eager CPU form of ``apply_mask``: "float" (default) or "off" (see the module docstring)."""
    global _mode
    if mode not in MASK_CACHES:
        raise ValueError(f"mask cache must be one of {MASK_CACHES}; got {mode!r}")
    _mode = mode
    _cache.clear()


@contextlib.contextmanager
def using_mask_cache(mode: str) -> Iterator[None]:
    """``set_mask_cache(mode)`` inside the block, the mode before it after (e.g. "off" to run a very
    large model without the 4 bytes per masked weight)."""
    previous = _mode
    set_mask_cache(mode)
    try:
        yield
    finally:
        set_mask_cache(previous)


def mask_cache_bytes(module: torch.nn.Module | None = None) -> int:
    """Memory held by the eager mask copies now (bytes): all, or those of ``module``'s buffers."""
    ids = None if module is None else {id(b) for b in module.buffers()}
    return sum(c.numel() * c.element_size() for key, (ref, _, c) in list(_cache.items())
               if ref() is not None and (ids is None or key in ids))


def _drop(key: int) -> None:
    _cache.pop(key, None)


def _cached(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The mask in ``like``'s dtype and layout, cached per mask (and its version)."""
    key = id(mask)
    hit = _cache.get(key)
    if (hit is not None and hit[0]() is mask and hit[1] == mask._version and hit[2].dtype == like.dtype
            and hit[2].stride() == like.stride()):
        return hit[2]
    with torch.no_grad():
        copy = torch.empty_like(like).copy_(mask)
    _cache[key] = (weakref.ref(mask, lambda _, key=key: _drop(key)), mask._version, copy)
    return copy


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``weight * mask`` (role ``masked_weight`` in a masked graph); see the module docstring."""
    if (_mode == "off" or type(weight) not in (torch.Tensor, torch.nn.Parameter) or type(mask) is not torch.Tensor
            or torch.compiler.is_compiling() or weight.device.type != "cpu" or not weight.is_floating_point()
            or mask.shape != weight.shape or mask.requires_grad):
        return weight * mask
    return weight * _cached(mask, weight)


# --------------------------------------------------------------------------- ghost neurons
_SOFT_FORWARD = {"swish": torch.nn.functional.silu, "mish": torch.nn.functional.mish}
_SOFT_BACKWARD = {"swish": torch.ops.aten.silu_backward, "mish": torch.ops.aten.mish_backward}
FUSED_SOFTS = tuple(_SOFT_FORWARD)


class _ReluBlend(torch.autograd.Function):
    """``(1 - gate) * act + gate * soft(x)`` with ``act = relu(x)`` given (detached); saves only ``x``.

    The backward is what autograd runs for the plain expression, op for op: the blend's multiplies
    send ``g * (1 - gate)`` to ``act`` and ``g * gate`` to ``soft``; ReLU's backward
    (``threshold_backward``, which reads ``relu(x) <= 0``, the same positions as ``x <= 0``, NaN
    included) and the soft activation's backward turn them into two gradients of ``x``, which are
    added (addition commutes, so the order autograd would add them in does not matter).
    """

    @staticmethod
    def forward(ctx, act: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, soft: str) -> torch.Tensor:
        ctx.soft = soft
        ctx.save_for_backward(x, gate)
        out = (1 - gate) * act
        return out.add_(gate * _SOFT_FORWARD[soft](x))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, gate = ctx.saved_tensors
        dx = torch.ops.aten.threshold_backward(grad * (1 - gate), x, 0)
        return None, dx.add_(_SOFT_BACKWARD[ctx.soft](grad * gate, x)), None, None


def ghost_relu_blend(act: torch.Tensor, x: torch.Tensor, gate: torch.Tensor, soft: str = "swish") -> torch.Tensor:
    """Ghost neurons' blend of ``act = relu(x)`` and ``soft(x)`` (``fxsparse.passes.ghost_neurons.
    ghost_blend(act, soft(x), gate)``, bit for bit, values and gradients), as one autograd node that
    saves only ``x``: the plain expression keeps ``relu(x)`` (ReLU's backward reads it) *and* ``x``
    (the soft activation's) for the backward, one activation-sized tensor more per site in eager
    mode. Under ``torch.compile`` (inductor decides what to save), for a gate that requires grad,
    and for tensor subclasses it is the plain expression."""
    if (isinstance(act, torch.fx.Proxy) or torch.compiler.is_compiling() or gate.requires_grad
            or type(x) is not torch.Tensor or type(act) is not torch.Tensor):
        return (1 - gate) * act + gate * _SOFT_FORWARD[soft](x)
    return _ReluBlend.apply(act.detach(), x, gate, soft)
