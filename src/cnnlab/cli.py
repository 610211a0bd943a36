"""Command-line parsing only: argv -> options -> one call into the package."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import textwrap
from pathlib import Path

from . import __version__, train
from .bench import CPU_ROWS, GPU_ROWS, run_bench
from .checks import check_option, parse_image_size
from .config import default_data_dir, load_toml, resolve
from .devices import default_device, resolve_device
from .errors import (
    INTERRUPTED,
    CnnlabError,
    Exit,
    Interrupted,
    StoppedAtOnce,
    failure_message,
    lost_contact,
)
from .launch import Nodes, launch, leave_to_launcher, rank_finished, rank_started
from .listing import format_table, list_runs
from .lrfind import END_LR, MAX_STEPS, MIN_STEPS, NOT_USED, START_LR, STEPS, lr_find
from .models import MODELS, describe, label
from .options import ARGUMENT, MANY, OFF, ON, OPTIONS, SWITCH, format_value, number, option_name
from .process import set_up_command
from .progress import say as say_line
from .rank import env_rank
from .report import write_report
from .results import best_text
from .runs import RESULTS_MD, default_run_dir, new_dir
from .specs import SPECS
from .sweep import default_sweep_dir, load_sweep_file, parse_grid_arg, plan_sweep, run_sweep
from .tune import default_tune_dir, plan_tune, run_tune
from .tune_results import summary_lines


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)  # --epoch is a mistake, not --epochs
        super().__init__(*args, **kwargs)

    def error(self, message: str, prog: str | None = None):  # one line, exit 2, no usage
        print(f"cnnlab: error: {message} (see '{prog or self.prog} --help')", file=sys.stderr)
        raise SystemExit(Exit.BAD_INPUT)


def add_train_options(p: argparse.ArgumentParser, leave_out: frozenset[str] = frozenset()
                      ) -> None:
    """One option per Config field a user may set (`cnnlab train` and `cnnlab sweep`), made
    from the field's metadata, but those in `leave_out` (fields that mean nothing to the
    command). Every default is None: an option given beats the config file, which beats the
    preset."""

    for name, o in OPTIONS.items():
        if o.kind != ARGUMENT and name not in leave_out:
            _add_option(p, name)


# In the commands that use a trained model, the one batch is the evaluation's: --batch-size.
_USE_DESTS = {"eval_batch_size": "batch_size"}


def add_use_options(p: argparse.ArgumentParser, *names: str, **default_help: str) -> None:
    """The options of a command that uses a trained model (eval, predict, report, bench):
    those of the Config fields `names` (device, data_dir, eval_batch_size, tta, precision),
    made as for `cnnlab train`, every default None. `default_help`: by field, what the help
    says the command takes where that is not training's default ("default: as the model
    was trained"). The values are checked as train checks them, before the command runs."""
    dests = {_USE_DESTS.get(name, name): name for name in names}
    for dest, name in dests.items():
        _add_option(p, name, dest, default_help.get(name))
    p.set_defaults(use_options=dests)


def _add_option(p: argparse.ArgumentParser, name: str, dest: str | None = None,
                default_help: str | None = None) -> None:
    """The option of Config field `name`, made from its metadata (flag, type, choices, help),
    its value None where not given. `dest`: its name in this command, where not the field's;
    `default_help`: what the help says of the default, where not the field's."""
    from dataclasses import MISSING


    o, dest = OPTIONS[name], dest or name
    flag = f"--{option_name(dest)}"
    if default_help is None and o.default_text:
        default_help = f"default {o.default_text}"
    elif default_help is None and o.kind not in (ON, OFF) and not any(
            o.default is x for x in (MISSING, None, False)):
        default_help = f"default {'on' if o.default is True else format_value(o.default)}"
    text = f"{o.help} ({default_help})" if default_help else o.help
    if o.kind == SWITCH:
        p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
    elif o.kind == ON:
        p.add_argument(flag, action="store_true", default=None, help=text)
    elif o.kind == OFF:
        p.add_argument(f"--no-{flag[2:]}", dest=dest, action="store_false", default=None,
                       help=text)
    elif o.kind == MANY:
        p.add_argument(flag.removesuffix("s"), dest=dest, action="append", help=text,
                       metavar="KEY=VALUE")
    else:
        p.add_argument(flag, type={"int": int, "float": number, "str": str}[o.type], help=text,
                       metavar="|".join(o.choices) if o.choices else None)


def _names() -> tuple[str, str]:
    """The MODEL and DATASET choices, from the registries."""

    return (", ".join([*MODELS, "torchvision:NAME", "timm:NAME", "path/to/net.py:Class",
                       "module:function"]), ", ".join([*SPECS, "folder:PATH"]))


