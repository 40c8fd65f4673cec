"""``fxsparse train MODEL``: the reference trainer (fxsparse.tools.train) on the command line.

The recipe holds the training protocol; the shortcut options (--epochs, --lr, --sparsity, ...)
and ``--set key=value`` are recipe overrides by dotted key, validated like the recipe file.
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Any

from .common import add_set_arg, parse_sets

_EPILOG = """\
examples:
  fxsparse train fxsparse.nets:resnet8 --recipe tost --sparsity 0.95 --epochs 6 --out runs/quickstart
  fxsparse train fxsparse.nets:resnet20 --data cifar10 --data-root ~/data/cifar-10-python.tar.gz --out runs/r20
  fxsparse train resnet18 --recipe baseline --mask-method snip --distribution global --epochs 30
  fxsparse train fxsparse.nets:resnet8 --set ghost_skips.schedule.anneal_until=0.4 --set ghost_skips.schedule.remove_at=0.4
  fxsparse train fxsparse.nets:resnet8 --epochs 6 --out runs/quickstart --resume     # continue a killed run

Outputs in --out: metrics.jsonl, checkpoint-*.pt (checkpoint-*.dcp/ directories under --fsdp; + checkpoints.json), model.safetensors,
masks.safetensors, summary.json, training_curves.png, gates.png, mask_density.png.
See docs/training.md.
"""

# shortcut option -> recipe key
_SHORTCUTS = {
    "epochs": "training.epochs", "batch_size": "training.batch_size", "lr": "training.lr",
    "optimizer": "training.optimizer", "lr_schedule": "training.lr_schedule",
    "mask_method": "masks.method", "sparsity": "masks.sparsity", "distribution": "masks.distribution",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..data import DATASETS
    from ..masks import DISTRIBUTIONS, METHODS

    p = subparsers.add_parser(
        "train",
        help="train a sparse network with a recipe: real data, checkpoints, resume, metrics, plots, export",
        description="Train MODEL with a recipe (default: tost) on real data. Defaults are the recipe's protocol "
        "(tost: ToST's SGD momentum 0.9, weight decay 2e-4, lr 0.1 stepped x0.1 at 49.5% and 74.2% of "
        "training, batch 128, 182 epochs); the options below override it. Checkpoints are written atomically "
        "after every epoch; --resume continues a killed run exactly.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", metavar="MODEL", help="timm name, tv:NAME (torchvision) or module:attr "
                   "(e.g. fxsparse.nets:resnet20)")

    g = p.add_argument_group("data")
    g.add_argument("--data", default="mnist5k", metavar="NAME|PATH",
                   help=f"{' | '.join(DATASETS)}, a .safetensors/.pt file written by fxsparse.data.save, or a "
                   "directory of class folders (default: mnist5k, bundled)")
    g.add_argument("--data-root", metavar="P", help="where fashion-mnist, mnist, cifar10/100 or imagefolder files are")

    g = p.add_argument_group("recipe (each option here overrides a recipe key)")
    g.add_argument("--recipe", default="tost", metavar="NAME|FILE",
                   help="a shipped recipe (tost, baseline, ghost_neurons, ...) or a TOML file (default: tost)")
    add_set_arg(g, help="override a recipe key by dotted path, VALUE in TOML syntax (0.4, true, [0.5, 0.75], "
                   "snip); repeatable. The options below win over --set of the same key")
    g.add_argument("--epochs", type=int, metavar="E", help="training.epochs (lr milestones and ghost schedules scale with it)")
    g.add_argument("--batch-size", type=int, metavar="B", help="training.batch_size")
    g.add_argument("--lr", type=float, help="training.lr (initial learning rate)")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), help="training.optimizer")
    g.add_argument("--lr-schedule", choices=("step", "cosine", "constant"), help="training.lr_schedule")
    g.add_argument("--lrsi-iters", type=int, metavar="N",
                   help="LRsI (rescale) iterations; default: the recipe's, capped at 30 on CPU")

    g = p.add_argument_group("mask")
    g.add_argument("--mask-method", choices=METHODS, metavar="M", help=f"masks.method: {' | '.join(METHODS)}")
    g.add_argument("--sparsity", type=float, metavar="S", help="masks.sparsity, fraction removed in [0, 1)")
    g.add_argument("--distribution", choices=DISTRIBUTIONS, metavar="D",
                   help=f"masks.distribution: {' | '.join(DISTRIBUTIONS)}")
    g.add_argument("--mask-file", metavar="F", help="use the mask in F (fxsparse.masks.save format, or a torch "
                   "dict of {param: bool}); sets masks.method = file")
    g.add_argument("--imp-epochs", type=int, default=1, metavar="N",
                   help="with --mask-method imp: training epochs per pruning round (default: 1)")
    g.add_argument("--calib-batches", type=int, default=8, metavar="N",
                   help="training batches for data-driven masks and LRsI (default: 8)")

    g = p.add_argument_group("hardware")
    g.add_argument("--device", default="auto", help="auto (cuda if available) | cpu | cuda | cuda:N (default: auto)")
    g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bfloat16 autocast (default: on for CUDA)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for CUDA)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (recompiles once per removal)")
    g.add_argument("--workers", type=int, metavar="N", help="CPU threads for torch (torch.set_num_threads); "
                   "batches are built on the device, so there are no loader worker processes")
    g.add_argument("--fsdp", nargs="?", const="layers", default=None, metavar="UNITS",
                   help="under torchrun, shard with FSDP2 instead of DDP: one unit per conv/linear layer, or UNITS, "
                   "comma-separated module names (blocks); checkpoints are sharded (torch.distributed.checkpoint "
                   "directories) and --resume takes them on any number of processes (docs/distributed.md)")
    g.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms (with --workers 1 on CPU: bit-identical reruns)")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="seeds the model init, random mask, data order and "
                   "validation split (default: 0)")

    g = p.add_argument_group("output")
    g.add_argument("--out", metavar="DIR", help="run directory (default: runs/<model>-<recipe>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its newest valid checkpoint")
    g.add_argument("--val", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate on the validation split after every epoch (default: on)")
    g.add_argument("--keep-checkpoints", type=int, default=2, metavar="N", help="checkpoints kept (default: 2)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    g.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.set_defaults(func=run)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    overrides = parse_sets(args.sets)
    for option, key in _SHORTCUTS.items():
        value = getattr(args, option)
        if value is not None:
            overrides[key] = value
    if args.mask_file:
        overrides["masks.method"] = "file"
        overrides["masks.path"] = os.path.abspath(args.mask_file)
    return overrides


def run(args: argparse.Namespace) -> int:
    from ..tools.train import TrainConfig, Trainer

    out = args.out or os.path.join("runs", f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', args.model.split(':')[-1])}-"
                                           f"{os.path.basename(args.recipe).removesuffix('.toml')}")
    recipe = args.recipe if not args.recipe.endswith(".toml") else os.path.abspath(args.recipe)
    config = TrainConfig(
        model=args.model, out=out, data=args.data, data_root=args.data_root, recipe=recipe,
        overrides=overrides_from_args(args), seed=args.seed, device=args.device, bf16=args.bf16,
        channels_last=args.channels_last, compile=args.compile, deterministic=args.deterministic,
        threads=args.workers, val=args.val, resume=args.resume, calib_batches=args.calib_batches,
        lrsi_iters=args.lrsi_iters, imp_epochs=args.imp_epochs, keep_checkpoints=args.keep_checkpoints,
        progress=args.progress, quiet=args.quiet, fsdp=args.fsdp,
    )
    Trainer(config).run()
    return 0
