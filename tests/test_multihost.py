"""Many machines for real, as network namespaces (hosts.py): the two-machine torchrun
command, run on two hosts, trains to the same weights as one process; a host that cannot
reach the first gives up within the timeouts; a PostgreSQL server on one host serves the
others."""

import json
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest
from conftest import REPO, write_mnist
from hosts import PYTHON, network, postgres_server
from test_distributed import ARGS, assert_one_process_run

TORCHRUN = str(Path(PYTHON).with_name("torchrun"))
ENV = {"OMP_NUM_THREADS": "1", "CNNLAB_DIST_TIMEOUT": "60"}
# torch's C++ log (c10d's connection retries, with their C++ stacks): torch writes it itself,
# unless TORCH_CPP_LOG_LEVEL=FATAL was set before it was imported
TORCH_LOG = re.compile(r"\[[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ |Exception raised from |frame #\d+: "
                       r"|<omitting python frames>$|$")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_mnist(tmp_path_factory.mktemp("multihost") / "data", 1024, 256)


def readme_command(host: str, node_rank: int, *args: str) -> list[str]:
    """The two-machine command of docs/many-machines.md as node `node_rank` runs it, one
    process a machine, HOST the first machine's address, `args` for its `resnet18 cifar10`."""
    section = (REPO / "docs" / "many-machines.md").read_text()
    found = re.search(r"^torchrun --nnodes=2 (?:.*\\\n)*.*$", section, re.M)
    assert found, "docs/many-machines.md shows no `torchrun --nnodes=2` command"
    words = shlex.split(found[0].replace("\\\n", " "), comments=True)
    for old, new in (("--nproc_per_node=8", "--nproc_per_node=1"),
                     ("--node-rank=0", f"--node-rank={node_rank}"),
                     ("--master-addr=HOST", f"--master-addr={host}")):
        assert old in words, f"the documented command has no {old}: {found[0]}"
        words[words.index(old)] = new
    assert words[0] == "torchrun" and words[-2:] == ["resnet18", "cifar10"], found[0]
    return [TORCHRUN, *words[1:-2], *args]