def _train_parser(sub) -> None:
    models, datasets = _names()
    p = sub.add_parser(
        "train", help="train a model on a dataset",
        description=f"Train MODEL ({models}) on DATASET ({datasets}). Options beat --config, "
                    "which beats --preset.")
    p.add_argument("model", nargs="?", help=models)
    p.add_argument("dataset", nargs="?", help=datasets)
    p.add_argument("--config", help="TOML file with option values (keys as the option names)")
    add_train_options(p)
    p.add_argument("--quiet", action="store_true", help="print nothing but errors (and "
                   "notes) on stderr and the run directory on stdout: "
                   "run=$(cnnlab train ... --quiet)")
    p.add_argument("--out", help="run directory (default runs/<time>-<model>-<dataset>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its "
                   "last checkpoint (only safe options, e.g. --epochs, may change)")
    _trust_option(p)
    p.add_argument("--nproc", type=int, help="launch N processes with torchrun on this machine")
    nodes = p.add_argument_group(
        "many machines", "run the same command on every machine, each with its --node-rank; "
        "cnnlab launches torchrun there (one process a machine unless --nproc says more)")
    nodes.add_argument("--nnodes", type=int, help="the number of machines")
    nodes.add_argument("--node-rank", type=int, help="this machine's rank: 0 on --master-addr, "
                       "then 1, 2, ...")
    nodes.add_argument("--master-addr", metavar="HOST", help="the first machine's address, as "
                       "the others reach it")
    nodes.add_argument("--master-port", type=int, default=29500,
                       help="its port for the rendezvous (default 29500)")
    nodes.add_argument("--rdzv-timeout", type=float, default=300, metavar="SECONDS",
                       help="how long a machine waits for the others to start (default 300)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="cnnlab", description="Train classic CNNs fast, with run "
                     "directories you can trust.")
    parser.add_argument("--version", action="version", version=f"cnnlab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _train_parser(sub)
    _sweep_parser(sub)
    _tune_parser(sub)
    _report_parser(sub)
    _runs_parser(sub)
    _use_parsers(sub)
    _bench_parser(sub)
    _summary_parser(sub)
    _models_parser(sub)
    _lr_find_parser(sub)
    parser.commands = sub.choices  # command name -> its parser
    return parser


def unknown_arguments(parser: argparse.ArgumentParser, command: str, unknown: list[str]) -> str:
    """What parse_known_args left over, as an error: with the nearest option of `command`
    for each mistyped one (--epoch: did you mean --epochs?)."""
    from difflib import get_close_matches

    known = [s for a in parser.commands[command]._actions for s in a.option_strings]
    hints = []
    for arg in unknown:
        name = arg.split("=", 1)[0]
        if name.startswith("--") and (near := get_close_matches(name, known, n=1)):
            hints.append(f"{name}: did you mean {near[0]}?")
    return f"unrecognized arguments: {' '.join(unknown)}" + "".join(f"; {h}" for h in hints)


def train_options(args: argparse.Namespace) -> dict:
    """The config overrides among parsed arguments (those add_train_options defines)."""

    return {k: ", ".join(v) if OPTIONS[k].kind == MANY and v else v
            for k, v in vars(args).items() if k in OPTIONS and OPTIONS[k].kind != ARGUMENT}


def _train(args: argparse.Namespace) -> int:
    if args.resume is None and (args.model is None or args.dataset is None):
        raise CnnlabError("train needs MODEL and DATASET (or --resume RUN_DIR)")
    if any(v is not None for v in (args.nproc, args.nnodes, args.node_rank, args.master_addr)):
        return _launch(args)
    summary = train(args.model, args.dataset, config=args.config, out=args.out,
                    resume=args.resume, progress=not args.quiet, trust_code=args.trust_code,
                    **train_options(args))
    if env_rank() != 0:  # under torchrun, rank 0 alone reports
        return Exit.OK
    if not args.quiet:
        print(f"{label(summary['model'])} on {summary['dataset']}: final test accuracy "
              f"{summary['final_test_acc']:.2f}%, {best_text(summary)}, "
              f"{summary['train_seconds']:.1f} s training, "
              f"{summary['images_per_second']:,.0f} img/s on {summary['device']}",
              file=sys.stderr)
    print(summary["run_dir"])
    return Exit.OK


LAUNCHER_OPTIONS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port",
                    "--rdzv-timeout")


