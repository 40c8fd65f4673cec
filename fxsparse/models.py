"""Resolving MODEL arguments: a timm name, ``tv:NAME`` for torchvision, or ``module:attr``.

Any of them may end in constructor keywords written as a call, ``NAME(key=value, ...)`` with
Python literals as values: ``fxsparse.nets:vgg16(width=0.25)``, ``resnet50(drop_rate=0.1)``.
"""
from __future__ import annotations

import ast
import importlib
from typing import Any

import torch
from torch import nn

from .errors import ModelSpecError

__all__ = ["create", "source_of", "parse_spec"]


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"fxsparse.nets:vgg16(width=0.25)"`` -> ``("fxsparse.nets:vgg16", {"width": 0.25})``."""
    spec = spec.strip()
    if not spec.endswith(")"):
        return spec, {}
    name = spec.partition("(")[0]
    try:
        call = ast.parse("f" + spec[len(name):], mode="eval").body  # the keywords as a call of f
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.args:
            raise ValueError
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg is not None}
        if len(kwargs) != len(call.keywords):
            raise ValueError
    except (SyntaxError, ValueError):
        raise ModelSpecError(f"MODEL {spec!r}: constructor arguments must be keywords with literal values, "
                             f"e.g. fxsparse.nets:vgg16(width=0.25)") from None
    return name.strip(), kwargs


def source_of(spec: str) -> str:
    """'torchvision', 'user' or 'timm' for a MODEL argument."""
    if spec.startswith("tv:"):
        return "torchvision"
    if ":" in spec:
        return "user"
    return "timm"


def create(spec: str, *, device: str | torch.device = "cpu", num_classes: int | None = None, **kwargs: Any) -> nn.Module:
    """Build the model named by ``spec`` with random weights (never downloads weights).

    ``device="meta"`` builds it without allocating parameter memory (for tracing and the zoo).
    Keywords written in ``spec`` (``NAME(width=0.5)``) are passed to the constructor.
    """
    spec, spec_kwargs = parse_spec(spec)
    kwargs = {**spec_kwargs, **kwargs}
    source = source_of(spec)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if source == "torchvision":
        import torchvision

        name = spec[3:]
        if name not in torchvision.models.list_models():
            close = _close(name, torchvision.models.list_models())
            raise ModelSpecError(f"torchvision has no model {name!r}.{close} List them with torchvision.models.list_models().")
        build = lambda: torchvision.models.get_model(name, weights=None, **kwargs)  # noqa: E731
        # some torchvision models (RegNet) cannot be built on the meta device: build on CPU
        model = _build(build, device, fallback_cpu=True)
        image_size = getattr(model, "image_size", None)  # ViTs fix it at build time (vit_h_14: 224)
        if isinstance(image_size, int):
            model.fxsparse_input_size = (3, image_size, image_size)
        else:
            model.fxsparse_input_size = _torchvision_input_size(name)
        return model
    if source == "user":
        mod_name, _, attr = spec.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise ModelSpecError(f"cannot import module {mod_name!r} for MODEL {spec!r}: {e}. Is it on PYTHONPATH?") from None
        obj = mod
        for atom in attr.split("."):
            if not hasattr(obj, atom):
                raise ModelSpecError(f"module {mod_name!r} has no attribute {attr!r} (MODEL {spec!r}).")
            obj = getattr(obj, atom)
        if isinstance(obj, nn.Module):
            return obj.to(device)
        if not callable(obj):
            raise ModelSpecError(f"{spec!r} is neither an nn.Module nor a callable that builds one.")
        model = _build(lambda: obj(**kwargs), device, fallback_cpu=True)
        if not isinstance(model, nn.Module):
            raise ModelSpecError(f"{spec!r} returned {type(model).__name__}, not an nn.Module.")
        return model
    import timm

    if spec not in timm.list_models() and not timm.is_model(spec):
        close = _close(spec, timm.list_models())
        raise ModelSpecError(
            f"timm has no model {spec!r}.{close} Use tv:NAME for torchvision or module:attr for your own."
        )
    return _build(lambda: timm.create_model(spec, pretrained=False, **kwargs), device, fallback_cpu=True)


def _torchvision_input_size(name: str) -> tuple[int, int, int]:
    """The crop size torchvision's weights were trained at (inception_v3: 299), else 224."""
    import torchvision

    try:
        weights = torchvision.models.get_model_weights(name)
        crop = next(iter(weights)).transforms().crop_size[0]
    except Exception:
        crop = 224
    return (3, crop, crop)


def _build(fn, device, fallback_cpu: bool) -> nn.Module:
    device = torch.device(device)
    if device.type == "meta":
        try:
            with torch.device("meta"):
                return fn()
        except Exception:
            if not fallback_cpu:
                raise
    model = fn()
    return model.to(device)


def _close(name: str, names: list[str]) -> str:
    import difflib

    hits = difflib.get_close_matches(name, names, n=3)
    return f" Did you mean {', '.join(hits)}?" if hits else ""
