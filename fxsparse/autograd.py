"""Differentiating through a gradient on any model (LRsI's GradInit, GraSP's Hessian product).

PyTorch has no derivative for the backward of a few kernels that zoo models use, so a second
backward through them fails:

* fused scaled dot-product attention: ``aten::_scaled_dot_product_flash_attention_for_cpu_backward``
  on CPU, the flash, memory-efficient and cuDNN kernels on CUDA (timm ViTs, DeiT, PVT,
  ``nn.MultiheadAttention``);
* ``aten::hardsigmoid_backward`` (the squeeze-excite gates of MobileNetV3, GhostNet, LCNet,
  HardCoReNAS, CSPNeXt, ...).

Every other activation of ``torch.nn``, ``torch.nn.functional`` and ``timm.layers`` differentiates
twice (``tests/test_autograd.py`` checks them all), hardswish included.

``twice_differentiable()`` runs a block with equivalents that compute the same values and whose
backward PyTorch can differentiate: attention on the math backend (the same function; its
rounding differs from the fused kernels' by ~1e-6), hardsigmoid written with ``where`` (aten's values bit
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


_EQUIVALENTS = {
    F.hardsigmoid: _hardsigmoid,
    torch._C._nn.hardsigmoid: _hardsigmoid,
    torch._C._nn.hardsigmoid_: lambda x: _hardsigmoid(x, inplace=True),
}


class _Equivalents(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return _EQUIVALENTS.get(func, func)(*args, **(kwargs or {}))
