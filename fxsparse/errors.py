"""Errors fxsparse raises for bad input.

Every error says what was wrong and what to do about it, in one paragraph. They are raised
``from None`` where the underlying exception would only add a deep torch.fx stack trace; the
original exception stays available as ``err.cause`` for debugging.
"""
from __future__ import annotations


class FxSparseError(Exception):
    """Base class of every error fxsparse raises on purpose."""

    def __init__(self, message: str, *, cause: BaseException | None = None):
        super().__init__(message)
        self.cause = cause


class TraceError(FxSparseError):
    """The model could not be traced by torch.fx."""


class ExampleInputError(FxSparseError):
    """The example inputs do not fit the model."""


class ModelSpecError(FxSparseError):
    """A MODEL argument (timm name, tv:NAME, module:attr) could not be resolved."""


class MaskError(FxSparseError):
    """A mask does not fit the model, or a requested sparsity is impossible."""


class MaskOptionError(MaskError):
    """A mask method's option has a value it does not accept: ``key``, ``value`` and ``allowed``
    (what is) let a recipe name the key it came from."""

    def __init__(self, key: str, value, allowed: str):
        super().__init__(f"{key} = {value!r} is not allowed; allowed: {allowed}.")
        self.key, self.value, self.allowed = key, value, allowed


class RecipeError(FxSparseError):
    """A recipe is malformed."""


class PassError(FxSparseError):
    """A pass could not run on the graph (its preconditions do not hold), or failed while running:
    then the message names the pass, the node where known and the original error (``err.cause``)."""
