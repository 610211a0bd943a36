"""Command-line parsing only: argv -> options -> one call into the package."""

from __future__ import annotations

import argparse
import sys

from .config import AUGMENTS, OPTIMIZERS, POOLS, PRESETS, SCHEDULES
from .errors import CnnlabError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        print(f"cnnlab: error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def _train_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train a model on a dataset",
        description="Train MODEL (lenet5, resnet18) on DATASET (mnist, fashion-mnist, cifar10, "
                    "folder:PATH). Options beat --config, which beats --preset.")
    p.add_argument("model", help="lenet5 or resnet18")
    p.add_argument("dataset", help="mnist, fashion-mnist, cifar10 or folder:PATH")
    p.add_argument("--preset", help=f"{' | '.join(PRESETS)} (default fast); seed = the "
                   "report's exact settings")
    p.add_argument("--config", help="TOML file with option values (keys as the option names)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--optimizer", help=" | ".join(OPTIMIZERS))
    p.add_argument("--lr", type=float, help="(peak) learning rate")
    p.add_argument("--momentum", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--schedule", help=" | ".join(SCHEDULES))
    p.add_argument("--label-smoothing", type=float)
    p.add_argument("--augment", help=" | ".join(AUGMENTS))
    p.add_argument("--pool", help=f"{' | '.join(POOLS)} (LeNet-5's pooling)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--log-every", type=int, help="log the mean training loss every N steps "
                   "(default 100)")
    p.add_argument("--data-dir", help="data root in torchvision's layout "
                   "(default $CNNLAB_DATA, else ./data)")
    p.add_argument("--no-download", dest="download", action="store_false", default=None,
                   help="fail instead of downloading missing data")
    p.add_argument("--out", help="run directory (default runs/<time>-<model>-<dataset>)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cnnlab", description="Train classic CNNs fast, with run "
                     "directories you can trust.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _train_parser(sub)
    return parser


def _train(args: argparse.Namespace) -> int:
    from . import train

    options = vars(args).copy()
    for key in ("command", "model", "dataset", "config", "out", "quiet"):
        options.pop(key)
    summary = train(args.model, args.dataset, config=args.config, out=args.out,
                    progress=not args.quiet, **options)
    print(f"{summary['model']} on {summary['dataset']}: final test accuracy "
          f"{summary['final_test_acc']:.2f}%, best {summary['best_test_acc']:.2f}% "
          f"(epoch {summary['best_epoch']}), {summary['train_seconds']:.1f} s training, "
          f"{summary['images_per_second']:,.0f} img/s on {summary['device']}", file=sys.stderr)
    print(summary["run_dir"])
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"train": _train}[args.command](args)
    except CnnlabError as e:
        print(f"cnnlab: error: {e}", file=sys.stderr)
        return 2