def _nodes(args: argparse.Namespace):
    """The machines of a `--nnodes` run (launch.Nodes), checked; None for one machine."""

    if args.nnodes is None or args.nnodes == 1:
        for name in ("node_rank", "master_addr"):
            if getattr(args, name) not in (None, 0):
                raise CnnlabError(f"--{name.replace('_', '-')} is for a run on many machines; "
                                  "give --nnodes N too")
        return None
    if not 2 <= args.nnodes <= 1024:
        raise CnnlabError(f"--nnodes must be from 1 to 1024, got {args.nnodes}")
    if args.node_rank is None or not 0 <= args.node_rank < args.nnodes:
        raise CnnlabError(f"--nnodes {args.nnodes} needs --node-rank from 0 to "
                          f"{args.nnodes - 1}: 0 on --master-addr, then 1, 2, ... on the "
                          f"others{'' if args.node_rank is None else f', got {args.node_rank}'}")
    if not args.master_addr:
        raise CnnlabError("--nnodes needs --master-addr HOST: the address of the machine with "
                          "--node-rank 0, as the others reach it")
    if not 1 <= args.master_port <= 65535:
        raise CnnlabError(f"--master-port must be from 1 to 65535, got {args.master_port}")
    if not 1 <= args.rdzv_timeout <= 86400:
        raise CnnlabError(f"--rdzv-timeout must be from 1 to 86400 seconds, got "
                          f"{args.rdzv_timeout:g}")
    if not (args.out or args.resume):
        raise CnnlabError("--nnodes needs --out RUN_DIR (or --resume RUN_DIR): every machine "
                          "names the same run directory")
    return Nodes(args.nnodes, args.node_rank, args.master_addr, args.master_port,
                 args.rdzv_timeout)


def _launch(args: argparse.Namespace) -> int:
    """`--nproc N` (and `--nnodes`): check the options here (one line, not one per rank),
    then torchrun, with the run directory named (the launcher says where to resume should a
    rank die)."""
    import contextlib


    args.nproc = 1 if args.nproc is None else args.nproc
    if not 1 <= args.nproc <= 1024:
        raise CnnlabError(f"--nproc must be {'positive' if args.nproc < 1 else 'at most 1024'}"
                          f", got {args.nproc}")
    nodes = _nodes(args)
    device = default_device(args.device)
    if args.resume is None:
        cfg = resolve(args.model, args.dataset, overrides=train_options(args),
                      file_values=load_toml(args.config) if args.config else {})
        if cfg.cuda_graph and args.nproc > 1:
            raise CnnlabError("--cuda-graph trains in one process; leave it out with --nproc")
        device = cfg.device
    if device != "cpu":  # one GPU a process: say so before any process starts
        import torch

        gpus = torch.cuda.device_count()
        if (gpus or device != "auto") and gpus < args.nproc:
            raise CnnlabError(f"--nproc {args.nproc}: this machine has {gpus} GPU(s) and each "
                              f"process needs its own; use --nproc {max(gpus, 1)}, or --device "
                              f"cpu to run {args.nproc} processes on the CPU")
        if not gpus and args.nproc > 1:
            print(f"cnnlab: note: no GPU here: the {args.nproc} processes train on the CPU, "
                  "each with its share of the cores", file=sys.stderr)
    rest, skip = [], False
    for arg in args.argv:  # the launcher's own options do not reach the ranks
        if skip:
            skip = False
        elif arg in LAUNCHER_OPTIONS:
            skip = True
        elif arg.split("=", 1)[0] not in LAUNCHER_OPTIONS:
            rest.append(arg)
    if args.resume or args.out:
        return launch(args.nproc, rest, args.resume or args.out, nodes)
    run_dir = new_dir(default_run_dir(cfg.model, cfg.dataset))  # claimed, as one process does
    try:
        return launch(args.nproc, [*rest, "--out", str(run_dir)], run_dir, nodes)
    finally:
        with contextlib.suppress(OSError):  # still empty: no run started, none is left
            run_dir.rmdir()


# ---------------------------------------------------------------- use a trained model

def _trust_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-code", action="store_true",
                   help="a run of your own model: run the run's copy of its code (model_source"
                        ".py) even where it does not come from your own, unchanged file - "
                        "read it first: loading a model runs its code")


