"""Reports: report.html (self-contained: figures embedded, CSS inline, opens offline) and
report.md (figures as PNG files beside it) for run directories and sweep directories.

A report reads only run directories: configuration, environment, outcome, loss and accuracy
curves, utilisation over time, and - evaluating the best checkpoint on the test split -
per-class accuracy, the confusion matrix and the model's mistakes (mistakes.py: top losses,
saliency, confused pairs); for several runs, a side-by-side comparison.
"""

from __future__ import annotations

import base64
import html
import os
import re
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .checks import parse_image_size
from .config import data_dir_for
from .devices import resolve_device
from .errors import CnnlabError, one_line
from .files import atomic_write, safe_name
from .models import REGISTRY, is_code, label
from .options import COMPARED, applies, format_value, option_name
from .plots import (
    plot_comparison,
    plot_confusion,
    plot_models,
    plot_overlay,
    plot_run,
    plot_utilization,
    utilization_panels,
)
from .results import (
    aggregate,
    diverged_error,
    eval_epochs,
    format_epochs,
    md_table,
    mean_std_text,
    metric,
    pct_text,
    selection_note,
    shown_metrics,
    shown_value,
    value_text,
    verdict,
)
from .runs import (
    ACCURACY_PLOT,
    BEST,
    BEST_OPTIONS,
    COMPARISON_PLOT,
    CONFIG,
    CONFUSION_PLOT,
    ENV,
    LOSS_PLOT,
    SUMMARY,
    SWEEP_FILE,
    TUNE_FILE,
    UTILIZATION_PLOT,
    DamagedFile,
    read_metrics,
    read_object,
    unique_dir,
)
from .tune_results import summary_lines, trials_table

# ---- the document: blocks rendered as Markdown and as HTML ---------------------------------

@dataclass
class Heading:
    level: int
    text: str

    @property
    def anchor(self) -> str:
        """The id a link to it uses: GitHub's rule for Markdown headings, set as the id in
        HTML, so that one table of contents works in both."""
        return re.sub(r"[^\w\- ]", "", self.text.lower()).replace(" ", "-")


@dataclass
class Contents:
    headings: list[Heading]  # linked to, in order


@dataclass
class Details:
    """Blocks folded away under a one-line summary (<details>, which Markdown viewers that
    allow HTML show as such too)."""

    summary: str
    blocks: list


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
    return "\n".join([f"# {doc.title}", "", *_markdown_lines(doc.blocks, out)])


