"""Differentiating through a gradient on any model (LRsI's GradInit, GraSP's Hessian product).

PyTorch has no derivative for the backward of a few kernels that zoo models use, so a second
backward through them fails:

* fused scaled dot-product attention: ``aten::_scaled_dot_product_flash_attention_for_cpu_backward``
  on CPU, the flash, memory-efficient and cuDNN kernels on CUDA (timm ViTs, DeiT, PVT,
  ``nn.MultiheadAttention``);
* ``aten::hardsigmoid_backward`` (the squeeze-excite gates of MobileNetV3, GhostNet, LCNet,
  HardCoReNAS, CSPNeXt, ...);
* not missing but NaN: the second derivative of a vector norm at a zero vector, which
  ``F.normalize`` meets where a whole vector is 0 (torchvision's Swin V2 cosine attention: the
  keys of padded tokens; LRsI's scales became NaN).

Every other activation of ``torch.nn``, ``torch.nn.functional`` and ``timm.layers`` differentiates
twice (``tests/test_autograd.py`` checks them all), hardswish included.

``twice_differentiable()`` runs a block with equivalents that compute the same values and whose
backward PyTorch can differentiate: attention on the math backend (the same function; its
rounding differs from the fused kernels' by ~1e-6), ``F.normalize`` with aten's norm value and a
gradient written with ``where`` (0 at a zero vector), hardsigmoid written with ``where`` (aten's values bit
for bit, and its first derivative: bit for bit in float32, to rounding in float64). It swaps nothing: a ``TorchFunctionMode``
sees every call, from a graph node or from inside a module the tracer kept as a leaf alike, so
no graph or module is edited and nothing has to be put back afterwards.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode

__all__ = ["twice_differentiable"]


@contextlib.contextmanager
def twice_differentiable() -> Iterator[None]:
    """Run the block with ops whose backward can be differentiated again, computing the same values."""
    with sdpa_kernel([SDPBackend.MATH]), _Equivalents():
        yield


def _hardsigmoid(x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    # aten: 0 for x <= -3, 1 for x >= 3, (x + 3) / 6 between, with gradient 1/6 only strictly
    # between; the same here, from ops that have double backward. Half and bfloat16 go through
    # float32 and are rounded once, as aten's kernels do.
    y = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    y = torch.where(y <= -3, 0.0, torch.where(y >= 3, 1.0, (y + 3) / 6)).to(x.dtype)
    return x.copy_(y) if inplace else y


def _normalize(input: torch.Tensor, p: float = 2.0, dim: int = 1, eps: float = 1e-12,
               out: torch.Tensor | None = None) -> torch.Tensor:
    # F.normalize divides by max(||x||, eps); the backward of the norm is x / ||x||, and its own
    # derivative is NaN at a zero vector even where the clamp makes the result's gradient 0
    # (Swin V2's cosine attention on padded tokens, whose key is exactly 0: zero input, zero key
    # bias). The norm here has aten's value (the same call) and the gradient of sqrt(sum x^2)
    # written with where, 0 at a zero vector, so it differentiates twice.
    if p != 2 or out is not None:
        return F.normalize(input, p, dim, eps, out)
    with torch.no_grad():
        exact = input.norm(p, dim, keepdim=True)
    sq = input.square().sum(dim, keepdim=True)
    nonzero = sq > 0
    smooth = torch.where(nonzero, torch.where(nonzero, sq, 1.0).sqrt(), 0.0)
    norm = exact + (smooth - smooth.detach())  # exact's value (a - a == 0), smooth's gradient
    return input / norm.clamp_min(eps).expand_as(input)


_EQUIVALENTS = {
    F.normalize: _normalize,
    F.hardsigmoid: _hardsigmoid,
    torch._C._nn.hardsigmoid: _hardsigmoid,
    torch._C._nn.hardsigmoid_: lambda x: _hardsigmoid(x, inplace=True),
}


class _Equivalents(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return _EQUIVALENTS.get(func, func)(*args, **(kwargs or {}))