def _use_parsers(sub) -> None:
    """`cnnlab eval`, `cnnlab predict` and `cnnlab export`."""
    ckpt_help = "a checkpoint (.pt) or a run directory (its best.pt)"
    p = sub.add_parser(
        "eval", help="score a trained model on a labelled split",
        description="Accuracy, loss, per-class precision/recall and the confusion matrix of "
                    "a trained model; also written as eval-*.json and confusion-*.png beside "
                    "the checkpoint.")
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN_DIR", help=ckpt_help)
    _trust_option(p)
    p.add_argument("--dataset", help="default: the dataset the model was trained on")
    p.add_argument("--split", default="test", help="test (default) or train")
    p.add_argument("--no-download", dest="download", action="store_false",
                   help="fail instead of downloading missing data")
    add_use_options(p, "data_dir", "tta", "eval_batch_size", "precision", "device",
                    data_dir="default: the one used in training",
                    tta="models trained with flips only; default: as training scored the "
                        "model",
                    eval_batch_size="default: training's eval batch size",
                    precision="default fp32")
    p.set_defaults(precision="fp32")
    p.add_argument("--out-dir", help="where to write the files (default: beside the "
                   "checkpoint)")
    p.add_argument("--mistakes", type=int, default=0, metavar="N",
                   help="also draw the model's mistakes: the N most confidently wrong images "
                        "(top_losses-*.png), saliency maps of the first 4 (saliency-*.png) "
                        "and the most confused pairs of classes (confused-*.png); default 0: "
                        "none")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser(
        "predict", help="classify your own images",
        description="Top-k classes of each image (any format Pillow reads), prepared as in "
                    f"training. Exit status {Exit.SOME_FILES_UNREADABLE.value} if some files "
                    "could not be read.")
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN_DIR", help=ckpt_help)
    _trust_option(p)
    p.add_argument("images", metavar="IMAGE_OR_FOLDER", nargs="+",
                   help="image files, and folders whose images (also in subfolders) to classify")
    p.add_argument("--top-k", type=int, default=3, help="classes to show (default 3)")
    p.add_argument("--invert", default="auto", help="auto (default: invert light-background "
                   "images for MNIST-style models) | yes | no")
    add_use_options(p, "eval_batch_size", "device", eval_batch_size="default 256")
    p.set_defaults(batch_size=256)
    p.add_argument("--json", action="store_true", help="print one JSON array")

    p = sub.add_parser(
        "export", help="export a trained model to ONNX, torch.export or TorchScript",
        description="Write the model as ONNX, torch.export's ExportedProgram (.pt2) or "
                    "TorchScript (deprecated by PyTorch: prefer export) - input: the "
                    "normalised images, output: logits - checked to match PyTorch within 1e-4 "
                    "of the logits' scale on random images and on the first 256 test images "
                    "of the model's dataset where it is at hand, with the class names and "
                    "preprocessing inside and in FILE.json.")
    p.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN_DIR", help=ckpt_help)
    _trust_option(p)
    p.add_argument("--format", required=True, help="onnx | export | torchscript")
    p.add_argument("--out", metavar="FILE", help="default: beside the checkpoint, "
                   "<name>.onnx, <name>.pt2 or <name>.torchscript.pt")
    add_use_options(p, "data_dir", data_dir="default: where the model was trained from; "
                    "the test images the parity is checked on, never downloaded")


def _eval(args: argparse.Namespace) -> int:
    import json

    from .inference import evaluate_checkpoint, format_eval, save_eval
    from .mistakes import files_line

    result = evaluate_checkpoint(args.checkpoint, dataset=args.dataset, split=args.split,
                                 data_dir=args.data_dir, download=args.download,
                                 tta=args.tta, batch_size=args.batch_size,
                                 precision=args.precision, device=resolve_device(args.device),
                                 mistakes=args.mistakes, trust_code=args.trust_code)
    files = save_eval(result, args.out_dir or Path(result["checkpoint"]).parent)
    if args.json:
        print(json.dumps(result | {"files": files}))
    else:
        print(format_eval(result))
    print(f"wrote {files['json']} and {files['png']}", file=sys.stderr)
    if args.mistakes:
        print(files_line(files), file=sys.stderr)
    return Exit.OK


def _predict(args: argparse.Namespace) -> int:
    import json

    from .predict import format_prediction, predict

    results = predict(args.checkpoint, args.images, top_k=args.top_k, invert=args.invert,
                      batch_size=args.batch_size, device=resolve_device(args.device),
                      trust_code=args.trust_code)
    for r in results:
        if "error" in r:
            print(f"cnnlab: error: {r['error']}", file=sys.stderr)
        elif not args.json:
            print(format_prediction(r))
    if args.json:
        print(json.dumps(results))
    return Exit.SOME_FILES_UNREADABLE if any("error" in r for r in results) else Exit.OK


def _check_use_options(args: argparse.Namespace) -> None:
    """Refuse, as train does, a value out of the choices or range of an option that
    add_use_options made (before anything is loaded)."""

    for dest, name in getattr(args, "use_options", {}).items():
        check_option(name, getattr(args, dest), option_name(dest))


def _export(args: argparse.Namespace) -> int:
    from .export import export_model

    info = export_model(args.checkpoint, args.format, args.out, data_dir=args.data_dir,
                        trust_code=args.trust_code)
    parity = info["parity"]
    agreement = (f", the same class for {parity['top1_agreement']} images"
                 if "top1_agreement" in parity else "")
    print(f"exported {info['model']} as {info['format']} ({len(info['classes'])} classes); "
          f"max |logit difference| to PyTorch {info['max_abs_diff']:.2g} "
          f"({parity['checked_with']}) on {parity['checked_on']}{agreement}; metadata in "
          f"{info['metadata_path']}", file=sys.stderr)
    print(info["path"])
    return Exit.OK


