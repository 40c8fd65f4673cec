"""What the scorers share: the private copy they run on, data batches, forward passes, seeding.

Scoring never touches the user's model: every score that needs a forward pass runs on a deep copy
whose selected weights are the leaves autograd differentiates. Gradients are taken with respect to
the copy's own ``nn.Parameter`` objects, so weights held inside modules the tracer keeps as leaves
(CondConv2d, NormFreeBlock, ``nn.MultiheadAttention.in_proj_weight``) are scored like any other.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from .. import outputs
from ..errors import MaskError

Batch = tuple[Any, Any]


@contextlib.contextmanager
def scoring_copy(model: nn.Module, names: Sequence[str], *, train: bool) -> Iterator[tuple[nn.Module, dict[str, nn.Parameter]]]:
    """A deep copy of ``model`` in train or eval mode and its parameters named ``names``.

    Only those parameters require grad on the copy: backward then skips every other weight. On
    exit the copy lets go of its parameters and buffers: a GraphModule sits in a reference cycle,
    so its copy would otherwise hold a whole copy of the weights until the next garbage
    collection (2.5 GB on ViT-H/14). Tensors taken from it stay valid.
    """
    work = copy.deepcopy(model)
    try:
        set_mode(work, train)
        for p in work.parameters():
            p.requires_grad_(False)
        params = {}
        for name in names:
            p = work.get_parameter(name)
            p.requires_grad_(True)
            params[name] = p
        yield work, params
    finally:
        for m in work.modules():
            m._parameters.clear()
            m._buffers.clear()


def set_mode(work: nn.Module, train: bool) -> None:
    """``work.train(train)``, also for a GraphModule that fxsparse.trace found mode-dependent.

    Such a graph refuses to run in the mode it was not traced in (its guard reads the root's
    ``training`` flag). Scoring in that mode then runs the traced graph with every submodule in
    the requested mode and only the root's flag left as traced: BatchNorm and dropout behave as
    asked (SynFlow's eval-mode running statistics), on the graph the user will train (e.g.
    EfficientFormer's train-mode attention bias, GoogLeNet's auxiliary heads).
    """
    work.train(train)
    info = getattr(work, "meta", {}).get("fxsparse") if isinstance(work, torch.fx.GraphModule) else None
    if info is not None and getattr(info, "mode_dependent", False) and info.traced_training != train:
        work.training = info.traced_training


def as_batches(data: Iterable[Batch] | None, method: str) -> Iterable[Batch]:
    """``data`` as an iterable that can be passed over more than once (GraSP passes twice).

    A DataLoader or a list is used as is, batch by batch; a one-shot iterator (a generator) is
    read into a list first.
    """
    if data is None:
        raise MaskError(
            f"method {method!r} scores weights with gradients of the loss and needs data: pass "
            f"data=an iterable of (inputs, targets) batches (a DataLoader or a list)."
        )
    return list(data) if iter(data) is data else data


def pairs(batches: Iterable[Batch], method: str) -> Iterator[Batch]:
    """The (inputs, targets) batches, checked one by one as they are used."""
    count = 0
    for batch in batches:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise MaskError(
                f"data batch {count} is a {type(batch).__name__}, not an (inputs, targets) pair; "
                f"method {method!r} needs targets to compute the loss."
            )
        count += 1
        yield batch[0], batch[1]
    if not count:
        raise MaskError(f"method {method!r} got no data batches; pass at least one (inputs, targets) batch.")


def device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def forward(model: nn.Module, inputs: Any) -> Any:
    """Run ``model`` on a batch's inputs (a tensor, or a tuple/list of positional inputs)."""
    device = device_of(model)
    if isinstance(inputs, (tuple, list)):
        return model(*(_to(x, device) for x in inputs))
    return model(_to(inputs, device))


def _to(x: Any, device: torch.device) -> Any:
    return x.to(device) if isinstance(x, torch.Tensor) else x


def targets_on(targets: Any, model: nn.Module) -> Any:
    return _to(targets, device_of(model))


def loss(loss_fn: Callable | None, out: Any, targets: Any, *, temperature: float = 1.0) -> torch.Tensor:
    """The loss of a model output, the one place scorers compute it.

    ``loss_fn(outputs, targets)`` gets the output as the model returned it (a namedtuple with
    auxiliary logits, a dict, ...); the default (``None``) is cross-entropy of its logits
    (``fxsparse.outputs.logits``). ``temperature`` divides every tensor of the output first
    (GraSP's logits / 200), the auxiliary logits too.
    """
    if temperature != 1.0:
        out = outputs.map_tensors(out, lambda t: t / temperature)
    return (loss_fn or outputs.cross_entropy)(out, targets)


def writable(g: torch.Tensor, owned: set[int]) -> torch.Tensor:
    """``g`` if it can be written in place without touching another tensor, else a copy.

    A gradient autograd returns may be an expanded view (stride 0: the gradient of ``w.sum()``) or
    shared by two names (a tied weight); writing into those would be wrong or refused. ``owned``
    collects the storages already handed out.
    """
    ptr = g.untyped_storage().data_ptr()
    if not g.is_contiguous() or ptr in owned:
        return g.clone(memory_format=torch.contiguous_format)
    owned.add(ptr)
    return g


def output_sum(out: Any) -> torch.Tensor:
    """The sum of every tensor in a model output (a tensor, a tuple/list or a dict of tensors)."""
    if isinstance(out, torch.Tensor):
        return out.sum()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        parts = [output_sum(o) for o in out if isinstance(o, (torch.Tensor, tuple, list, dict))]
        if parts:
            return torch.stack(parts).sum()
    raise MaskError(f"cannot sum a model output of type {type(out).__name__}; SynFlow needs tensor outputs.")


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed dropout/drop-path during scoring without disturbing the caller's global RNG state."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def grads(loss: torch.Tensor, params: dict[str, nn.Parameter], *, create_graph: bool = False) -> dict[str, torch.Tensor]:
    """d loss / d param for each parameter; a parameter the loss does not reach gets zeros."""
    got = torch.autograd.grad(loss, list(params.values()), create_graph=create_graph, allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(params.items(), got)}
