"""`cnnlab report` and the figures it draws: report.md, a self-contained report.html, the
utilisation plot, per-class accuracy; and report.html rendered in a headless Chromium."""

import base64
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from conftest import write_mnist

from cnnlab.cli import main
from cnnlab.plots import plot_overlay, plot_utilization, utilization_panels
from cnnlab.report import write_report
from cnnlab.runs import read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def _telemetry(n: int = 6) -> list[dict]:
    return [{"type": "telemetry", "time": 1.7e9 + i, "elapsed": float(i),
             "cpu_percent": 150.0 + i, "rss_mb": 700.0 + 5 * i, "gpu_util": None,
             "gpu_mem_mb": None, "images_per_second": None if i == 0 else 900.0 + i}
            for i in range(n)]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A finished two-point sweep (max and average pooling, one seed) on tiny MNIST, with
    hand-written telemetry records in its runs."""
    root = tmp_path_factory.mktemp("report")
    data = write_mnist(root / "data")
    out = root / "sweep"
    assert main(["sweep", "lenet5", "mnist", "--data-dir", str(data), "--grid", "pool=max,avg",
                 "--epochs", "2", "--batch-size", "32", "--lr", "0.05", "--log-every", "4",
                 "--telemetry", "0", "--out", str(out), "--quiet"]) == 0
    for run in out.glob("pool=*"):
        with (run / "metrics.jsonl").open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in _telemetry())
        (run / "utilization.png").unlink(missing_ok=True)
    return out


@pytest.fixture
def run(sweep, tmp_path):
    """A copy of one finished run, for a test to write its report into."""
    return shutil.copytree(sweep / "pool=max-seed=0", tmp_path / "run")


def _html_images(text: str) -> list[bytes]:
    sources = re.findall(r'<img [^>]*src="([^"]*)"', text)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources), sources[:1]
    return [base64.b64decode(s.split(",", 1)[1]) for s in sources]


def _self_contained(text: str) -> None:
    for pattern in ("http://", "https://", "<script", "<link", "url(", "src=\"file:",
                    "@import"):
        assert pattern not in text, pattern


def test_plot_utilization_and_overlay(tmp_path, sweep):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text(json.dumps({"type": "eval", "epoch": 1}) + "\n")
    assert plot_utilization(run_dir) is None  # no telemetry records: nothing drawn
    assert not (run_dir / "utilization.png").exists()
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in _telemetry())
    path = plot_utilization(run_dir)
    assert path == run_dir / "utilization.png" and path.read_bytes().startswith(PNG)
    other = plot_utilization(run_dir, tmp_path, prefix="x-")
    assert other == tmp_path / "x-utilization.png" and other.is_file()
    # the process's CPU as a share of the machine's cores, as env.json counts them
    (run_dir / "env.json").write_text(json.dumps({"cpu_cores_logical": 4}))
    (label, unit, lines), *_ = utilization_panels(run_dir)
    assert (label, unit) == ("utilisation (%)", "%")
    assert lines[0][0] == "CPU (process, % of 4 cores)"
    cpu = [r["cpu_percent"] / 4 for r in _telemetry()]
    assert [v for _, v in lines[0][1]] == cpu

    runs = sorted(sweep.glob("pool=*"))
    written = plot_overlay(runs, ["a", "b"], tmp_path, prefix="o-")
    assert [p.name for p in written] == ["o-accuracy.png", "o-loss.png"]
    assert all(p.read_bytes().startswith(PNG) for p in written)


def test_report_on_one_run(run):
    summary = json.loads((run / "summary.json").read_text())
    env = json.loads((run / "env.json").read_text())
    (run / "env.json").write_text(json.dumps(env | {"cpu_cores_logical": 4}))
    written = write_report([run], device="cpu")
    assert written == {"html": run / "report.html", "md": run / "report.md"}
    md = written["md"].read_text()
    for heading in ("## Outcome", "## Loss and accuracy", "## Utilisation over time",
                    "## Per-class accuracy and confusion matrix", "## Configuration",
                    "## Environment"):
        assert heading in md, heading
    assert "## Comparison" not in md
    acc = summary["best_test_acc"]
    assert f"on the 128 test images: {acc:.2f}% accuracy (the run recorded {acc:.2f}%" in md
    assert "| class | accuracy (recall) | precision | test images | most often mistaken for |" \
        in md
    assert len(re.findall(r"^\| [0-9] \| [0-9.]+% \|", md, re.M)) == 10
    # the process's CPU as a share of all 4 cores, as utilization.png draws it
    assert "| CPU (process, % of 4 cores) | mean 38%, peak 39% |" in md
    assert f"| best on test (optimistic: no validation split) | {acc:.2f}% (epoch "\
           f"{summary['best_epoch']:g}) |" in md
    trained = [r["train_acc"] for r in read_metrics(run) if r["type"] == "train"][-1]
    assert f"| final training accuracy (last log window) | {trained:.2f}% |" in md
    assert f"| gap, training - test | {trained - summary['final_test_acc']:+.2f} points (" in md
    assert "| pool | max |" in md and "| torch |" in md
    # the configuration shows what applies to the run and what ran
    configuration = md.split("## Configuration")[1].split("## Environment")[0]
    assert "muon" not in configuration and "| optimizer | sgd |" in configuration
    assert "| channels-last | true (default) |" in configuration  # asked: none, ran: true
    assert "| device | cpu" in configuration and "| processes | 1 |" in configuration
    assert "resolved" not in configuration
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert images == ["loss.png", "accuracy.png", "utilization.png", "confusion.png",
                      "top_losses.png", "saliency.png", "confused.png"]  # the last: Mistakes
    assert all((run / name).read_bytes().startswith(PNG) for name in images)

    text = written["html"].read_text()
    _self_contained(text)
    pngs = _html_images(text)
    assert len(pngs) == 7 and all(p.startswith(PNG) for p in pngs)
    assert pngs[3] == (run / "confusion.png").read_bytes()


def test_report_without_the_data_or_a_finished_run_says_so(run, tmp_path):
    (run / "summary.json").unlink()
    written = write_report([run], tmp_path / "out", data_dir=tmp_path / "nowhere", device="cpu")
    md = written["md"].read_text()
    assert "The test data is not available here" in md and "mnist not found" in md
    assert "did not finish: 2 of 2 epochs evaluated" in md
    assert "Unfinished runs (no summary.json; shown from their metrics): run." in md
    assert not (tmp_path / "out" / "run-confusion.png").exists()
    # Figures of a run outside the report directory are copied next to report.md.
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert "/" not in name and (tmp_path / "out" / name).is_file()
    _self_contained(written["html"].read_text())
    assert len(_html_images(written["html"].read_text())) == 3


def test_report_on_a_sweep_and_on_several_runs(sweep, tmp_path, capsys):
    work = shutil.copytree(sweep, tmp_path / "sweep")
    assert main(["report", str(work), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.split() == [str(work / "report.md"), str(work / "report.html")]
    md = (work / "report.md").read_text()
    assert "# cnnlab report: sweep sweep (2 runs)" in md
    assert "| configuration | pool | runs | final test acc (%) | best on test (%) |" in md
    assert re.search(r"\*\*(max|avg) pooling scored higher: [0-9.]+% vs [0-9.]+% best test "
                     r"accuracy \(difference [0-9.]+ points, 1 seed each\)\. With one seed there "
                     r"is no spread to test the difference against", md)
    assert "### Per-class accuracy side by side" in md and "| class | pool=max | pool=avg |" in md
    # a table of contents; what all runs share, once; each run folded, with its own options
    assert "- [Comparison](#comparison)" in md and "- [Runs](#runs)" in md
    assert "- [Environment](#environment)" in md and md.count("| torch |") == 1
    assert md.count("| optimizer | sgd |") == 1 and md.count("| pool |") == 3
    assert "<summary>Run pool=max-seed=0: final test accuracy" in md
    assert "<summary>Run pool=avg-seed=0: final test accuracy" in md
    html = (work / "report.html").read_text()
    assert '<h2 id="comparison">Comparison</h2>' in html and '<a href="#runs">Runs</a>' in html
    assert html.count("<details>") == 2
    assert "![Loss of pool=max-seed=0](pool=max-seed=0/loss.png)" in md  # used in place
    for name in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (work / name).is_file(), name
    assert len(_html_images(html)) == 3 + 2 * 7
    # no figure twice: the comparison is the sweep's own accuracy.png, loss.png and
    # comparison.png, and each run's confusion matrix lies in its directory
    assert "](comparison.png)" in md
    assert not list(work.glob("comparison-*.png")) and not list(work.glob("*confusion*.png"))
    assert (work / "pool=max-seed=0" / "confusion.png").is_file()

    out = tmp_path / "several"
    assert main(["report", str(work / "pool=max-seed=0"), str(work / "pool=avg-seed=0"),
                 "--out", str(out), "--no-eval"]) == 0
    md = (out / "report.md").read_text()
    assert "# cnnlab report: 2 runs" in md and "## Comparison" in md
    assert "Not computed (--no-eval)." in md and "confusion.png" not in md
    assert "## Mistakes" not in md and "top_losses.png" not in md
    assert (out / "comparison-accuracy.png").is_file() and (out / "comparison.png").is_file()
    assert (out / "pool=avg-seed=0-loss.png").is_file()


@pytest.mark.parametrize("make,message", [
    (lambda p: p, "is neither a run directory (no config.json) nor a sweep directory"),
    (lambda p: p / "missing", "no run or sweep directory at"),
])
def test_report_bad_input_is_one_line_exit_2(tmp_path, capsys, make, message):
    code = main(["report", str(make(tmp_path))])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("cnnlab: error:")
    assert message in lines[0]


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


_CHECK = """<script>
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const loaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  const div = document.createElement("div");
  div.id = "cnnlab-image-check";
  div.textContent = loaded + "/" + images.length;
  document.body.appendChild(div);
});
</script>
"""


def test_report_html_loads_every_image_in_headless_chromium(sweep, tmp_path):
    browser = _chromium()
    if browser is None and os.environ.get("CNNLAB_REQUIRE_BROWSER"):  # CI could install it
        pytest.fail("CNNLAB_REQUIRE_BROWSER is set but no Chromium was found on PATH")
    if browser is None:
        pytest.skip("no Chromium on this machine (.ci/run installs Debian's chromium package)")
    work = shutil.copytree(sweep, tmp_path / "sweep")
    write_report([work], device="cpu")
    page = tmp_path / "page" / "report.html"  # a copy alone: nothing beside it to load
    page.parent.mkdir()
    page.write_text((work / "report.html").read_text().replace("</body>", _CHECK + "</body>"))
    res = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=180)
    found = re.search(r'id="cnnlab-image-check">(\d+)/(\d+)<', res.stdout)
    assert found, f"no image count in the page (exit {res.returncode}): {res.stderr[-2000:]}"
    loaded, total = map(int, found.groups())
    assert total == 17 and loaded == total  # the Mistakes' three figures of each run too


def test_figures_leave_pyplot_and_its_backend_alone(tmp_path):
    """Notebook users keep their inline backend: drawing never imports pyplot."""
    code = ("import sys; from cnnlab.plots import plot_confusion, plot_run; "
            f"plot_confusion([[3, 1], [0, 4]], ['a', 'b'], {str(tmp_path / 'c.png')!r}); "
            f"plot_run({str(tmp_path)!r}); "
            "assert 'matplotlib.pyplot' not in sys.modules")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "c.png").read_bytes().startswith(PNG)


def test_the_lab_reports_numbers_stand_beside_its_reproduced_experiment(tmp_path):
    from cnnlab.config import resolve
    from cnnlab.files import write_json

    runs = []
    for optimizer, lr, acc in (("sgd", 0.01, 71.2), ("adamax", 0.002, 60.1)):
        run = tmp_path / f"{optimizer}-{lr}"
        run.mkdir()
        cfg = resolve("resnet18", "cifar10", overrides={"preset": "seed", "optimizer": optimizer,
                                                        "lr": lr}).to_dict()
        write_json(run / "config.json", cfg)
        (run / "metrics.jsonl").write_text(json.dumps(
            {"type": "eval", "epoch": 30, "steps": 23460, "test_loss": 1.0, "test_acc": acc,
             "train_seconds": 100.0}) + "\n")
        write_json(run / "summary.json", {"final_test_acc": acc, "best_test_acc": acc,
                                          "best_epoch": 30, "train_seconds": 100.0,
                                          "images_per_second": 500.0, "epochs": 30})
        runs.append(run)
    md = write_report(runs, tmp_path / "out", evaluate=False)["md"].read_text()
    assert "what the lab report (SEED.md) saw with the same recipe after 30 epochs" in md
    assert re.search(r"\| sgd-0\.01 \| sgd \| 0\.01 \| 1 \| 71\.20 \| .*\| ~70% \|", md), md
    assert re.search(r"\| adamax-0\.002 \| adamax \| 0\.002 \| 1 \| 60\.10 \| .*\| ~57% \|", md)


def test_muon_settings_are_listed_only_for_runs_trained_with_muon():
    """Sweep tables' fixed settings and a report's comparison columns leave out muon-lr and
    muon-momentum where they mean nothing: in sgd runs, also against runs written before the
    options existed."""
    from cnnlab.config import resolve
    from cnnlab.report import _differing_keys
    from cnnlab.results import fixed_settings

    sgd = resolve("lenet5", "mnist").to_dict()
    old = {k: v for k, v in sgd.items() if not k.startswith("muon_")}
    muon = resolve("lenet5", "mnist", overrides={"optimizer": "muon", "muon_lr": 0.1}).to_dict()
    assert "muon" not in fixed_settings([sgd, sgd]) and "momentum=0.9" in fixed_settings([sgd])
    assert "muon-lr=0.1, muon-momentum=0.89" in fixed_settings([muon, muon])
    assert "muon-lr=0.1" in fixed_settings([sgd, muon]) and "optimizer" not in \
        fixed_settings([sgd, muon])  # muon-lr as the muon runs share it
    ran = sgd | {"resolved": {"device": "cpu", "precision": "fp32", "world_size": 1,
                              "channels_last": True}}  # what the runs' config.json say
    assert "precision=fp32 (auto), channels-last=true (default)" in fixed_settings([ran, ran])
    assert "precision" not in fixed_settings([ran, ran | {"resolved": ran["resolved"] | {
        "precision": "bf16"}}])  # asked alike, ran differently: not one fixed setting
    assert _differing_keys([sgd, old]) == []
    assert _differing_keys([sgd, muon]) == ["optimizer"]
    assert _differing_keys([muon, {**muon, "muon_lr": 0.2}]) == ["muon_lr"]


def test_a_sweep_over_models_says_which_network(tmp_path):
    """With the model as a grid key the report sets each network's accuracy beside its
    paper, parameters, multiply-adds and training time, in a table and models.png."""
    data = write_mnist(tmp_path / "data", n_train=64, n_test=32)
    out = tmp_path / "sweep"
    assert main(["sweep", "lenet5", "mnist", "--data-dir", str(data), "--grid",
                 "model=lenet5,mobilenetv2", "--epochs", "1", "--batch-size", "32",
                 "--telemetry", "0", "--out", str(out), "--quiet"]) == 0
    md = write_report([out], device="cpu", evaluate=False)["md"].read_text()
    section = md.split("### Which network")[1].split("\n## ")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in section.splitlines()
            if line.startswith("| lenet5") or line.startswith("| mobilenetv2")}
    assert set(rows) == {"lenet5", "mobilenetv2"}, section
    assert "| LeCun et al. 1998 | 61,706 | 416,520 |" in rows["lenet5"]
    assert "| Sandler et al. 2018 |" in rows["mobilenetv2"]
    assert ("![Accuracy against parameters, multiply-adds and training time](models.png)"
            in section)
    assert (out / "models.png").read_bytes().startswith(PNG)