def _sweep_parser(sub) -> None:
    models, datasets = _names()
    p = sub.add_parser(
        "sweep", help="train a grid of options times seeds",
        description="Train every point of a grid - the cross product of the --grid values, or "
                    "a sweep file's [grid] and points - for --seeds seeds, each run an ordinary "
                    "run directory under the sweep directory, then write results.csv, "
                    "results.md, accuracy.png, loss.png and comparison.png there. The sweep is "
                    "an Optuna study: the same command run again, or on other machines (with "
                    "--storage and a shared --out), adds workers that take the points not yet "
                    "trained; an unfinished run continues from its checkpoint. Options beat "
                    "the sweep file's [train] table, which beats --preset.")
    p.add_argument("model", nargs="?", help=f"{models} (or the sweep file's)")
    p.add_argument("dataset", nargs="?", help=f"{datasets} (or the sweep file's)")
    p.add_argument("--config", metavar="SWEEP_TOML", help="sweep file: model, dataset, seeds, "
                   "[train] fixed options, [grid] value lists and/or points = [{...}, ...]")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a train option and its values (repeat for a cross product); "
                   "separate with ';' when values hold commas: 'augment=none;crop,flip'")
    p.add_argument("--seeds", type=int, help="runs per point, seeds seed, seed+1, ... "
                   "(default: the sweep file's, else 1)")
    add_train_options(p)
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N runs at once, each in a process of its own: on the CPU they "
                   "share the cores; on one GPU they share it (runs with small batches leave "
                   "most of a GPU idle); on several GPUs each job has one, round-robin "
                   "(default 1: one run after another, with a progress bar)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors (and "
                   "notes) on stderr and the sweep directory on stdout: no progress, no line "
                   "per run, no summary")
    p.add_argument("--out", help="sweep directory (default sweeps/<sweep file name>, else "
                   "sweeps/<model>-<dataset>-<grid keys>); on a filesystem every worker "
                   "reaches when workers run on several machines")
    _study_options(p, "sweep")


def _study_options(p: argparse.ArgumentParser, what: str) -> None:
    """--storage and --study: where the Optuna study of a sweep or a search lives."""
    p.add_argument("--storage", metavar="URL", help="the Optuna study's storage: any URL "
                   "Optuna takes, e.g. postgresql://USER@HOST/DB for workers on many machines "
                   f"(default: sqlite in the {what} directory)")
    p.add_argument("--study", metavar="NAME", help="the study's name in the storage "
                   f"(default: the {what} directory's name and a digest of what it trains)")


def _sweep(args: argparse.Namespace) -> int:

    spec = load_sweep_file(args.config) if args.config else {}
    if args.model is not None and args.dataset is None:
        raise CnnlabError("sweep needs both MODEL and DATASET (or a sweep file with --config)")
    grid = dict(spec.get("grid", {}))  # plan_sweep makes the keys Config field names
    for text in args.grid:
        key, values = parse_grid_arg(text)
        grid[key] = values
    plan = plan_sweep(args.model or spec.get("model"), args.dataset or spec.get("dataset"),
                      grid=grid, points=spec.get("points"),
                      seeds=args.seeds if args.seeds is not None else spec.get("seeds", 1),
                      train=spec.get("train"), options=train_options(args),
                      say=None if args.quiet else functools.partial(say_line, "sweep"))
    out = args.out or default_sweep_dir(plan, args.config)
    result = run_sweep(plan, out, progress=not args.quiet, jobs=args.jobs,
                       storage=args.storage, study_name=args.study)
    if not args.quiet:
        print(f"{result['finished']} of {result['total']} runs finished; results.md and "
              f"results.csv in {out}", file=sys.stderr)
        if result["verdict"]:
            print(result["verdict"], file=sys.stderr)
    print(out)
    return _refused(result["refused"], out)


def _refused(reasons: list[str], out: str | Path) -> int:
    """The exit status of a sweep or search that refused `reasons`' trials: said in a line."""
    if not reasons:
        return Exit.OK
    print(f"cnnlab: {len(reasons)} trial{'s' if len(reasons) > 1 else ''} of the study "
          f"{'were' if len(reasons) > 1 else 'was'} refused, the others ran (the first: "
          f"{reasons[0]}); see {Path(out) / RESULTS_MD}", file=sys.stderr)
    return Exit.SOME_TRIALS_REFUSED


