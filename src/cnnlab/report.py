"""Reports: report.html (self-contained: figures embedded, CSS inline, opens offline) and
report.md (figures as PNG files beside it) for run directories and sweep directories.

A report reads only run directories: configuration, environment, outcome, loss and accuracy
curves, utilisation over time, and - evaluating the best checkpoint on the test split -
per-class accuracy and the confusion matrix; for several runs, a side-by-side comparison.
"""

from __future__ import annotations

import base64
import html
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .config import COMPARED, default_data_dir, option_name
from .errors import CnnlabError, one_line
from .files import atomic_write, read_json, safe_name
from .results import (
    aggregate,
    diverged_error,
    format_value,
    md_table,
    mean_std,
    shown_metrics,
    verdict,
)
from .runs import read_metrics, unique_dir

# ---- the document: blocks rendered as Markdown and as HTML ---------------------------------

@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str
    strong: bool = False


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Figures:
    images: list[tuple[Path, str]]  # (png, alt text), shown side by side


@dataclass
class Document:
    title: str
    blocks: list = field(default_factory=list)

    def add(self, *blocks) -> None:
        self.blocks.extend(blocks)


def render_markdown(doc: Document, out: Path) -> str:
    lines = [f"# {doc.title}", ""]
    for block in doc.blocks:
        if isinstance(block, Heading):
            lines += [f"{'#' * block.level} {block.text}", ""]
        elif isinstance(block, Para):
            lines += [f"**{block.text}**" if block.strong else block.text, ""]
        elif isinstance(block, Table):
            lines += [md_table(block.header, block.rows), ""]
        elif isinstance(block, Figures):
            for path, alt in block.images:
                rel = Path(os.path.relpath(path, out)).as_posix()
                lines += [f"![{alt}]({rel.replace(' ', '%20')})", ""]
    return "\n".join(lines)


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1d1d1f;
       max-width: 1180px; margin: 2em auto; padding: 0 1.2em; line-height: 1.45; }
