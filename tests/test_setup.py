"""`make setup` picks the PyTorch build for the machine: the CPU-only build where there is no
NVIDIA GPU, from PyTorch's CPU index, else (or where that index fails) the default build;
and says which it installed. Run against stand-ins for python, pip and torch."""

import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def _stand_ins(tmp_path, *, cpu_index_works: bool, gpu: bool):
    """A `python` whose `-m venv DIR` makes a venv of stand-ins: pip logs its arguments (and
    fails for the CPU index unless it works), python runs the real one over a stand-in torch."""
    bin_dir, torch_dir = tmp_path / "bin", tmp_path / "mods" / "torch"
    bin_dir.mkdir()
    torch_dir.mkdir(parents=True)
    (torch_dir / "__init__.py").write_text("__version__ = '2.14.1+cpu'\nfrom . import version\n")
    (torch_dir / "version.py").write_text("cuda = None\n")
    log = tmp_path / "pip.log"
    fail = "" if cpu_index_works else 'case "$*" in *--index-url*) exit 1;; esac\n'
    venv_maker = bin_dir / "python"
    venv_maker.write_text(f"""#!/bin/sh
set -e
[ "$1 $2" = "-m venv" ]
mkdir -p "$3/bin"
cat > "$3/bin/pip" <<'PIP'
#!/bin/sh
echo "$*" >> {log}
{fail}PIP
printf '#!/bin/sh\\nPYTHONPATH={tmp_path / "mods"} exec {sys.executable} "$@"\\n' > "$3/bin/python"
chmod +x "$3/bin/pip" "$3/bin/python"
""")
    venv_maker.chmod(0o755)
    if gpu:
        (bin_dir / "nvidia-smi").write_text("#!/bin/sh\n")
        (bin_dir / "nvidia-smi").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    res = subprocess.run(["make", "-s", "-C", str(REPO), "setup", f"VENV={tmp_path / 'venv'}",
                          f"PYTHON={venv_maker}"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return log.read_text().splitlines(), res.stdout


def test_without_a_gpu_the_cpu_build_comes_first(tmp_path):
    calls, out = _stand_ins(tmp_path, cpu_index_works=True, gpu=False)
    assert calls[0] == ("install -q --timeout 5 --retries 0 --index-url "
                        "https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1")
    assert calls[1] == "install -q -e .[dev,export,postgres]" and len(calls) == 2
    assert "installed PyTorch 2.14.1+cpu (CPU-only build)" in out


def test_an_unreachable_cpu_index_falls_back_to_the_default_build(tmp_path):
    calls, out = _stand_ins(tmp_path, cpu_index_works=False, gpu=False)
    assert "--index-url" in calls[0] and "--timeout 5 --retries 0" in calls[0]
    assert calls[1] == "install -q torch==2.14.1 torchvision==0.29.1"
    assert "could not be installed from its index; installing the default build" in out
    assert "installed PyTorch" in out


def test_with_a_gpu_the_default_build_is_installed(tmp_path):
    calls, out = _stand_ins(tmp_path, cpu_index_works=True, gpu=True)
    assert calls[0] == "install -q torch==2.14.1 torchvision==0.29.1"
    assert not any("--index-url" in c for c in calls)
    assert "an NVIDIA GPU is here: installing PyTorch's default (CUDA) build" in out
