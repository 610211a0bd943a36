"""`cnnlab bench` from an installed wheel: no source checkout, nothing read from outside the
package. Builds the wheel and installs it into a new virtual environment, offline; the
dependencies are this interpreter's own, already installed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from conftest import REPO, write_mnist


def _run(cmd: list, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=env)
    assert res.returncode == 0, f"{cmd}: {res.stderr[-3000:]}"
    return res


def _install_wheel(tmp_path: Path) -> Path:
    """Build cnnlab's wheel from a copy of the sources (building writes beside them), install
    it into a new venv, and return the venv's bin/ folder."""
    source = tmp_path / "source"
    shutil.copytree(REPO / "src", source / "src",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--no-cache-dir", "--disable-pip-version-check"]
    _run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", tmp_path / "wheels", source])
    [wheel] = (tmp_path / "wheels").glob("cnnlab-*.whl")
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    _run([*pip, "--python", python, "install", "-q", "--no-deps", "--no-index", wheel])
    # Then the dependencies: this interpreter's site-packages, named in a .pth file (after
    # the install, so that pip saw no other cnnlab). A folder a .pth names is no site
    # directory: the .pth of the project's editable install there is not read.
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                .stdout.strip())
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site / "dependencies.pth").write_text("".join(f"{path}\n" for path in ours))
    found = _run([python, "-c", "import cnnlab; print(cnnlab.__file__)"], cwd=tmp_path)
    assert Path(found.stdout.strip()).is_relative_to(site), found.stdout
    return venv / "bin"


def test_bench_runs_from_an_installed_wheel(tmp_path):
    bin_dir = _install_wheel(tmp_path)
    data = write_mnist(tmp_path / "data")
    work = tmp_path / "elsewhere"  # no source checkout around
    work.mkdir()
    assert "--rows" in _run([bin_dir / "cnnlab", "bench", "--help"], cwd=work).stdout
    res = _run([bin_dir / "cnnlab", "bench", "--suite", "cpu", "--rows", "loop",
                "--data-dir", data, "--out", "bench.json"], cwd=work)
    name = "LeNet-5/MNIST seed recipe, one epoch of the loop (s)"
    assert res.stdout.splitlines()[-1].startswith(name), res.stdout
    [row] = json.loads((work / "bench.json").read_text())["rows"]
    assert row["name"] == name and row["reference"] > 0 and row["cnnlab"] > 0
    # the reference as the whole-process rows start it
    epoch = _run([bin_dir / "python", "-m", "cnnlab.reference", "lenet-epoch", data], cwd=work)
    assert json.loads(epoch.stdout)["images"] == 512