def _tune_parser(sub) -> None:
    models, datasets = _names()
    p = sub.add_parser(
        "tune", help="search options over ranges, stopping hopeless trials early",
        description="Search train options over ranges with Optuna: each trial an ordinary run "
                    "directory trial-NNNN under the tune directory, scored by its best "
                    "validation accuracy, or with --target by its training time to that "
                    "accuracy (--val-split, or a folder's val/, is required: choosing on test "
                    "is optimistic), a hopeless one stopped by the pruner after an epoch; "
                    "then best.toml (train it with 'cnnlab train MODEL DATASET "
                    "--config DIR/best.toml'), results.md, history.png and importance.png. "
                    "The other options fix the rest of the recipe. Running the same command "
                    "again continues the search.")
    p.add_argument("model", help=models)
    p.add_argument("dataset", help=datasets)
    p.add_argument("--space", action="append", required=True, metavar="KEY=SPEC",
                   help="a train option and where to search it: LOW:HIGH (uniform; whole "
                   "numbers for integer options), LOW:HIGH:log, or A,B,C (one of these values; "
                   "';' between values that hold commas); repeat for each option")
    add_train_options(p)
    p.add_argument("--trials", type=int, default=20, metavar="N",
                   help="trials in all, over every worker (default 20)")
    p.add_argument("--sampler", choices=("tpe", "random", "grid"), default="tpe",
                   help="tpe (default): Optuna's Tree-structured Parzen Estimator; random; "
                   "grid: every combination of the listed values once (A,B,C spaces only). "
                   "Seeded by --seed unless --storage is given")
    p.add_argument("--target", type=float, metavar="ACC",
                   help="score each trial by its training time, to be made as short as "
                   "possible, if its final validation accuracy reaches ACC percent (a trial "
                   "below it does not count); without it, by its best validation accuracy")
    p.add_argument("--pruner", choices=("median", "hyperband", "time", "none"),
                   help="median (the default without --target): stop a trial whose "
                   "validation accuracy after an epoch is below the median of the complete "
                   "trials' at that epoch (once 5 are complete); hyperband; time (the default "
                   "with --target): stop a trial once it has trained longer than the fastest "
                   "that reached the target; none")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run N trials at once, each in a process of its own (as cnnlab sweep "
                   "--jobs)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors (and "
                   "notes) on stderr and the tune directory on stdout")
    p.add_argument("--out", help="tune directory (default tunes/<model>-<dataset>-<searched "
                   "options>)")
    _study_options(p, "tune")


def _tune(args: argparse.Namespace) -> int:

    search = plan_tune(args.model, args.dataset, args.space, options=train_options(args),
                       trials=args.trials, sampler=args.sampler, pruner=args.pruner,
                       target=args.target)
    out = args.out or default_tune_dir(search)
    result = run_tune(search, out, progress=not args.quiet, jobs=args.jobs,
                      storage=args.storage, study_name=args.study)
    if not args.quiet:
        for line in summary_lines(result):
            print(f"cnnlab tune: {line}", file=sys.stderr)
        if result["best"]:
            print(f"cnnlab tune: train it: cnnlab train {args.model} {args.dataset} --config "
                  f"{out}/best.toml", file=sys.stderr)
    print(out)
    return _refused(result["refused"], out)


def _report_parser(sub) -> None:
    p = sub.add_parser(
        "report", help="write report.html and report.md for runs and sweeps",
        description="Write report.html (self-contained) and report.md for run and sweep "
                    "directories: configuration, environment, accuracy, curves, utilisation, "
                    "per-class accuracy and confusion matrix of the best checkpoint on the test "
                    "split, and a comparison of several runs.")
    p.add_argument("dirs", nargs="+", metavar="RUN_OR_SWEEP_DIR",
                   help="run directories (cnnlab train's) and sweep directories (cnnlab "
                   "sweep's); several are compared")
    p.add_argument("--out", help="report directory (default: the directory given, if one; "
                   "else reports/<time>)")
    add_use_options(p, "data_dir", "device",
                    data_dir="default: where each run found its data")
    p.add_argument("--no-eval", action="store_true", help="leave out per-class accuracy and "
                   "the confusion matrix (needs no data)")
    _trust_option(p)


def _report(args: argparse.Namespace) -> int:

    written = write_report(args.dirs, args.out, evaluate=not args.no_eval,
                           data_dir=args.data_dir, device=args.device,
                           trust_code=args.trust_code)
    print(written["md"])
    print(written["html"])
    return Exit.OK


def _runs_parser(sub) -> None:
    p = sub.add_parser(
        "runs", help="list run, sweep and search directories",
        description="List the run directories under DIR, and sweep and tune directories one "
                    "row each, oldest first: model, dataset, status (finished; interrupted, "
                    "diverged or pruned at step N; running; not started; damaged), best and "
                    "final test accuracy, epochs done of epochs, training time and when it "
                    "started. Reads only the runs' JSON files and the end of metrics.jsonl.")
    p.add_argument("dirs", nargs="*", metavar="DIR", help="folders to look in (default "
                   "runs/; sweeps/, tunes/, or one sweep or run directory)")
    p.add_argument("--expand", action="store_true", help="also list each sweep's and "
                   "search's runs, indented below it")
    p.add_argument("--json", action="store_true", help="print one JSON array (a sweep's "
                   "runs under \"runs\")")


