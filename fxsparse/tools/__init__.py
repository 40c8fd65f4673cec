"""The tools built on the fxsparse library: what the ``fxsparse`` command line runs.

* ``train``: the reference trainer (``Trainer``: checkpoints, resume, precise BN, DDP/FSDP2),
  with ``checkpoint`` (atomic, resumable), ``metrics`` (metrics.jsonl) and ``plots``;
* ``compare`` and ``regime``: paired recipe studies and the regime map across them;
* ``bench``: speed and memory of a training step, side by side;
* ``zoo``: the zoo-wide sweeps (tracing, numeric, the whole recipe) in isolated workers.

The library they build on (``fxsparse.trace``, ``fxsparse.passes``, ``fxsparse.masks``,
``fxsparse.gates``, ``fxsparse.RecipeScheduler``, ``fxsparse.export``) never imports them.
"""
