"""What the command says while it works and when it cannot go on: progress in long phases
(also where stderr is no terminal, or a terminal that reports no size), a write error's
advice that fits the error, and help for every option."""

import errno
import os
import subprocess
import sys

import pytest
import torch

import cnnlab
from cnnlab import progress
from cnnlab.cli import build_parser
from cnnlab.errors import CnnlabError


def test_plain_lines_come_between_log_steps_when_they_are_far_apart(capsys, monkeypatch):
    monkeypatch.setattr(progress, "QUIET_SECONDS", 0.0)
    with progress.Progress(10, epochs=2) as bar:
        bar.advance(1)
        bar.advance(1)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("epoch 1/2 step 1/10, ETA ") and len(lines) == 2


def test_no_extra_lines_while_log_steps_come_often(capsys):
    with progress.Progress(10, epochs=2) as bar:
        for _ in range(10):
            bar.advance(1)
    assert capsys.readouterr().err == ""


def test_a_long_phase_says_what_it_does_and_a_short_one_says_nothing(capsys, monkeypatch):
    with progress.Phase("decoding pets/train", 100) as phase:
        phase.update(100)
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(progress, "QUIET_SECONDS", 0.0)
    with progress.Phase("decoding pets/train", 100) as phase:
        phase.update(40)
        phase.update(60)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("cnnlab: decoding pets/train: 40 of 100 images (40%), ")
    assert lines[-1].startswith("cnnlab: decoding pets/train: done, 100 images in ")


def test_a_terminal_that_reports_no_size_gets_plain_lines(monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(sys.stderr, "fileno", lambda: 2, raising=False)
    monkeypatch.setattr(os, "get_terminal_size", lambda fd: os.terminal_size((0, 0)))
    assert not progress.on_terminal()
    monkeypatch.setattr(os, "get_terminal_size", lambda fd: os.terminal_size((120, 40)))
    assert progress.on_terminal()


@pytest.mark.parametrize("error, advice", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device; free some "
                                                       "space, then continue with: cnnlab"),
    (OSError(errno.EACCES, "Permission denied"), "Permission denied; once it can be written, "
                                                 "continue with: cnnlab"),
])
def test_only_a_full_disk_is_told_to_free_space(tiny_mnist, tmp_path, monkeypatch, error, advice):
    real_save, saves = torch.save, []

    def failing_save(obj, f, *a, **kw):
        saves.append(1)
        if len(saves) > 1:
            raise error
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(CnnlabError, match=advice) as refused:
        cnnlab.train("lenet5", "mnist", data_dir=str(tiny_mnist), out=tmp_path / "run",
                     epochs=2, batch_size=64, telemetry=0, progress=False)
    assert (error.errno == errno.ENOSPC) == ("free some space" in str(refused.value))


def test_every_option_of_every_command_has_help():
    parser = build_parser()
    for name, command in parser.commands.items():
        for action in command._actions:
            assert action.help, f"cnnlab {name} {'/'.join(action.option_strings) or action.dest}"


def test_library_warnings_add_no_lines(tmp_path):
    """Pillow warns of a decompression bomb for images over its pixel limit (lowered here, by
    a sitecustomize, to 200 pixels: the folder's 16x16 images exceed it)."""
    from conftest import write_folder

    folder = write_folder(tmp_path / "pets", n_train=2, n_test=1)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import PIL.Image\nPIL.Image.MAX_IMAGE_PIXELS = 200\n")
    cmd = [sys.executable, "-m", "cnnlab", "train", "lenet5", f"folder:{folder}", "--epochs",
           "1", "--telemetry", "0"]
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    env.pop("PYTHONWARNINGS", None)
    shown = subprocess.run([*cmd, "--out", str(tmp_path / "a")], capture_output=True, text=True,
                           timeout=120, env={**env, "PYTHONWARNINGS": "default"})
    assert "DecompressionBombWarning" in shown.stderr  # the warning is real
    quiet = subprocess.run([*cmd, "--out", str(tmp_path / "b")], capture_output=True, text=True,
                           timeout=120, env=env)
    assert quiet.returncode == 0 and "Warning" not in quiet.stderr, quiet.stderr


def test_a_quiet_sweep_prints_only_its_directory(tiny_mnist, tmp_path, capsys):
    from cnnlab.cli import main

    out = tmp_path / "sweep"
    assert main(["sweep", "lenet5", "mnist", "--data-dir", str(tiny_mnist), "--grid",
                 "lr=0.05", "--epochs", "0.2", "--telemetry", "0", "--out", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr()
    assert printed.out == f"{out}\n" and printed.err == ""
    assert (out / "results.md").is_file()