def _runs(args: argparse.Namespace) -> int:
    import json


    dirs = args.dirs or ["runs"]
    entries = list_runs(dirs)
    if not entries:
        print(f"no runs under {', '.join(dirs)}", file=sys.stderr)
    if args.json:
        print(json.dumps([e.to_json() for e in entries]))
    elif entries:
        print(format_table(entries, expand=args.expand))
    return Exit.OK


def _bench_parser(sub) -> None:

    p = sub.add_parser("bench", help="time-to-accuracy and throughput against the reference",
                       description="Benchmark cnnlab against the lab report's pipeline "
                       "(cnnlab.reference) and print a table; --out writes JSON.")
    p.add_argument("--suite", choices=("cpu", "gpu", "all"), default="cpu",
                   help="cpu (default): LeNet-5's seed recipe, loop and whole process, "
                   "against the reference; the fast preset's time to 99%%; the first decode "
                   "and a cached read of the CIFAR-10 folder; ResNet-18 training img/s "
                   "(with the folder). gpu: fastnet's time to 90.5%% over 5 seeds, "
                   "ResNet-18 to 91%%, LeNet-5 training and whole process, utilisation, "
                   "eager vs --compile vs --cuda-graph step times (needs a CUDA GPU). "
                   "all: both")
    add_use_options(p, "data_dir")
    p.add_argument("--cifar-folder", help="CIFAR-10 as an image folder with train/ and test/ "
                   "(default DATA_DIR/cifar10-jpeg)")
    p.add_argument("--out", help="write every figure as JSON here")
    p.add_argument("--rows", metavar="KEY,...", help="only these of the suite's row groups, "
                   f"in the suite's order (default all): cpu {', '.join(CPU_ROWS)}; "
                   f"gpu {', '.join(GPU_ROWS)}")


def _bench(args: argparse.Namespace) -> int:

    data_dir = default_data_dir(args.data_dir)
    run_bench(args.suite, data_dir, args.cifar_folder or f"{data_dir}/cifar10-jpeg", args.out,
              args.rows)
    return Exit.OK


def _summary_parser(sub) -> None:
    models, datasets = _names()
    p = sub.add_parser(
        "summary", help="a network's layers: output shapes, parameters, multiply-adds",
        description=f"Each layer of MODEL ({models}) on the images of DATASET ({datasets}): "
                    "its output shape, parameters and multiply-adds (torch's flop counter), "
                    "the output-size formula (n + 2p - f)/s + 1 worked for each convolution "
                    "and pooling layer, and the totals. Needs no data but the dataset's shape "
                    "(a folder's: its first training image and its class folders).")
    p.add_argument("model", help=models)
    p.add_argument("dataset", help=datasets)
    add_use_options(p, "image_size", "pool", "model_args", "data_dir")  # --data-dir as every
    #                                                                     command takes it
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _summary(args: argparse.Namespace) -> int:
    import json

    from .summary import format_summary, summarize

    size = None if args.image_size is None else parse_image_size(args.image_size)
    summary = summarize(args.model, args.dataset, image_size=size, pool=args.pool,
                        model_args=", ".join(args.model_args or ()) or None)
    print(json.dumps(summary) if args.json else format_summary(summary))
    return Exit.OK


def _models_parser(sub) -> None:
    p = sub.add_parser(
        "models", help="the networks cnnlab builds, with their papers and sizes",
        description="Every model of the registry: what it is, its paper and year, its "
                    "parameters (at the input it was designed for, 10 classes) and the images "
                    "it takes. 'cnnlab summary MODEL DATASET' walks one layer by layer.")
    p.add_argument("--json", action="store_true", help="print one JSON array")
    p.add_argument("--all", action="store_true", help="also the models torchvision and timm "
                   "name, and how to name your own")


def _models(args: argparse.Namespace) -> int:
    import json

    rows = [describe(name) for name in MODELS]
    if args.json:
        print(json.dumps(rows))
        return Exit.OK
    head = ("model", "what it is", "paper", "parameters (10 classes)", "images")
    cells = [(r["model"], r["title"], r["citation"],
              f"{r['parameters']:,} at {r['at']}", r["images"]) for r in rows]
    widths = [max(len(row[i]) for row in (head, *cells)) for i in range(len(head))]
    for row in (head, *cells):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if args.all:
        from .models.hub import timm_count, torchvision_names

        names = torchvision_names()
        print(f"\ntorchvision:NAME ({len(names)} models; --pretrained: their ImageNet "
              f"weights):\n" + textwrap.fill(", ".join(names), 100))
        count = timm_count()
        print("\ntimm:NAME: " + (f"{count:,} models (timm.list_models() names them)" if count
                                 else "not installed (pip install 'cnnlab[timm]')"))
        print("\nyour own: path/to/net.py:Class or package.module:function, an nn.Module "
              "class or a function returning one")
    return Exit.OK


