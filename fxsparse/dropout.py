"""Dropout, found and turned off: what LRsI's search and the zoo's identity check need.

A dropout is random in training and the identity in eval mode. Turning the whole network to eval
mode turns it off, but also switches every other module to its eval path, which need not be the
one training takes (timm's EfficientViT and LeViT attention cache their bias in eval mode).
``dropout_off()`` turns off only the dropouts: the functional ones, which every dropout module of
torch calls and which tracing leaves in the graph, and attention's ``dropout_p``.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["DROPOUT_FUNCTIONS", "is_dropout_module", "dropout_off"]

DROPOUT_FUNCTIONS = frozenset({F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                               F.feature_alpha_dropout})

# Modules that draw their own randomness instead of calling a dropout function: eval mode turns
# them off (matched by name, so that neither timm nor torchvision must be imported)
_SELF_DRAWING = ("DropPath", "DropBlock2d", "StochasticDepth")


def is_dropout_module(m: nn.Module) -> bool:
    """torch's dropouts, timm's DropPath / DropBlock2d and torchvision's StochasticDepth."""
    return isinstance(m, nn.modules.dropout._DropoutNd) or type(m).__name__ in _SELF_DRAWING


# Functions that drop internally with a probability argument: (its position, its name)
_DROP_PROBABILITY = {F.scaled_dot_product_attention: (4, "dropout_p"),
                     F.multi_head_attention_forward: (10, "dropout_p")}


class dropout_off(TorchFunctionMode):
    """Within the block, every dropout function returns its input and attention drops nothing,
    whatever the modules' modes (a ``TorchFunctionMode`` sees every call, from a graph node or from
    inside a leaf module alike). timm's DropPath and its kin draw their own randomness: put them in
    eval mode (``is_dropout_module``)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in DROPOUT_FUNCTIONS:
            return args[0] if args else kwargs["input"]
        if func in _DROP_PROBABILITY:
            pos, name = _DROP_PROBABILITY[func]
            if len(args) > pos:
                args = (*args[:pos], 0.0, *args[pos + 1:])
            elif name in kwargs:
                kwargs = {**kwargs, name: 0.0}
        return func(*args, **kwargs)
