"""fxsparse.passes: one graph-rewriting pass per file, each ghost pass beside its removal.

=====================  =============================  ====================================
file                   pass                           removal
=====================  =============================  ====================================
``mask.py``            ``MaskPass``                   ``StripMasksPass`` (fxsparse.strip_masks)
``rescale_init.py``    ``RescaleInitPass`` (LRsI)     (none: scales are folded in)
``ghost_neurons.py``   ``GhostNeuronPass``            ``RemoveGhostNeuronsPass``
``ghost_skips.py``     ``GhostSkipPass``              ``RemoveGhostSkipsPass``
``ghost_channels.py``  ``GhostChannelPass``           ``RemoveGhostChannelsPass``
=====================  =============================  ====================================

``PASS_ORDER`` is the order a recipe runs them in; ``GHOST_GROUPS`` names each ghost group's
removal pass as "module:Class" (imported lazily, so importing one pass never imports all).
"""
from __future__ import annotations

import importlib

# group -> (pass, removal pass), as "module:Class" under fxsparse.passes
GHOST_GROUPS: dict[str, tuple[str, str]] = {
    "ghost_neurons": ("ghost_neurons:GhostNeuronPass", "ghost_neurons:RemoveGhostNeuronsPass"),
    "ghost_skips": ("ghost_skips:GhostSkipPass", "ghost_skips:RemoveGhostSkipsPass"),
    "ghost_channels": ("ghost_channels:GhostChannelPass", "ghost_channels:RemoveGhostChannelsPass"),
}

# The order a recipe applies passes in: masks first (ghosts see the masked layers), then LRsI on
# the masked network, then the ghosts. Skip edges come before ghost channels so that channel
# branches never wrap a skip branch.
PASS_ORDER = ("masks", "rescale", "ghost_neurons", "ghost_skips", "ghost_channels")


def load(spec: str) -> type:
    """Import "module:Class" relative to this package."""
    mod_name, _, cls = spec.partition(":")
    return getattr(importlib.import_module(f"{__name__}.{mod_name}"), cls)
