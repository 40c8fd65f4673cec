"""Finding and removing ghosts, whatever pass added them."""
from __future__ import annotations

from torch.fx import GraphModule

from .pass_infra import container, group_parameters, tagged_nodes

__all__ = ["present", "remove_ghosts", "remove_group", "parameters"]


def present(gm: GraphModule) -> list[str]:
    """The ghost groups currently in the graph, in ``PASS_ORDER``."""
    from .passes import GHOST_GROUPS

    return [g for g in GHOST_GROUPS if tagged_nodes(gm, group=g) or container(gm, g, create=False) is not None]


def remove_group(gm: GraphModule, group: str) -> GraphModule:
    """Run the removal pass of one ghost group in place."""
    from .passes import GHOST_GROUPS, load

    if group not in GHOST_GROUPS:
        raise KeyError(f"unknown ghost group {group!r}; known: {sorted(GHOST_GROUPS)}")
    removal = load(GHOST_GROUPS[group][1])()
    return removal(gm).graph_module


def remove_ghosts(gm: GraphModule) -> GraphModule:
    """Every ghost removal pass, now: leaves the masked original architecture."""
    for group in present(gm):
        gm = remove_group(gm, group)
    return gm


def parameters(gm: GraphModule, group: str):
    """The parameters a ghost group added (to hand to, and later drop from, the optimizer)."""
    return group_parameters(gm, group)
