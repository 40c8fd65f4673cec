"""fxsparse.passes: one graph-rewriting pass per file, each ghost pass beside its removal.

The order a recipe runs them in is ``PASS_ORDER``; ``GHOST_GROUPS`` maps each ghost group to
its (pass, removal pass) pair so the scheduler and ``fxsparse.remove_ghosts`` can find it.
"""