def _markdown_lines(blocks: list, out: Path) -> list[str]:
    lines = []
    for block in blocks:
        if isinstance(block, Contents):
            lines += [*(f"- [{h.text}](#{h.anchor})" for h in block.headings), ""]
        elif isinstance(block, Details):
            lines += ["<details>", f"<summary>{html.escape(block.summary)}</summary>", "",
                      *_markdown_lines(block.blocks, out), "</details>", ""]
        elif isinstance(block, Heading):
            lines += [f"{'#' * block.level} {block.text}", ""]
        elif isinstance(block, Para):
            lines += [f"**{block.text}**" if block.strong else block.text, ""]
        elif isinstance(block, Table):
            lines += [md_table(block.header, block.rows), ""]
        elif isinstance(block, Figures):
            for path, alt in block.images:
                rel = Path(os.path.relpath(path, out)).as_posix()
                lines += [f"![{alt}]({rel.replace(' ', '%20')})", ""]
    return lines


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
details { border: 1px solid #e3e3e3; border-radius: 4px; padding: .2em .8em; margin: .6em 0; }
summary { cursor: pointer; font-weight: 600; padding: .3em 0; }
nav ul { margin: .4em 0 1.2em; }
"""


def render_html(doc: Document) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
             f"<title>{esc(doc.title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
             f"<h1>{esc(doc.title)}</h1>", *_html_parts(doc.blocks), "</body>", "</html>", ""]
    return "\n".join(parts)


def _html_parts(blocks: list) -> list[str]:
    esc = html.escape
    parts = []
    for block in blocks:
        if isinstance(block, Contents):
            items = "".join(f'<li><a href="#{h.anchor}">{esc(h.text)}</a></li>'
                            for h in block.headings)
            parts.append(f"<nav><ul>{items}</ul></nav>")
        elif isinstance(block, Details):
            parts += [f"<details><summary>{esc(block.summary)}</summary>",
                      *_html_parts(block.blocks), "</details>"]
        elif isinstance(block, Heading):
            parts.append(f'<h{block.level} id="{block.anchor}">{esc(block.text)}'
                         f"</h{block.level}>")
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
    return parts


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
            return read_object(path / name)
        except DamagedFile:
            return None

    config = optional_json(CONFIG)
    if config is None:
        raise CnnlabError(f"{path}: config.json is missing or damaged; is it a run directory?")
    return RunInfo(path=path, name=path.name, group=group, config=config,
                   env=optional_json(ENV) or {}, summary=optional_json(SUMMARY),
                   records=read_metrics(path), diverged=diverged_error(path))


def find_runs(paths: list[str | Path]) -> tuple[list[RunInfo], list[Path]]:
    """The runs to report on, and which of `paths` are sweep directories. A run directory
    holds config.json; a sweep directory holds run directories (in sweep.json's order)."""
    runs, sweeps = [], []
    for given in paths:
        path = Path(given)
        if (path / CONFIG).is_file():
            runs.append(_run_info(path, path.name))
            continue
        if not path.is_dir():
            raise CnnlabError(f"no run or sweep directory at {path}")
        children = sorted(d for d in path.iterdir() if (d / CONFIG).is_file())
        if not children:
            raise CnnlabError(f"{path} is neither a run directory (no config.json) nor a sweep "
                              "directory (no run directories in it)")
        points = {}
        try:
            plan = read_object(path / SWEEP_FILE) or {"runs": []}
            points = {r["name"]: r["point"] for r in plan["runs"]}
            order = list(points)  # the sweep's runs, in its order; others are left-overs
            children = sorted((d for d in children if d.name in points),
                              key=lambda d: order.index(d.name)) or children
        except (DamagedFile, KeyError, TypeError):
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
    did not finish (epochs_done: where its last evaluation was)."""
    if run.summary is not None:
        return run.summary
    evals = run.evals
    if not evals:
        return {}
    key = "val_acc" if evals[-1].get("val_acc") is not None else "test_acc"
    best = max(evals, key=lambda r: r[key])
    out = {"final_test_acc": evals[-1]["test_acc"],
           "best_test_acc": max(r["test_acc"] for r in evals),
           "best_epoch": eval_epochs(best), "best_epochs_done": eval_epochs(best),
           "epochs_done": eval_epochs(evals[-1]),
           "final_test_loss": evals[-1].get("test_loss"),
           "train_seconds": evals[-1].get("train_seconds")}
    if key == "val_acc":
        out.update(best_val_acc=best["val_acc"], test_acc_at_best=best["test_acc"])
    return out


def evaluate_run(run: RunInfo, *, data_dir: str | Path | None, device: str,
                 cache: dict, trust_code: bool = False) -> dict | str:
    """Per-class accuracy, the confusion matrix and the mistakes (mistakes.SHOWN top losses)
    of the run's best checkpoint on the test split, or a sentence saying why they could not be
    computed."""
    from . import checkpoint
    from .data import load_dataset
    from .inference import DataMismatch, evaluate_checkpoint
    from .mistakes import SHOWN

    try:
        ckpt_file = checkpoint.find(run.path)
    except CnnlabError as e:
        return f"No checkpoint to evaluate: {e}"
    dataset = run.config.get("dataset")
    root = Path(data_dir_for(data_dir, run.config))
    size = run.config.get("image_size")
    size = parse_image_size(size) if size else None
    key = (dataset, str(root), size)
    try:
        if key not in cache:
            cache[key] = load_dataset(dataset, root, download=False, image_size=size)
        data = cache[key]
    except CnnlabError as e:
        return (f"The test data is not available here, so per-class accuracy and the confusion "
                f"matrix are left out ({e}). Point --data-dir at it to include them.")
    except Exception as e:  # a data reader's own failure must not sink the whole report
        return f"The test data could not be read ({type(e).__name__}: {e})."
    try:
        result = evaluate_checkpoint(
            ckpt_file, dataset=dataset, data=data, device=device, mistakes=SHOWN,
            trust_code=trust_code,
            progress=f"report: evaluating {run.name} ({ckpt_file.name}) on the test split")
    except DataMismatch as e:
        return f"The test data under {root} does not fit the model ({e}); not evaluated."
    except CnnlabError as e:
        return f"No checkpoint to evaluate: {e}"
    except (RuntimeError, ValueError) as e:
        return f"Evaluating {ckpt_file.name} failed: {one_line(e)}"
    result["checkpoint"] = ckpt_file.name
    return result


def _seconds(value: Any) -> str:
    return "-" if value is None else f"{float(value):,.1f} s"


def _outcome_table(run: RunInfo) -> Table:
    o = outcome(run)
    done = f"{format_epochs(metric(o, 'epochs_done'))} of {format_value(run.config.get('epochs'))}"
    status = (f"finished ({done} epochs)" if run.summary
              else run.diverged if run.diverged
              else f"did not finish: {done} epochs evaluated")
    best_at = format_epochs(metric(o, "best_epochs_done"))
    rows = [["status", status],
            ["final test accuracy", pct_text(o.get("final_test_acc"))],
            *([["best.pt: chosen on validation", f"epoch {best_at}: "
                f"validation {pct_text(o['best_val_acc'])}, "
                f"test {pct_text(o.get('test_acc_at_best'))}"],
               ["best on test (optimistic)", pct_text(o.get("best_test_acc"))]]
              if o.get("best_val_acc") is not None else
              [["best on test (optimistic: no validation split)",
                f"{pct_text(o.get('best_test_acc'))} (epoch {best_at})"]]),
            *_fit_rows(run, o),
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


def _fit_rows(run: RunInfo, o: dict) -> list[list[str]]:
    """The training accuracy at the end (the last log window's) beside the final test
    accuracy, and the gap between them: the first sign of over- or underfitting."""
    trained = [r["train_acc"] for r in run.records
               if r.get("type") == "train" and r.get("train_acc") is not None]
    if not trained or o.get("final_test_acc") is None:
        return []
    gap = trained[-1] - o["final_test_acc"]
    reading = ("training well above test: overfitting" if gap > 2
               else "test above training (augmented training images, label smoothing or "
                    "dropout make training harder)" if gap < -2
               else "close: no sign of overfitting")
    return [["final training accuracy (last log window)", pct_text(trained[-1])],
            ["gap, training - test", f"{gap:+.2f} points ({reading})"]]


def _utilisation(run: RunInfo) -> list[list[str]]:
    """Mean and peak of each line of utilization.png, in its units (the CPU as a share of all
    the machine's cores, as the chart beside the table draws it)."""

    telemetry = [r for r in run.records if r.get("type") == "telemetry"]
    rows = [["samples", f"{len(telemetry)} over {_seconds(telemetry[-1].get('elapsed'))}"]]
    for _, unit, lines in utilization_panels(run.path):
        for name, points in lines:
            values = [v for _, v in points]
            rows.append([name, f"mean {sum(values) / len(values):,.0f}{unit}, "
                               f"peak {max(values):,.0f}{unit}"])
    return rows


def _per_class_table(result: dict) -> Table:
    confusion = result["confusion"]
    rows = []
    for i, c in enumerate(result["per_class"]):
        mistakes = [(n, j) for j, n in enumerate(confusion[i]) if j != i and n]
        worst = max(mistakes, default=None)
        rows.append([c["class"], pct_text(c["recall"]), pct_text(c["precision"]), str(c["support"]),
                     f"{result['per_class'][worst[1]]['class']} ({worst[0]})" if worst else "-"])
    return Table(["class", "accuracy (recall)", "precision", "test images",
                  "most often mistaken for"], rows)


def _mistakes_blocks(run: RunInfo, figures: _Figures, evaluation: dict, level: int) -> list:
    """The Mistakes subsection: what its pictures show, the most confused pairs of classes,
    and top_losses.png, saliency.png and confused.png (beside the run's confusion.png)."""
    found = evaluation.get("mistakes")
    if found is None:
        return []
    if not found.top_losses:
        return [Heading(level, "Mistakes"),
                Para("The checkpoint classifies every test image correctly: no mistakes.")]
    own = os.access(run.path, os.W_OK)
    drawn = found.draw(run.path if own else figures.out, prefix="" if own
                       else figures.prefix(run))
    support = {c["class"]: c["support"] for c in evaluation["per_class"]}
    return [Heading(level, "Mistakes"),
            Para(f"The {len(found.top_losses)} test images the checkpoint gets most "
                 "confidently wrong (the highest loss among its mistakes), each titled with its "
                 "true class, the class predicted and that prediction's probability; for the "
                 f"first {len(found.saliency)}, which pixels weigh most in that prediction "
                 "(Integrated Gradients of the predicted class, its absolute value: the "
                 "brighter, the more); and the pairs of classes most often confused, with "
                 "examples. Images are shown as the model saw them."),
            Table(["true class", "predicted as", "test images", "share of the true class"],
                  [[p["true"], p["pred"], str(p["count"]),
                    pct_text(100 * p["count"] / max(1, support.get(p["true"], 0)))]
                   for p in found.pairs]),
            Figures([(drawn["top_losses"], f"Top losses of {run.name}"),
                     (drawn["saliency"], f"Saliency of the top losses of {run.name}"),
                     (drawn["confused"], f"Most confused classes of {run.name}")])]


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

        own = run.path / name
        if own.is_file() and self._under_out(own):
            return own
        target = self.out / f"{self.prefix(run)}{name}"
        if own.is_file():
            shutil.copyfile(own, target)
            return target
        if name == UTILIZATION_PLOT:
            return plot_utilization(run.path, self.out, prefix=self.prefix(run))
        plot_run(run.path, self.out, prefix=self.prefix(run))
        return target


def _header_rows(runs: list[RunInfo], sweeps: list[Path], paths: list[str | Path],
                 pruned: frozenset[Path] = frozenset()) -> list:
    when = time.strftime("%Y-%m-%d %H:%M")
    what = ", ".join(str(p) for p in paths)
    stopped = [r.name for r in runs if r.summary is None and r.path.resolve() in pruned]
    unfinished = [r.name for r in runs if r.summary is None and not r.diverged
                  and r.path.resolve() not in pruned]
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
    if stopped:
        blocks.append(Para(f"Pruned trials (their search stopped them early, so they have no "
                           f"summary.json; shown from their metrics): {', '.join(stopped)}."))
    return blocks


def _search(path: Path, heading: Heading) -> tuple[list, frozenset[Path]]:
    """A search's section (cnnlab tune's tune.json) - what it searched and found, its best
    trial's options, every trial, the optimisation history and the parameter importances -
    and the trial runs its pruner stopped."""

    try:
        info = read_object(path / TUNE_FILE, missing_ok=False)
        if "rows" not in info:  # written when the search began
            return [heading, Para("The search has written no results yet; its command, run "
                                  "again, continues it and writes them.")], frozenset()
        header, rows = trials_table(info)
        lines = summary_lines(info)
    except (DamagedFile, KeyError, TypeError, AttributeError):
        return [heading, Para(f"{path / TUNE_FILE} is damaged: the search is not shown.")], \
            frozenset()
    blocks = [heading, Para(f"Searched: {'; '.join(info.get('searched', []))}."),
              *(Para(line) for line in lines)]
    best = info.get("best")
    if best:
        searched = {d["option"] for d in info["plan"]["tune"]["space"]}
        blocks += [Para(f"The best trial's options, in best.toml (cnnlab train "
                        f"{info['model']} {info['dataset']} --config {path / BEST_OPTIONS}):"),
                   Table(["option", "value"],
                         [[option_name(k), format_value(v) + (" (searched)" if option_name(k)
                                                              in searched else "")]
                          for k, v in best["options"].items()])]
    blocks.append(Table(header, rows))
    shown = [(path / name, alt) for name, alt in info.get("figures", {}).items()
             if (path / name).is_file()]
    if shown:
        blocks.append(Figures(shown))
    return blocks, frozenset((path / r["run"]).resolve() for r in info["rows"]
                             if r["state"] == "pruned")


def _differing_keys(configs: list[dict]) -> list[str]:
    """The config fields that tell the runs apart; what cannot change a result (the runtime
    fields, and what config.json adds about the machine) is left out, and so is a field's
    value in the runs where it means nothing (options.ONLY_WITH: muon-lr in sgd runs)."""
    return [k for k in COMPARED if len({repr(c.get(k)) for c in configs if applies(c, k)}) > 1]


def _comparison(doc: Document, runs: list[RunInfo], figures: _Figures,
                evaluations: dict[str, dict | str], prefix: str) -> None:
    """The comparison table, verdict, overlaid curves (named after `prefix`: "" in a sweep's
    own directory, where they are the sweep's accuracy.png and loss.png), comparison.png (each
    configuration's runs and their mean) and per-class accuracy side by side."""

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
    columns = shown_metrics(rows)
    lab = [_lab_report(row["config"]) for row in rows]
    doc.add(Para("One row per configuration: mean ± sample standard deviation over its runs "
                 "(seeds); accuracies in % on the test split."
                 + (" The last column is what the lab report (SEED.md) saw with the same "
                    "recipe after 30 epochs." if any(lab) else "")),
            Table(["configuration", *(option_name(k) for k in keys), "runs",
                   *(["diverged"] if diverged else []),
                   *(title for _, title, _ in columns),
                   *(["lab report"] if any(lab) else [])],
                  [[row["label"], *(shown_value(row["config"], k) for k in keys), str(row["n"]),
                    *([str(row["diverged"])] if diverged else []),
                    *(mean_std_text(row, key, digits) for key, _, digits in columns),
                    *([figure or "-"] if any(lab) else [])]
                   for row, figure in zip(rows, lab)]))
    note = selection_note(rows)
    if note:
        doc.add(Para(note))
    text = verdict(rows, keys)
    if text:
        doc.add(Para(text, strong=True))
    if "model" in keys:
        _models_section(doc, finished, figures, prefix)
    groups = [r.group for r in finished]
    written = plot_overlay([r.path for r in finished], groups, figures.out, prefix=prefix)
    spread = plot_comparison([r.summary for r in finished], groups,
                             figures.out / COMPARISON_PLOT)
    doc.add(Figures([(written[0], "Test accuracy of every run"),
                     (written[1], "Loss of every run"),
                     (spread, "Final and best test accuracy of each configuration's runs, "
                              "their mean and 95% confidence interval")]))
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
                row.append(pct_text(sum(values) / len(values)) if values else "-")
            table.append(row)
        doc.add(Heading(3, "Per-class accuracy side by side"),
                Para("Accuracy (recall) per class of each configuration's best checkpoints on "
                     "the test split, mean over its runs."),
                Table(["class", *groups], table))


def _run_blocks(run: RunInfo, figures: _Figures, evaluation: dict | str | None, level: int,
                shared: dict | None = None) -> list:
    """A run's section: outcome, curves, utilisation, per-class results, configuration and
    environment, under headings of `level`. `shared` (several runs): the options all runs
    share, and "env" if they share the environment - left out here, shown once above."""

    shared = shared or {}
    doc = Document("")
    doc.add(Heading(level, "Outcome"), _outcome_table(run))
    curves = [figures.run_figure(run, LOSS_PLOT), figures.run_figure(run, ACCURACY_PLOT)]
    doc.add(Heading(level, "Loss and accuracy"),
            Figures([(curves[0], f"Loss of {run.name}"), (curves[1], f"Accuracy of {run.name}")]))
    doc.add(Heading(level, "Utilisation over time"))
    utilisation = figures.run_figure(run, UTILIZATION_PLOT)
    if utilisation is None:
        doc.add(Para("This run has no telemetry records in metrics.jsonl, so there is no "
                     "utilisation to show."))
    else:
        doc.add(Table(["", ""], _utilisation(run)),
                Figures([(utilisation, f"Utilisation of {run.name}")]))
    doc.add(Heading(level, "Per-class accuracy and confusion matrix"))
    if isinstance(evaluation, dict):
        o = outcome(run)  # what the run recorded for best.pt (chosen on validation if any)
        recorded = o.get("test_acc_at_best", o.get("best_test_acc"))
        at = evaluation["epoch"]  # older checkpoints hold whole epochs; the run knows better
        if evaluation["checkpoint"] == BEST and metric(o, "best_epochs_done") is not None:
            at = metric(o, "best_epochs_done")
        doc.add(Para(f"The {evaluation['checkpoint']} checkpoint (epoch {format_epochs(at)}) "
                     f"on the {evaluation['images']:,} test images: "
                     f"{evaluation['accuracy']:.2f}% accuracy"
                     + (f" (the run recorded {recorded:.2f}% for it)." if recorded is not None
                        else ".")),
                _per_class_table(evaluation))
        # beside the run's other figures; in the report's folder where the run's is read-only
        target = (run.path / CONFUSION_PLOT if os.access(run.path, os.W_OK)
                  else figures.out / f"{figures.prefix(run)}{CONFUSION_PLOT}")
        path = plot_confusion(evaluation["confusion"],
                              [c["class"] for c in evaluation["per_class"]], target,
                              title=f"Confusion matrix - {run.name} ({evaluation['checkpoint']})")
        doc.add(Figures([(path, f"Confusion matrix of {run.name}")]),
                *_mistakes_blocks(run, figures, evaluation, level))
    else:
        doc.add(Para(evaluation or "Not computed (--no-eval)."))
    own = [k for k in run.config if k not in shared.get("config", {})]
    doc.add(Heading(level, "Configuration" + (" (where it differs)" if shared else "")),
            _config_table(run.config, own))
    if "env" not in shared:
        doc.add(Heading(level, "Environment"), _env_table(run.env))
    return doc.blocks


def _config_table(config: dict, keys: list[str] | None = None) -> Table:
    """The options `keys` (default: all) of `config` that apply to the run, each as it ran
    (results.shown_value), and the number of processes."""
    keys = list(config if keys is None else keys)
    rows = [[option_name(k), shown_value(config, k)]
            for k in keys if k != "resolved" and applies(config, k)]
    resolved = config.get("resolved") if "resolved" in keys else None
    if isinstance(resolved, dict) and isinstance(world := resolved.get("world_size"), int):
        rows.append(["processes", str(world)])
    return Table(["option", "value"], rows or [["-", "-"]])


def _env_table(env: dict) -> Table:
    return Table(["", ""], [[k, value_text(v)] for k, v in env.items()] or [["-", "-"]])


# The lab report's optimiser experiment (SEED.md): CIFAR-10, its recipe, 30 epochs; its
# test accuracies by (optimizer, lr) - Adamax's learning rate it does not give.
_LAB_REPORT = {("sgd", 0.01): "~70%", ("sgd", 0.02): "~67%", ("sgd", 0.001): "~75%",
               ("adamax", None): "~57%"}


def _lab_report(config: dict) -> str | None:
    """What the lab report saw for this configuration, where it ran the same experiment."""
    if (config.get("dataset"), config.get("preset"), config.get("epochs")) != \
            ("cifar10", "seed", 30):
        return None
    optimizer = config.get("optimizer")
    return _LAB_REPORT.get((optimizer, config.get("lr"))) or _LAB_REPORT.get((optimizer, None))


def _models_section(doc: Document, runs: list[RunInfo], figures: _Figures,
                    prefix: str) -> None:
    """Which network for this task: each model's paper, size, work per image, training time
    here and accuracy (the mean over its runs), as a table and models.png."""
    by_model: dict[str, list[RunInfo]] = {}
    for run in runs:
        by_model.setdefault(str(run.config.get("model")), []).append(run)
    models = []
    for name, group in by_model.items():
        accuracy = [r.summary.get("test_acc_at_best") or r.summary["best_test_acc"]
                    for r in group]
        about = REGISTRY.get(name)
        models.append({"model": label(name), "paper": about.citation if about else "-",
                       "parameters": group[0].summary.get("parameters"),
                       "macs": _macs(group[0]),
                       "train_seconds": statistics.fmean(r.summary["train_seconds"]
                                                         for r in group),
                       "accuracy": statistics.fmean(accuracy)})
    doc.add(Heading(3, "Which network"),
            Para("Each model's accuracy (the test accuracy of its best.pt, the mean over its "
                 "runs) beside what it costs: its parameters, its multiply-adds per image and "
                 "its training time on this machine."),
            Table(["model", "paper", "parameters", "multiply-adds per image",
                   "train time (s)", "test accuracy"],
                  [[m["model"], m["paper"], f"{m['parameters']:,}" if m["parameters"] else "-",
                    f"{m['macs']:,}" if m["macs"] else "-", f"{m['train_seconds']:,.1f}",
                    pct_text(m["accuracy"])]
                   for m in sorted(models, key=lambda m: -m["accuracy"])]))
    if all(m["parameters"] for m in models):
        path = plot_models(models, figures.out / f"{prefix}models.png")
        doc.add(Figures([(path, "Accuracy against parameters, multiply-adds and training "
                                "time")]))


def _macs(run: RunInfo) -> int | None:
    """The multiply-adds per image of a run's model on its data (torch's flop counter, on
    the meta device), or None where its data's shape cannot be read here."""
    from .summary import summarize

    config = run.config
    size = config.get("image_size")
    if is_code(str(config.get("model"))):  # counting would run its code: eval's check first
        return None
    try:
        return summarize(str(config["model"]), str(config["dataset"]),
                         image_size=None if size is None else parse_image_size(size),
                         pool=config.get("pool"), model_args=config.get("model_args"))["macs"]
    except (CnnlabError, OSError, KeyError, ValueError):
        return None


def _run_line(run: RunInfo) -> str:
    """A run in one line: its name and how it ended."""
    o = outcome(run)
    if run.diverged:
        return f"Run {run.name}: {run.diverged}"
    end = "final" if run.summary else "unfinished, last"
    return (f"Run {run.name}: {end} test accuracy {pct_text(o.get('final_test_acc'))}"
            if o else f"Run {run.name}: no evaluation yet")


def default_report_dir(paths: list[str | Path], root: str | Path = "reports") -> Path:
    """The directory given, if one; else reports/<time>."""
    if len(paths) == 1:
        return Path(paths[0])
    return unique_dir(root, time.strftime("%Y%m%d-%H%M%S"))


def write_report(paths: list[str | Path], out: str | Path | None = None, *,
                 evaluate: bool = True, data_dir: str | Path | None = None,
                 device: str | None = "auto", trust_code: bool = False) -> dict[str, Path]:
    """Write report.html and report.md for run and sweep directories into `out` (default: the
    one directory given, else reports/<time>), evaluating on `device` (None: the default
    device, see devices.resolve_device). Returns {"html": path, "md": path}."""
    if not paths:
        raise CnnlabError("report needs at least one run or sweep directory")
    runs, sweeps = find_runs(paths)
    tunes = [s for s in sweeps if (s / TUNE_FILE).is_file()]
    searches = [_search(s, Heading(2, f"Search {s.name}" if len(tunes) > 1 else "Search"))
                for s in tunes]
    pruned = frozenset().union(*(stopped for _, stopped in searches))
    out = Path(out) if out is not None else default_report_dir(paths)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CnnlabError(f"cannot create report directory {out}: {e.strerror or e}") from None
    evaluations: dict[str, dict | str] = {}
    if evaluate:
        torch_device = resolve_device(device)
        cache: dict = {}
        for run in runs:
            evaluations[run.name] = evaluate_run(run, data_dir=data_dir, device=torch_device,
                                                 cache=cache, trust_code=trust_code)
    figures = _Figures(out)
    if len(runs) == 1:
        run = runs[0]
        title = (f"cnnlab report: {run.config.get('model')} on {run.config.get('dataset')} "
                 f"({run.name})")
    elif len(sweeps) == 1 and len(paths) == 1:
        title = (f"cnnlab report: {'search' if tunes else 'sweep'} {sweeps[0].name} "
                 f"({len(runs)} runs)")
    else:
        title = f"cnnlab report: {len(runs)} runs"
    doc = Document(title)
    doc.add(*_header_rows(runs, sweeps, paths, pruned))
    if len(runs) == 1:
        for blocks, _ in searches:
            doc.add(*blocks)
        doc.add(*_run_blocks(runs[0], figures, evaluations.get(runs[0].name), level=2))
    else:  # the comparison first; what all runs share once; each run folded away
        config = {k: v for k, v in runs[0].config.items()
                  if all(r.config.get(k, v) == v and k in r.config for r in runs)}
        shared = {"config": config, **({"env": True}
                                       if all(r.env == runs[0].env for r in runs) else {})}
        sections = [Heading(2, "Comparison"), Heading(2, "Configuration of all runs"),
                    *([Heading(2, "Environment")] if "env" in shared else []),
                    Heading(2, "Runs")]
        doc.add(Contents([blocks[0] for blocks, _ in searches] + sections))
        for blocks, _ in searches:
            doc.add(*blocks)
        _comparison(doc, runs, figures, evaluations, prefix="" if sweeps and out.resolve()
                    in {s.resolve() for s in sweeps} else "comparison-")
        doc.add(sections[1], Para("The options every run shares (each run lists the rest)."),
                _config_table(config))
        if "env" in shared:
            doc.add(sections[2], Para("Every run ran here."), _env_table(runs[0].env))
        doc.add(sections[-1])
        for run in runs:
            doc.add(Details(_run_line(run), _run_blocks(run, figures, evaluations.get(run.name),
                                                        level=3, shared=shared)))
    written = {"html": out / "report.html", "md": out / "report.md"}
    atomic_write(written["md"], lambda f: f.write(render_markdown(doc, out).encode()))
    atomic_write(written["html"], lambda f: f.write(render_html(doc).encode()))
    return written