h1 { font-size: 1.7em; border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { font-size: 1.35em; margin-top: 2em; border-bottom: 1px solid #e5e5e5; }
h3 { font-size: 1.1em; margin-top: 1.4em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .9em; }
th, td { border: 1px solid #d0d0d0; padding: .28em .6em; text-align: left; vertical-align: top; }
th { background: #f3f4f6; }
tr:nth-child(even) td { background: #fafafa; }
.figs { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; }
.figs img { width: calc(50% - 6px); min-width: 420px; max-width: 100%; height: auto;
            box-sizing: border-box; border: 1px solid #e3e3e3; }
.strong { font-weight: 600; background: #eef6ee; padding: .5em .8em; border-left: 4px solid #4a4; }
"""


def render_html(doc: Document) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>{esc(doc.title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
             f"<h1>{esc(doc.title)}</h1>"]
    for block in doc.blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{esc(block.text)}</h{block.level}>")
        elif isinstance(block, Para):
            parts.append(f'<p class="strong">{esc(block.text)}</p>' if block.strong
                         else f"<p>{esc(block.text)}</p>")
        elif isinstance(block, Table):
            head = "".join(f"<th>{esc(str(h))}</th>" for h in block.header)
            head = f"<thead><tr>{head}</tr></thead>" if any(block.header) else ""
            body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>"
                           for row in block.rows)
            parts.append(f"<table>{head}<tbody>{body}</tbody></table>")
        elif isinstance(block, Figures):
            images = "".join(
                f'<img alt="{esc(alt)}" src="data:image/png;base64,'
                f'{base64.b64encode(path.read_bytes()).decode()}">' for path, alt in block.images)
            parts.append(f'<div class="figs">{images}</div>')
    parts += ["</body>", "</html>", ""]
    return "\n".join(parts)


# ---- what is reported ------------------------------------------------------------------------

@dataclass
class RunInfo:
    path: Path
    name: str                   # unique among the report's runs
    group: str                  # runs of one group (a sweep point's seeds) are compared as one
    config: dict
    env: dict
    summary: dict | None        # None: the run did not finish
    records: list[dict]
    diverged: str | None = None  # the error of a run whose loss became NaN (diverged.json)

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.records if r.get("type") == "eval"]


def _run_info(path: Path, group: str) -> RunInfo:
    def optional_json(name: str) -> dict | None:
        try:
            return read_json(path / name)
        except (OSError, ValueError):
            return None

    config = optional_json("config.json")
    if config is None:
        raise CnnlabError(f"{path}: config.json is missing or damaged; is it a run directory?")
    return RunInfo(path=path, name=path.name, group=group, config=config,
                   env=optional_json("env.json") or {}, summary=optional_json("summary.json"),
                   records=read_metrics(path), diverged=diverged_error(path))


def find_runs(paths: list[str | Path]) -> tuple[list[RunInfo], list[Path]]:
    """The runs to report on, and which of `paths` are sweep directories. A run directory
    holds config.json; a sweep directory holds run directories (in sweep.json's order)."""
    runs, sweeps = [], []
    for given in paths:
        path = Path(given)
        if (path / "config.json").is_file():
            runs.append(_run_info(path, path.name))
            continue
        if not path.is_dir():
            raise CnnlabError(f"no run or sweep directory at {path}")
        children = sorted(d for d in path.iterdir() if (d / "config.json").is_file())
        if not children:
            raise CnnlabError(f"{path} is neither a run directory (no config.json) nor a sweep "
                              "directory (no run directories in it)")
        points = {}
        try:
            plan = read_json(path / "sweep.json")
            points = {r["name"]: r["point"] for r in plan["runs"]}
            order = list(points)  # the sweep's runs, in its order; others are left-overs
            children = sorted((d for d in children if d.name in points),
                              key=lambda d: order.index(d.name)) or children
        except (OSError, ValueError, KeyError, TypeError):
            pass
        prefix = f"{path.name}: " if len(paths) > 1 else ""
        for child in children:
            point = points.get(child.name) or re.sub(r"-?seed=\d+$", "", child.name) or "all"
            runs.append(_run_info(child, prefix + point))
        sweeps.append(path)
    names = [r.name for r in runs]
    for run in runs:  # the same directory name in two places: say which
        if names.count(run.name) > 1:
            run.name = f"{run.path.parent.name}/{run.path.name}"
    return runs, sweeps


def outcome(run: RunInfo) -> dict:
    """Final and best accuracy etc. from summary.json, or from the eval records of a run that
    did not finish."""
    if run.summary is not None:
        return run.summary
    evals = run.evals
    if not evals:
        return {}
    key = "val_acc" if evals[-1].get("val_acc") is not None else "test_acc"
    best = max(evals, key=lambda r: r[key])
    out = {"final_test_acc": evals[-1]["test_acc"],
           "best_test_acc": max(r["test_acc"] for r in evals),
           "best_epoch": best["epoch"], "final_test_loss": evals[-1].get("test_loss"),
           "train_seconds": evals[-1].get("train_seconds")}
    if key == "val_acc":
        out.update(best_val_acc=best["val_acc"], test_acc_at_best=best["test_acc"])
    return out


def evaluate_run(run: RunInfo, *, data_dir: str | Path | None, device: str,
                 cache: dict) -> dict | str:
    """Per-class accuracy and the confusion matrix of the run's best checkpoint on the test
    split, or a sentence saying why they could not be computed."""
    from . import checkpoint
    from .data import load_dataset
    from .inference import DataMismatch, evaluate_checkpoint

    try:
        ckpt_file = checkpoint.find(run.path)
    except CnnlabError as e:
        return f"No checkpoint to evaluate: {e}"
    dataset = run.config.get("dataset")
    root = Path(data_dir or run.config.get("data_dir") or default_data_dir())
    key = (dataset, str(root))
    try:
        if key not in cache:
            cache[key] = load_dataset(dataset, root, download=False)
        data = cache[key]
    except CnnlabError as e:
        return (f"The test data is not available here, so per-class accuracy and the confusion "
                f"matrix are left out ({e}). Point --data-dir at it to include them.")
    except Exception as e:  # a data reader's own failure must not sink the whole report
        return f"The test data could not be read ({type(e).__name__}: {e})."
    try:
        result = evaluate_checkpoint(ckpt_file, dataset=dataset, data=data, device=device)
    except DataMismatch as e:
        return f"The test data under {root} does not fit the model ({e}); not evaluated."
    except CnnlabError as e:
        return f"No checkpoint to evaluate: {e}"
    except (RuntimeError, ValueError) as e:
        return f"Evaluating {ckpt_file.name} failed: {one_line(e)}"
    result["checkpoint"] = ckpt_file.name
    return result


def _pct(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}%"


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{float(value):,.1f} s"


def _outcome_table(run: RunInfo) -> Table:
    o = outcome(run)
    done = len(run.evals)
    status = (f"finished ({done} of {run.config.get('epochs')} epochs)" if run.summary
              else run.diverged if run.diverged
              else f"did not finish: {done} of {run.config.get('epochs')} epochs evaluated")
    rows = [["status", status],
            ["final test accuracy", _pct(o.get("final_test_acc"))],
            *([["best.pt: chosen on validation", f"epoch {o.get('best_epoch', '-')}: "
                f"validation {_pct(o['best_val_acc'])}, test {_pct(o.get('test_acc_at_best'))}"],
               ["best on test (optimistic)", _pct(o.get("best_test_acc"))]]
              if o.get("best_val_acc") is not None else
              [["best on test (optimistic: no validation split)",
                f"{_pct(o.get('best_test_acc'))} (epoch {o.get('best_epoch', '-')})"]]),
            ["final test loss", "-" if o.get("final_test_loss") is None
             else f"{o['final_test_loss']:.4f}"],
            ["training time (no evaluation)", _seconds(o.get("train_seconds"))]]
    if run.summary:
        s = run.summary
        rows += [["wall time", _seconds(s.get("wall_seconds"))],
                 ["images/s (training)", f"{s.get('images_per_second', 0):,.0f}"],
                 ["optimiser steps", f"{s.get('steps', '-')}"],
                 ["parameters", f"{s.get('parameters', 0):,}"],
                 ["device", str(s.get("device", "-"))]]
    return Table(["", ""], rows)


def _value(value: Any) -> str:
    if isinstance(value, list):
        return "; ".join(_value(v) for v in value) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{k} {_value(v)}" for k, v in value.items())
    return format_value(value)


def _utilisation(run: RunInfo) -> list[list[str]]:
    telemetry = [r for r in run.records if r.get("type") == "telemetry"]

    def series(key: str) -> list[float]:
        return [float(r[key]) for r in telemetry if r.get(key) is not None]

    rows = [["samples", f"{len(telemetry)} over {_seconds(telemetry[-1].get('elapsed'))}"]]
    for key, name, unit in (("cpu_percent", "CPU (process)", "%"),
                            ("gpu_util", "GPU utilisation", "%"),
                            ("rss_mb", "host memory (RSS)", " MB"),
                            ("gpu_mem_mb", "GPU memory", " MB"),
                            ("images_per_second", "training images/s", "")):
        values = series(key)
        if values:
            rows.append([name, f"mean {sum(values) / len(values):,.0f}{unit}, "
                               f"peak {max(values):,.0f}{unit}"])
    return rows


def _per_class_table(result: dict) -> Table:
    confusion = result["confusion"]
    rows = []
    for i, c in enumerate(result["per_class"]):
        mistakes = [(n, j) for j, n in enumerate(confusion[i]) if j != i and n]
        worst = max(mistakes, default=None)
        rows.append([c["class"], _pct(c["recall"]), _pct(c["precision"]), str(c["support"]),
                     f"{result['per_class'][worst[1]]['class']} ({worst[0]})" if worst else "-"])
    return Table(["class", "accuracy (recall)", "precision", "test images",
                  "most often mistaken for"], rows)


class _Figures:
    """Puts each figure the report shows into the report directory (or uses it in place when
    it already lies under it) and remembers it."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def prefix(self, run: RunInfo) -> str:
        if run.path.resolve() == self.out.resolve():
            return ""
        return safe_name(run.name) + "-"

    def _under_out(self, path: Path) -> bool:
        try:
            path.resolve().relative_to(self.out.resolve())
            return True
        except ValueError:
            return False

    def run_figure(self, run: RunInfo, name: str) -> Path | None:
        """loss.png, accuracy.png or utilization.png of a run: its own file, or drawn anew."""
        from .plots import plot_run, plot_utilization

        own = run.path / name
        if own.is_file() and self._under_out(own):
            return own
        target = self.out / f"{self.prefix(run)}{name}"
        if own.is_file():
            shutil.copyfile(own, target)
            return target
        if name == "utilization.png":
            return plot_utilization(run.path, self.out, prefix=self.prefix(run))
        plot_run(run.path, self.out, prefix=self.prefix(run))
        return target


def _header_rows(runs: list[RunInfo], sweeps: list[Path], paths: list[str | Path]) -> list:
    when = time.strftime("%Y-%m-%d %H:%M")
    what = ", ".join(str(p) for p in paths)
    unfinished = [r.name for r in runs if r.summary is None and not r.diverged]
    diverged = [r.name for r in runs if r.summary is None and r.diverged]
    blocks = [Para(f"Written {when} by cnnlab {__version__} from {what}: {len(runs)} run"
                   f"{'s' if len(runs) != 1 else ''}"
                   + (f" in {len(sweeps)} sweep{'s' if len(sweeps) != 1 else ''}" if sweeps
                      else "") + ".")]
    if unfinished:
        blocks.append(Para(f"Unfinished runs (no summary.json; shown from their metrics): "
                           f"{', '.join(unfinished)}."))
    if diverged:
        blocks.append(Para(f"Diverged runs (the loss became NaN; left out of the comparison's "
                           f"mean and std): {', '.join(diverged)}."))
    return blocks


def _differing_keys(configs: list[dict]) -> list[str]:
    """The config fields that tell the runs apart; what cannot change a result (the runtime
    fields, and what config.json adds about the machine) is left out."""
    return [k for k in COMPARED if len({repr(c.get(k)) for c in configs}) > 1]


def _comparison(doc: Document, runs: list[RunInfo], figures: _Figures,
                evaluations: dict[str, dict | str]) -> None:
    from .plots import plot_overlay

    finished = [r for r in runs if r.summary is not None]
    doc.add(Heading(2, "Comparison"))
    if not finished:
        doc.add(Para("No run has finished yet: nothing to compare."))
        return
    diverged = [(r.group, r.config) for r in runs if r.summary is None and r.diverged]
    rows = aggregate([(r.group, r.config, r.summary) for r in finished], diverged)
    keys = [k for k in _differing_keys([row["config"] for row in rows]) if k != "seed"]
    if not keys and len(rows) > 1:
        keys = _differing_keys([row["config"] for row in rows])
    doc.add(Para("One row per configuration: mean ± sample standard deviation over its runs "
                 "(seeds); accuracies in % on the test split."),
            Table(["configuration", *(option_name(k) for k in keys), "runs",
                   *(["diverged"] if diverged else []),
                   *(title for _, title, _ in shown_metrics(rows))],
                  [[row["label"], *(_value(row["config"].get(k)) for k in keys), str(row["n"]),
                    *([str(row["diverged"])] if diverged else []),
                    *(mean_std(row, key, digits) for key, _, digits in shown_metrics(rows))]
                   for row in rows]))
    text = verdict(rows, keys)
    if text:
        doc.add(Para(text, strong=True))
    written = plot_overlay([r.path for r in finished], [r.group for r in finished], figures.out,
                           prefix="comparison-")
    doc.add(Figures([(written[0], "Test accuracy of every run"),
                     (written[1], "Loss of every run")]))
    scored = [(r, evaluations.get(r.name)) for r in finished]
    scored = [(r, e) for r, e in scored if isinstance(e, dict)]
    groups = list(dict.fromkeys(r.group for r, _ in scored))
    if scored and 1 < len(groups) <= 12:
        classes = [c["class"] for c in scored[0][1]["per_class"]]
        table = []
        for i, name in enumerate(classes):
            row = [name]
            for group in groups:
                values = [e["per_class"][i]["recall"] for r, e in scored if r.group == group
                          and len(e["per_class"]) > i and e["per_class"][i]["class"] == name]
                row.append(_pct(sum(values) / len(values)) if values else "-")
            table.append(row)
        doc.add(Heading(3, "Per-class accuracy side by side"),
                Para("Accuracy (recall) per class of each configuration's best checkpoints on "
                     "the test split, mean over its runs."),
                Table(["class", *groups], table))


def _run_section(doc: Document, run: RunInfo, figures: _Figures, evaluation: dict | str | None,
                 level: int) -> None:
    from .plots import plot_confusion

    if level > 1:
        doc.add(Heading(level, f"Run {run.name}"))
    sub = min(level + 1, 6)
    doc.add(Heading(sub, "Outcome"), _outcome_table(run))
    curves = [figures.run_figure(run, "loss.png"), figures.run_figure(run, "accuracy.png")]
    doc.add(Heading(sub, "Loss and accuracy"),
            Figures([(curves[0], f"Loss of {run.name}"), (curves[1], f"Accuracy of {run.name}")]))
    doc.add(Heading(sub, "Utilisation over time"))
    utilisation = figures.run_figure(run, "utilization.png")
    if utilisation is None:
        doc.add(Para("This run has no telemetry records in metrics.jsonl, so there is no "
                     "utilisation to show."))
    else:
        doc.add(Table(["", ""], _utilisation(run)),
                Figures([(utilisation, f"Utilisation of {run.name}")]))
    doc.add(Heading(sub, "Per-class accuracy and confusion matrix"))
    if isinstance(evaluation, dict):
        recorded = outcome(run).get("best_test_acc")
        doc.add(Para(f"The {evaluation['checkpoint']} checkpoint (epoch {evaluation['epoch']}) "
                     f"on the {evaluation['images']:,} test images: "
                     f"{evaluation['accuracy']:.2f}% accuracy"
                     + (f" (the run recorded {recorded:.2f}% for it)." if recorded is not None
                        else ".")),
                _per_class_table(evaluation))
        path = plot_confusion(evaluation["confusion"],
                              [c["class"] for c in evaluation["per_class"]],
                              figures.out / f"{figures.prefix(run)}confusion.png",
                              title=f"Confusion matrix - {run.name} ({evaluation['checkpoint']})")
        doc.add(Figures([(path, f"Confusion matrix of {run.name}")]))
    else:
        doc.add(Para(evaluation or "Not computed (--no-eval)."))
    doc.add(Heading(sub, "Configuration"),
            Table(["option", "value"], [[option_name(k), _value(v)]
                                        for k, v in run.config.items()]))
    doc.add(Heading(sub, "Environment"),
            Table(["", ""], [[k, _value(v)] for k, v in run.env.items()] or [["-", "-"]]))


def default_report_dir(paths: list[str | Path], root: str | Path = "reports") -> Path:
    """The directory given, if one; else reports/<time>."""
    if len(paths) == 1:
        return Path(paths[0])
    return unique_dir(root, time.strftime("%Y%m%d-%H%M%S"))


def write_report(paths: list[str | Path], out: str | Path | None = None, *,
                 evaluate: bool = True, data_dir: str | Path | None = None,
                 device: str = "auto") -> dict[str, Path]:
    """Write report.html and report.md for run and sweep directories into `out` (default: the
    one directory given, else reports/<time>). Returns {"html": path, "md": path}."""
    if not paths:
        raise CnnlabError("report needs at least one run or sweep directory")
    runs, sweeps = find_runs(paths)
    out = Path(out) if out is not None else default_report_dir(paths)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CnnlabError(f"cannot create report directory {out}: {e.strerror or e}") from None
    evaluations: dict[str, dict | str] = {}
    if evaluate:
        from .trainer import resolve_device

        torch_device = resolve_device(device)
        cache: dict = {}
        for run in runs:
            evaluations[run.name] = evaluate_run(run, data_dir=data_dir, device=torch_device,
                                                 cache=cache)
    figures = _Figures(out)
    if len(runs) == 1:
        run = runs[0]
        title = (f"cnnlab report: {run.config.get('model')} on {run.config.get('dataset')} "
                 f"({run.name})")
    elif len(sweeps) == 1 and len(paths) == 1:
        title = f"cnnlab report: sweep {sweeps[0].name} ({len(runs)} runs)"
    else:
        title = f"cnnlab report: {len(runs)} runs"
    doc = Document(title)
    doc.add(*_header_rows(runs, sweeps, paths))
    if len(runs) > 1:
        _comparison(doc, runs, figures, evaluations)
    for run in runs:
        _run_section(doc, run, figures, evaluations.get(run.name), level=1 if len(runs) == 1
                     else 2)
    written = {"html": out / "report.html", "md": out / "report.md"}
    atomic_write(written["md"], lambda f: f.write(render_markdown(doc, out).encode()))
    atomic_write(written["html"], lambda f: f.write(render_html(doc).encode()))
    return written
