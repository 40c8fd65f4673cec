"""The base every fxsparse pass builds on: ``torch.fx.passes.infra`` plus fxsparse conventions.

Conventions (see docs/architecture.md):

* A pass is a ``FxSparsePass`` (a ``torch.fx.passes.infra.pass_base.PassBase``): it states its
  preconditions in ``requires`` and postconditions in ``ensures`` and returns
  ``PassResult(graph_module, modified)``.
* Every node a pass adds carries ``node.meta["fxsparse"] = {"pass": ..., "group": ..., "role": ...}``
  so that inspection and the paired removal pass can find it (``tagged_nodes``).
* Everything a pass adds to the module (masks, gates, ghost branches) lives under one container
  submodule, ``gm.fxsparse.<group>``; the original modules and their state_dict keys are never
  touched, so removal is deleting the container and the tagged nodes.
* Each pass counts what it changed in ``self.stats`` and logs one line; the history of passes run
  is kept in ``gm.meta["fxsparse.passes"]`` for inspection.
* Whatever a pass raises reaches the user as an ``fxsparse.errors.PassError`` naming the pass, the
  node it was rewriting (``with self.at(node): ...``) and what to do, the original error chained.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
from collections import Counter
from typing import Any, Callable, ClassVar, Iterator, Sequence

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.passes.infra.pass_base import PassBase, PassResult
from torch.fx.passes.infra.pass_manager import PassManager

from .errors import FxSparseError, PassError

log = logging.getLogger("fxsparse.passes")

__all__ = [
    "FxSparsePass", "PassResult", "run_passes", "tag", "tagged_nodes", "container",
    "group_parameters", "delete_container", "require_tagged_state", "register_nested_buffer", "CONTAINER", "HISTORY_KEY",
    "check_graph", "recompile",
]

CONTAINER = "fxsparse"  # gm.<CONTAINER>.<group> holds what passes add
HISTORY_KEY = "fxsparse.passes"


def tag(node: Node, pass_name: str, group: str, role: str, **extra: Any) -> Node:
    """Mark ``node`` as added by ``pass_name`` (group: what removal deletes; role: what it is)."""
    node.meta["fxsparse"] = {"pass": pass_name, "group": group, "role": role, **extra}
    return node


def tagged_nodes(
    gm: GraphModule, group: str | None = None, role: str | None = None, pass_name: str | None = None
) -> list[Node]:
    """Nodes added by fxsparse passes, filtered by group / role / pass name."""
    out = []
    for node in gm.graph.nodes:
        t = node.meta.get("fxsparse")
        if not isinstance(t, dict):
            continue
        if group is not None and t.get("group") != group:
            continue
        if role is not None and t.get("role") != role:
            continue
        if pass_name is not None and t.get("pass") != pass_name:
            continue
        out.append(node)
    return out


def container(gm: nn.Module, group: str | None = None, create: bool = True) -> nn.Module | None:
    """``gm.fxsparse`` (or ``gm.fxsparse.<group>``), created on first use."""
    root = gm._modules.get(CONTAINER)
    if root is None:
        if not create:
            return None
        root = nn.Module()
        gm.add_module(CONTAINER, root)
    if group is None:
        return root
    sub = root._modules.get(group)
    if sub is None and create:
        sub = nn.Module()
        root.add_module(group, sub)
    return sub


def delete_container(gm: nn.Module, group: str) -> None:
    root = container(gm, create=False)
    if root is not None and group in root._modules:
        del root._modules[group]
        if not root._modules and not root._buffers and not root._parameters:
            del gm._modules[CONTAINER]


def register_nested_buffer(root: nn.Module, qualified_name: str, tensor: torch.Tensor, persistent: bool = True) -> str:
    """Register ``tensor`` at ``root.<a>.<b>.<name>``, creating plain containers on the way.

    Used to name masks after the parameter they mask: the mask of ``layer1.0.conv1.weight`` is
    the buffer ``fxsparse.masks.layer1.0.conv1.weight``.
    """
    *path, name = qualified_name.split(".")
    mod = root
    for atom in path:
        nxt = mod._modules.get(atom)
        if nxt is None:
            nxt = nn.Module()
            mod.add_module(atom, nxt)
        mod = nxt
    mod.register_buffer(name, tensor, persistent=persistent)
    return qualified_name


def group_parameters(gm: nn.Module, group: str) -> list[nn.Parameter]:
    """The parameters a group added (e.g. every ghost-skip branch), for the optimizer."""
    sub = container(gm, group, create=False)
    return list(sub.parameters()) if sub is not None else []


def group_named_parameters(gm: nn.Module, group: str) -> Iterator[tuple[str, nn.Parameter]]:
    sub = container(gm, group, create=False)
    if sub is None:
        return iter(())
    prefix = f"{CONTAINER}.{group}."
    return ((prefix + n, p) for n, p in sub.named_parameters())


def require_tagged_state(gm: GraphModule, group: str, pass_name: str) -> None:
    """Refuse to remove a group whose nodes lost their tags.

    Tags live in ``node.meta``, which pickling a GraphModule (``torch.save(gm)``) does not keep;
    without them a removal pass cannot tell the ghost's nodes from the original graph, so it says
    so here instead of leaving a broken graph.
    """
    gate, prefix = f"{CONTAINER}.gates.{group}", f"{CONTAINER}.{group}."
    untagged = [
        n for n in gm.graph.nodes
        if n.op in ("get_attr", "call_module") and "fxsparse" not in n.meta
        and (n.target == gate or n.target.startswith(prefix))
    ]
    if untagged:
        raise PassError(
            f"{pass_name}: {untagged[0].format_node()} reads {group} state but carries no fxsparse "
            f"tag, so the ghost nodes cannot be told apart from the original graph. Node tags do not "
            f"survive pickling a GraphModule (torch.save(gm)): save gm.state_dict() instead, rebuild "
            f"the graph with the same passes (fxsparse.transform) and load the state_dict into it."
        )


def recompile(gm: GraphModule):
    """``gm.recompile()``, also after a library swapped ``gm``'s class for a subclass of it.

    ``GraphModule.recompile`` installs ``forward``, ``__call__`` and ``_wrapped_call`` on
    ``type(gm)`` (and recompiles GraphModule children the same way). FSDP2's ``fully_shard`` makes
    ``type(gm)`` a dynamic subclass ``FSDP<graph class>``; patched there, its ``_wrapped_call``
    calls the parent's ``__call__``, which finds the subclass's ``_wrapped_call`` again, and the
    next call recurses without end. So recompile with each GraphModule set back to the class that
    holds ``_wrapped_call`` (its graph class; the FSDP subclass inherits the new forward).
    """
    swapped = []
    for m in gm.modules():
        cls = type(m)
        owner = next((c for c in cls.__mro__ if "_wrapped_call" in vars(c)), cls)
        if isinstance(m, GraphModule) and owner is not cls:
            swapped.append((m, cls))
            m.__class__ = owner
    try:
        return gm.recompile()
    finally:
        for m, cls in swapped:
            m.__class__ = cls


def check_graph(gm: nn.Module) -> None:
    """The check run after every pass: the graph lints and every tag names a pass and a group."""
    _check_graph(gm, after="")


def _check_graph(gm: nn.Module, after: str) -> None:
    where = f"after {after}: " if after else ""
    if not isinstance(gm, GraphModule):
        raise PassError(f"{where}expected a torch.fx.GraphModule, got {type(gm).__name__}")
    try:
        gm.graph.lint()
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]  # the rest prints the whole graph
        raise PassError(f"{where}the graph is malformed: {first} This is a bug in the pass: please report "
                        f"it with the model and the recipe.", cause=e) from e
    for node in gm.graph.nodes:
        t = node.meta.get("fxsparse")
        if t is not None and not (isinstance(t, dict) and "pass" in t and "group" in t and "role" in t):
            raise PassError(f"{where}node {node.name} has a malformed fxsparse tag {t!r}")


class FxSparsePass(PassBase):
    """Base class of fxsparse passes.

    Subclasses set ``group`` (the name removal and the scheduler know it by), implement
    ``call(gm) -> PassResult``, count changes in ``self.stats``, and tag added nodes with
    ``self.tag(node, role)``. A ghost pass names its paired removal pass in ``removal``.
    """

    group: ClassVar[str] = ""
    removal: ClassVar[type["FxSparsePass"] | None] = None

    def __init__(self) -> None:
        self.stats: Counter[str] = Counter()
        self.skipped: dict[str, str] = {}  # candidate site -> why the pass left it alone (last call)
        self._at: list[Node] = []

    @property
    def name(self) -> str:
        return type(self).__name__

    def tag(self, node: Node, role: str, **extra: Any) -> Node:
        return tag(node, self.name, self.group, role, **extra)

    @contextlib.contextmanager
    def at(self, node: Node) -> Iterator[Node]:
        """Name ``node`` in the PassError if the block raises: ``for n in ...: with self.at(n): ...``."""
        self._at.append(node)
        yield node
        self._at.pop()  # not reached when the block raised: __call__ reads the node from _at

    def hint(self, error: Exception) -> str:
        """What the user can do when the pass failed with ``error`` (passes add specific advice)."""
        return _generic_hint(self.group)

    def requires(self, graph_module: GraphModule) -> None:
        if not isinstance(graph_module, GraphModule):
            raise PassError(
                f"{self.name} runs on a torch.fx.GraphModule; got {type(graph_module).__name__}. "
                f"Trace the model first: gm = fxsparse.trace(model)."
            )

    def ensures(self, graph_module: GraphModule) -> None:
        _check_graph(graph_module, after=self.name)

    def __call__(self, graph_module: GraphModule) -> PassResult:
        self.stats, self.skipped, self._at = Counter(), {}, []
        try:
            result = super().__call__(graph_module)
        except FxSparseError:
            raise  # raised on purpose: it says what to do already
        except Exception as e:
            node = self._at[-1] if self._at else None
            raise pass_error(self.name, e, node=node, hint=self.hint(e)) from e
        if result is None:
            result = PassResult(graph_module, bool(self.stats))
        if result.modified and not _MANAGED.get():  # run_passes' PassManager recompiles after each pass
            recompile(result.graph_module)
        summary = self.summary()
        log.info("%s: %s", self.name, summary)
        entry = {"pass": self.name, "group": self.group, "changes": dict(self.stats)}
        if self.skipped:  # inspect shows them: where a pass chose (or had) to leave a site alone
            entry["skipped"] = dict(self.skipped)
        result.graph_module.meta.setdefault(HISTORY_KEY, []).append(entry)
        return result

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.stats.items()) or "no change"


def pass_error(pass_name: str, error: BaseException, *, node: Node | None = None, hint: str = "") -> PassError:
    """The PassError for a pass that failed with an error it did not raise on purpose."""
    where = f" at node {node.name} ({node.format_node()})" if node is not None else ""
    text = str(error).strip() or "(no message)"
    if len(text) > 600:
        text = text[:600] + " [...]"
    return PassError(
        f"{pass_name} failed{where}: {type(error).__name__}: {text}\n{hint or _generic_hint('')}",
        cause=error,
    )


def _generic_hint(group: str) -> str:
    skip = (f" To go on without it, disable it: `{group}.enabled = false` in the recipe, or "
            f"fxsparse.transform(..., skip=[{group!r}]).") if group else ""
    return ("This is a bug in the pass or an operation of the model it does not handle: please report it "
            "with the model, the recipe and the original error's traceback (chained to this error as its "
            f"cause, err.cause).{skip}")


def _reported(p: Callable, check: bool) -> Callable:
    """A pass that is not an FxSparsePass, made to check the graph after it (as an FxSparsePass's
    ``ensures`` does) and to fail with a PassError naming it."""
    if isinstance(p, FxSparsePass):
        return p
    name = getattr(p, "__name__", type(p).__name__)

    def run(gm: GraphModule) -> PassResult:
        try:
            result = p(gm)
        except FxSparseError:
            raise
        except Exception as e:
            raise pass_error(name, e) from e
        if check:
            _check_graph(getattr(result, "graph_module", gm), after=name)
        return result

    run.__name__ = name  # what PassManager logs
    return run


# True while run_passes runs: torch's PassManager recompiles the module after every pass (which
# only marks it stale there: _code_generated_once), so a pass does not recompile it too
_MANAGED: contextvars.ContextVar[bool] = contextvars.ContextVar("fxsparse_managed_passes", default=False)


@contextlib.contextmanager
def _code_generated_once(gm: GraphModule) -> Iterator[None]:
    """Within the block, ``gm.recompile()`` only marks ``gm``'s Python code stale; the code is
    generated once, when the block ends or when something runs ``gm`` before that (LRsI does).

    torch's PassManager recompiles after every pass, and code generation is a tenth of a
    ResNet-50's transform each time; no pass reads the code, only the graph. (torch's own
    ``_LazyGraphModule`` defers the same way, but as a class of its own: the user's module keeps
    its class here.)
    """
    own = vars(gm)
    if not isinstance(gm, GraphModule) or "recompile" in own or "forward" in own:
        yield
        return
    stale = False

    def mark_stale() -> None:
        nonlocal stale
        stale = True
        own["forward"] = forward_after_recompile  # nn.Module.__call__ reads self.forward

    def generate() -> None:
        nonlocal stale
        own.pop("forward", None)
        if stale:
            stale = False
            del own["recompile"]  # the real one, through the FSDP-safe helper
            try:
                recompile(gm)
            finally:
                own["recompile"] = mark_stale

    def forward_after_recompile(*args: Any, **kwargs: Any) -> Any:
        generate()
        return gm.forward(*args, **kwargs)

    own["recompile"] = mark_stale
    passed = False
    try:
        yield
        passed = True
    finally:
        own.pop("recompile", None)
        own.pop("forward", None)
        if stale:
            try:
                recompile(gm)
            except Exception:
                if passed:  # after a failed pass, its own error is the one to report
                    raise


def run_passes(gm: GraphModule, passes: Sequence[PassBase], *, check: bool = True) -> PassResult:
    """Run ``passes`` in order with ``torch.fx``'s PassManager, checking the graph after each.

    A failure raises the ``FxSparseError`` the pass raised, or a ``PassError`` naming the pass
    (and the node, where the pass said) with the original error as its cause.
    """
    # each pass checks the graph after itself, so that a failed check names it; PassManager's
    # checks run once, before the first pass
    pm = PassManager(passes=[_reported(p, check) for p in passes], run_checks_after_each_pass=False)
    if check:
        pm.add_checks(check_graph)
    managed = _MANAGED.set(True)
    try:
        with _code_generated_once(gm):
            return pm(gm)
    except FxSparseError:
        raise  # the check before the first pass
    except Exception as e:
        # PassManager wraps every failure in a bare Exception ("An error occurred when running the
        # 'X' pass after ..."); the user needs the error under it
        error = e.__cause__
        if isinstance(error, FxSparseError):
            raise error from error.__cause__  # keeps a pass error's own cause, drops the wrapper
        if error is None:
            raise
        raise PassError(f"{e}: {type(error).__name__}: {error}", cause=error) from error
    finally:
        _MANAGED.reset(managed)