def _lr_find_parser(sub) -> None:

    models, datasets = _names()
    p = sub.add_parser(
        "lr-find", help="find a learning rate: the range test",
        description="The learning-rate range test (Smith 2015; fastai's lr_find): a "
                    "throw-away MODEL, built as 'cnnlab train' builds it, takes one training "
                    "step per learning rate, the rate growing exponentially from --start-lr "
                    "to --end-lr (constant schedule; batch-norm groups keep their ratio), "
                    "until the smoothed loss is over 4x its minimum. Suggests the lr of the "
                    "steepest descent and the minimum's lr / 10, and writes lr_find.json and "
                    "lr_find.png into --out. Options beat --config, which beats --preset.")
    p.add_argument("model", help=models)
    p.add_argument("dataset", help=datasets)
    p.add_argument("--config", help="TOML file with option values (keys as the option names)")
    add_train_options(p, leave_out=NOT_USED)
    p.add_argument("--start-lr", type=float, default=START_LR,
                   help=f"the first step's learning rate (default {START_LR:g})")
    p.add_argument("--end-lr", type=float, default=END_LR,
                   help=f"the last step's learning rate (default {END_LR:g})")
    p.add_argument("--steps", type=int, default=STEPS, help=f"steps, {MIN_STEPS} to "
                   f"{MAX_STEPS} (default {STEPS}); more than an epoch's batches: epochs go on")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors (and "
                   "notes) on stderr and the output directory on stdout")
    p.add_argument("--out", help="output directory (default "
                   "runs/lr-find-<time>-<model>-<dataset>)")


def _lr_find(args: argparse.Namespace) -> int:

    result = lr_find(args.model, args.dataset, config=args.config, out=args.out,
                     start_lr=args.start_lr, end_lr=args.end_lr, steps=args.steps,
                     progress=not args.quiet, **train_options(args))
    if not args.quiet:
        lrs = result["suggestions"]
        stopped = f"; stopped early: {result['stop_reason']}" if result["stopped_early"] else ""
        for line in (f"{result['steps_done']} steps in {result['seconds']:.1f} s{stopped}",
                     f"suggested lr: {lrs['steepest']:.3g} (steepest descent), "
                     f"{lrs['minimum_over_10']:.3g} (minimum / 10)",
                     f"train it: {result['command']}"):
            print(f"cnnlab lr-find: {line}", file=sys.stderr)
    print(result["out"])
    return Exit.OK


def main(argv: list[str] | None = None) -> int:
    """The `cnnlab` command; `argv` given: the same, called from Python (then the process's
    settings - signal handlers, warnings, allocator - are left as they are)."""
    command = argv is None  # the process is this command: its settings are ours
    if command:

        set_up_command()
    try:
        argv = sys.argv[1:] if argv is None else argv
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            parser.error(unknown_arguments(parser, args.command, unknown),
                         f"cnnlab {args.command}")
        args.argv = argv
        if command:

            rank_started()
        code = _dispatch(args)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM outside training, or a second one in it
        code = Exit.for_signal(e.signum) if isinstance(e, StoppedAtOnce) else INTERRUPTED

        if env_rank() == 0:  # under torchrun, every rank stops: one says so
            print("cnnlab: stopped at once; files already written are intact (a run "
                  "continues with --resume RUN_DIR)", file=sys.stderr)
    if not command:
        return code
    # Done, the status decided: end the process now. Python's own shutdown would tear torch's
    # modules down for about another second, and a signal meanwhile would print tracebacks
    # ("Exception ignored in atexit callback") and end the process by the signal rather
    # than with `code` (tests/test_reliability.py reproduces it).

    rank_finished(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _dispatch(args: argparse.Namespace) -> int:
    try:
        _check_use_options(args)
        return {"train": _train, "sweep": _sweep, "tune": _tune, "report": _report,
                "runs": _runs, "eval": _eval, "predict": _predict, "summary": _summary,
                "models": _models, "export": _export, "bench": _bench,
                "lr-find": _lr_find}[args.command](args)
    except Interrupted as e:

        if env_rank() == 0:
            print(f"cnnlab: {e}", file=sys.stderr)
        return e.exit_code
    except BrokenPipeError:  # `cnnlab ... | head`: the reader has what it wanted
        with contextlib.suppress(OSError):  # nothing more goes to the closed pipe
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return Exit.OK
    except (CnnlabError, OSError, MemoryError, RuntimeError) as e:
        message = failure_message(e)
        if message is None:
            raise

        if lost_contact(e) and leave_to_launcher(message):
            return Exit.BAD_INPUT
        return _fail(message, getattr(e, "exit_code", Exit.BAD_INPUT))


def _fail(message: str, code: int = Exit.BAD_INPUT) -> int:
    print(f"cnnlab: error: {message}", file=sys.stderr)
    return code