def test_two_hosts_match_one_process(data, tmp_path):
    """As test_distributed's two ranks on one machine: one run directory, written once, and
    the weights of one process."""
    out = tmp_path / "ddp"
    train = ["lenet5", "mnist", "--data-dir", str(data), "--out", str(out), *ARGS]
    with network(2) as (a, b):
        nodes = [h.popen(readme_command(a.addr, rank, *train), env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for rank, h in enumerate((a, b))]
        ends = [node.communicate(timeout=150) for node in nodes]
    for node, (_, stderr) in zip(nodes, ends):
        assert node.returncode == 0, stderr
    assert ends[0][0].strip().splitlines() == [str(out)]  # rank 0 alone prints it
    assert ends[1][0] == ""
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert_one_process_run(out, data, tmp_path / "single")


def test_a_host_that_cannot_reach_the_first_gives_up_in_time(data, tmp_path):
    """Node 0 never starts. Node 1's torchrun gives up after its rendezvous timeout; a rank
    that torchrun started and that cannot reach rank 0 gives up after CNNLAB_DIST_TIMEOUT,
    in one line."""
    wait = 3
    train = ["lenet5", "mnist", "--data-dir", str(data), "--out", str(tmp_path / "run"),
             "--device", "cpu", "--telemetry", "0"]
    with network(2) as (a, b):
        agent_cmd = readme_command(a.addr, 1, *train)
        agent_cmd[1:1] = ["--rdzv-conf", f"timeout={wait}"]
        agent = b.popen(agent_cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # what torchrun gives its rank once the machines have met
        rank_env = {**ENV, "CNNLAB_DIST_TIMEOUT": str(wait), "RANK": "1", "WORLD_SIZE": "2",
                    "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "1",
                    "MASTER_ADDR": a.addr, "MASTER_PORT": "29500"}
        rank = b.popen([PYTHON, "-m", "cnnlab", "train", *train], env=rank_env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started = time.monotonic()
        stdout, stderr = rank.communicate(timeout=90)
        rank_took = time.monotonic() - started
        _, agent_err = agent.communicate(timeout=90)
        agent_took = time.monotonic() - started
    assert rank.returncode == 2 and stdout == ""
    ours = [line for line in stderr.splitlines() if not TORCH_LOG.match(line)]
    assert len(ours) == 1 and "Traceback" not in stderr, stderr  # one line, no traceback
    assert ours[0].startswith("cnnlab: error: rank 1 lost contact with the other ranks (")
    assert f"{a.addr}, 29500" in ours[0]
    assert agent.returncode == 1
    assert f"timed out after {wait * 1000}ms while trying to connect to ({a.addr}, 29500)" \
        in agent_err.strip().splitlines()[-1]
    # torch's store client tries twice, a timeout each and a pause between (about 3 times
    # the timeout); the rest is starting Python and torch
    assert wait <= rank_took < 3 * wait + 30 and wait <= agent_took < 3 * wait + 30


@pytest.mark.parametrize("on_a_host", [True, False], ids=["host", "local"])
def test_postgres_serves_other_hosts(on_a_host):
    """The server on one host; a client on another connects and queries it with the URL as
    docs/sweeps.md writes it (psql, and SQLAlchemy as Optuna's storage does: psycopg 3 from the
    postgres extra), and with psycopg2's URL where that driver is installed."""
    if not on_a_host:
        with postgres_server() as url:
            assert url.startswith("postgresql://cnnlab@127.0.0.1:")
            done = subprocess.run(["psql", url, "-Atc", "SELECT 1"],
                                  capture_output=True, text=True, timeout=30)
            assert (done.returncode, done.stdout) == (0, "1\n"), done.stderr
        return
    with network(2) as (a, b), postgres_server(a) as url:
        assert re.fullmatch(rf"postgresql://cnnlab@{a.addr}:\d+/cnnlab", url)
        done = b.run(["psql", url, "-Atc", "SELECT 1"])
        assert done.stdout == "1\n"
        check = ("import sys, sqlalchemy; e = sqlalchemy.create_engine(sys.argv[1]); "
                 "print(e.dialect.driver, e.connect().execute(sqlalchemy.text('SELECT 1'))"
                 ".scalar())")
        assert b.run([PYTHON, "-c", check, url]).stdout == "psycopg 1\n"
        if subprocess.run([PYTHON, "-c", "import psycopg2"], capture_output=True,
                          timeout=30).returncode == 0:
            old = url.replace("postgresql://", "postgresql+psycopg2://", 1)
            assert b.run([PYTHON, "-c", check, old]).stdout == "psycopg2 1\n"
        check = ("import sys, sqlalchemy; e = sqlalchemy.create_engine(sys.argv[1]); "
                 "print(e.connect().execute(sqlalchemy.text('SELECT 1')).scalar())")
        if subprocess.run([PYTHON, "-c", "import psycopg2"], capture_output=True,
                          timeout=30).returncode == 0:
            assert b.run([PYTHON, "-c", check, url]).stdout == "1\n"


def _nodes(data, out, host: str, rank: int, *extra: str) -> list[str]:
    """`cnnlab train` as machine `rank` of two runs it, launching torchrun itself."""
    return [PYTHON, "-m", "cnnlab", "train", "lenet5", "mnist", "--data-dir", str(data),
            "--out", str(out), "--nnodes", "2", "--node-rank", str(rank), "--master-addr",
            host, *extra]


def test_cnnlab_launches_the_machines_itself(data, tmp_path):
    """`cnnlab train ... --nnodes 2 --node-rank R --master-addr HOST` on two hosts: the run
    of one process, the run directory printed by the first machine alone."""
    out = tmp_path / "ddp"
    with network(2) as (a, b):
        nodes = [h.popen(_nodes(data, out, a.addr, rank, *ARGS), env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for rank, h in enumerate((a, b))]
        ends = [node.communicate(timeout=150) for node in nodes]
    for node, (_, stderr) in zip(nodes, ends):
        assert node.returncode == 0, stderr
    assert ends[0][0].strip().splitlines() == [str(out)] and ends[1][0] == ""
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    assert_one_process_run(out, data, tmp_path / "single")


@pytest.mark.parametrize("alone", [1, 0], ids=["second-alone", "first-alone"])
def test_machines_that_never_meet_are_one_line_within_the_timeout(data, tmp_path, alone):
    wait = 3
    with network(2) as (a, b):
        host = (a, b)[alone]
        started = time.monotonic()
        done = host.run(_nodes(data, tmp_path / "run", a.addr, alone, "--rdzv-timeout",
                               str(wait), "--device", "cpu"), env=ENV, check=False,
                        timeout=300)
        took = time.monotonic() - started
    lines = [line for line in done.stderr.splitlines() if not TORCH_LOG.match(line)]
    assert done.returncode != 0 and len(lines) == 1, done.stderr
    assert lines[0].startswith("cnnlab: error: the 2 machines did not all start within "
                               f"--rdzv-timeout {wait} s")
    assert lines[0].endswith(f"run the same command on every machine, --node-rank 0 on "
                             f"{a.addr} (which the others must reach on port 29500)")
    print(f"machine {alone} alone: one line after {took:.1f} s")
    assert took < 3 * wait + 60 + 30  # torch's tries, the launcher's allowance, start-up


def test_a_dead_rank_on_one_machine_prints_the_resume_command_on_both(data, tmp_path):
    import psutil

    out = tmp_path / "run"
    train = ["--epochs", "8", "--batch-size", "32", "--log-every", "1", "--checkpoint-every",
             "8", "--device", "cpu", "--telemetry", "0"]
    with network(2) as (a, b):
        nodes = [h.popen(_nodes(data, out, a.addr, rank, *train), env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for rank, h in enumerate((a, b))]
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").is_file():
            assert time.monotonic() < deadline and all(n.poll() is None for n in nodes)
            time.sleep(0.1)
        victim = next(p for p in psutil.Process(nodes[1].pid).children(recursive=True)
                      if p.environ().get("RANK") == "1")
        victim.kill()
        ends = [node.communicate(timeout=150) for node in nodes]
        for rank, (_, stderr) in enumerate(ends):
            ours = [line for line in stderr.splitlines() if line.startswith("cnnlab: error:")]
            assert len(ours) == 1 and "Traceback" not in stderr, stderr
            assert ours[0].endswith(
                f"resume with: cnnlab train --resume {out} --nnodes 2 --node-rank {rank} "
                f"--master-addr {a.addr} --master-port 29500 here, and the same with its own "
                "--node-rank on every other machine"), ours[0]
        assert "rank 1 died (killed by SIGKILL)" in ends[1][1]
        resumed = [h.popen([PYTHON, "-m", "cnnlab", "train", "--resume", str(out), "--nnodes",
                            "2", "--node-rank", str(rank), "--master-addr", a.addr], env=ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                   for rank, h in enumerate((a, b))]
        again = [node.communicate(timeout=150) for node in resumed]
    assert [n.returncode for n in resumed] == [0, 0], again
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
