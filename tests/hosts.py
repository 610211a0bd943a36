"""Hosts for tests: Linux network namespaces joined by one switch, and a PostgreSQL server.

    with network(2) as (a, b):              # two hosts, 10.213.0.1 and 10.213.0.2
        with postgres_server(a) as url:     # postgresql://cnnlab@10.213.0.1:PORT/cnnlab
            b.run(["psql", url, "-c", "SELECT 1"])

Each host is a network namespace of its own with loopback up and one interface, `eth0`,
whose other end is a port of a bridge in a namespace of its own (the switch). Nothing is
added to this machine's own network: traffic stays on the hosts' loopbacks and the switch,
and deleting the namespaces removes every link. A host runs commands through `ip netns
exec` (the test's environment, the same files); its ports are its own, so any port is free
on a new host unless the test itself took it.

Where it cannot work (not root, no `ip`, namespaces not permitted, no PostgreSQL) the test
skips with the reason; with CNNLAB_REQUIRE_NETNS=1 (CI, as root) it fails instead."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import pytest

REQUIRE = "CNNLAB_REQUIRE_NETNS"
SUBNET = "10.213.0"  # the hosts' /24: host i is SUBNET.(i + 1)
PREFIX = "cnnlab-t"  # every namespace made here: PREFIX<pid of the test process>-<token>-...
PYTHON = sys.executable


def unavailable(reason: str) -> None:
    """Skip the test for `reason`, or fail it where CNNLAB_REQUIRE_NETNS=1 says it must run."""
    if os.environ.get(REQUIRE) == "1":
        pytest.fail(f"{reason} ({REQUIRE}=1: these tests must run here)", pytrace=False)
    pytest.skip(reason)


def _ip(*args: str, timeout: float = 10) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)


def _must(*args: str) -> None:
    done = _ip(*args)
    if done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


@dataclass
class Host:
    """A network namespace with one address on the switch: run commands "on" it."""

    name: str  # h0, h1, ...
    netns: str
    addr: str
    switch: str = ""  # the switch's namespace: this host's cable is its port `name`
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    def cut(self) -> None:
        """Unplug this host's cable: every packet to or from it is lost, with no reset, as
        when a link fails (its connections stay open, unanswered)."""
        _must("-n", self.switch, "link", "set", self.name, "down")

    def mend(self) -> None:
        """Plug the cable back in."""
        _must("-n", self.switch, "link", "set", self.name, "up")

    def command(self, args: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *map(str, args)]

    def popen(self, args: Sequence[str], *, env: dict | None = None,
              **kw) -> subprocess.Popen:
        """Start `args` on this host, in a session of its own (stopped with all it started
        when the network goes), with this process's environment updated by `env`."""
        kw.setdefault("text", True)
        proc = subprocess.Popen(self.command(args), env={**os.environ, **(env or {})},
                                start_new_session=True, **kw)
        self._procs.append(proc)
        return proc

    def run(self, args: Sequence[str], *, timeout: float = 30, check: bool = True,
            env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        """Run `args` on this host to its end (at most `timeout` s), capturing its output."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        proc = self.popen(args, env=env, **kw)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc, signal.SIGKILL)
            raise
        if check and proc.returncode:
            raise AssertionError(f"{' '.join(map(str, args))} on {self.name} exited "
                                 f"{proc.returncode}: {err}")
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def free_port(self) -> int:
        """A TCP port nothing on this host listens on (the kernel's pick)."""
        code = ("import socket; s = socket.socket(); s.bind(('', 0)); "
                "print(s.getsockname()[1])")
        return int(self.run([PYTHON, "-c", code], timeout=20).stdout)

    def stop_all(self, grace: float = 5) -> None:
        """Stop what was started here: SIGTERM to each session, SIGKILL after `grace` s."""
        for proc in self._procs:
            _stop(proc, signal.SIGTERM, grace)
        self._procs.clear()


def _stop(proc: subprocess.Popen, sig: int, grace: float = 5) -> None:
    """Send `sig` to `proc`'s session (its own process group) and reap it, SIGKILL once
    `grace` s have passed."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):  # what it left behind in its group
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe:
            pipe.close()


def _delete_netns(name: str) -> None:
    """Kill whatever still runs in namespace `name`, then delete it (and its links)."""
    pids = _ip("netns", "pids", name).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _ip("netns", "del", name)


def _remove_stale() -> None:
    """Delete namespaces left by test processes that died before they could clean up."""
    for line in _ip("netns", "list").stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("-")[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            _delete_netns(name)


def _check_possible() -> None:
    if os.name != "posix" or not sys.platform.startswith("linux"):
        unavailable("network namespaces need Linux")
    if os.geteuid() != 0:
        unavailable("network namespaces need root")
    if shutil.which("ip") is None:
        unavailable("no `ip` command (iproute2) to make network namespaces")


@contextlib.contextmanager
def network(count: int = 2) -> Iterator[list[Host]]:
    """`count` hosts (1 to 250) on one switch, SUBNET.1, SUBNET.2, ...; all of it, and every
    process started on it, is gone when the block ends, however it ends."""
    _check_possible()
    _remove_stale()
    tag = f"{PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    switch = f"{tag}-sw"
    made: list[str] = []
    hosts: list[Host] = []
    try:
        done = _ip("netns", "add", switch)
        if done.returncode:
            unavailable(f"cannot make a network namespace: {done.stderr.strip()}")
        made.append(switch)
        _must("-n", switch, "link", "set", "lo", "up")
        _must("-n", switch, "link", "add", "br0", "type", "bridge")
        _must("-n", switch, "link", "set", "br0", "up")
        for i in range(count):
            host = Host(f"h{i}", f"{tag}-h{i}", f"{SUBNET}.{i + 1}", switch)
            _must("netns", "add", host.netns)
            made.append(host.netns)
            _must("-n", host.netns, "link", "set", "lo", "up")
            _must("-n", switch, "link", "add", host.name, "type", "veth", "peer", "name",
                  "eth0", "netns", host.netns)
            _must("-n", switch, "link", "set", host.name, "master", "br0", "up")
            _must("-n", host.netns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
            _must("-n", host.netns, "link", "set", "eth0", "up")
            hosts.append(host)
        _wait_until_reachable(hosts)
        yield hosts
    finally:
        for host in hosts:
            host.stop_all()
        for name in reversed(made):
            _delete_netns(name)


_REACH = """if True:
    import socket, sys, time
    deadline = time.monotonic() + float(sys.argv[1])
    for addr in sys.argv[2:]:
        while True:
            try:
                socket.create_connection((addr, 9), timeout=1).close()
                break
            except ConnectionRefusedError:  # a reset from the host: it is reachable
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit(f"{addr} is not reachable")
                time.sleep(0.05)
"""


def _wait_until_reachable(hosts: list[Host], timeout: float = 10) -> None:
    """Wait until the first host reaches every other one, through the switch."""
    if len(hosts) > 1:
        done = hosts[0].run([PYTHON, "-c", _REACH, str(timeout), *(h.addr for h in hosts[1:])],
                            check=False, timeout=timeout + 30)
        if done.returncode:
            raise RuntimeError(f"from {hosts[0].addr}: {done.stderr.strip()}")


# --- PostgreSQL -------------------------------------------------------------------------


def _pg_bin(tool: str) -> str | None:
    """PostgreSQL's `tool` on PATH, else in Debian's versioned folders (the newest)."""
    found = shutil.which(tool)
    if found:
        return found
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit()
                         else 0, reverse=True):
        if os.access(os.path.join(folder, tool), os.X_OK):
            return os.path.join(folder, tool)
    return None


def _server_user() -> pwd.struct_passwd:
    """Who runs the server: this user, or as root (which PostgreSQL refuses) its own user
    where the package made one, else nobody."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    unavailable("no user to run PostgreSQL as (it refuses root): neither postgres nor nobody")
    raise AssertionError  # unreachable


@dataclass
class PostgresServer:
    """A running throwaway PostgreSQL server (see postgres); stop() and start() take it down
    (a fast shutdown: clients lose their connections) and bring it back on the same port."""

    url: str
    start: Callable[[], None]
    stop: Callable[[], None]


@contextlib.contextmanager
def postgres_server(host: Host | None = None, *, dbname: str = "cnnlab", user: str = "cnnlab",
                    timeout: float = 60) -> Iterator[str]:
    """A throwaway PostgreSQL cluster with database `dbname`, listening on `host`'s address
    (every host of its network may connect, without a password), or on 127.0.0.1 without
    one. Yields its URL as docs/sweeps.md writes it, postgresql://USER@ADDR:PORT/DBNAME (libpq's
    form, which SQLAlchemy reads with psycopg 3 and psql takes as it is); the server
    and its files are gone when the block ends."""
    with postgres(host, dbname=dbname, user=user, timeout=timeout) as server:
        yield server.url


@contextlib.contextmanager
def postgres(host: Host | None = None, *, dbname: str = "cnnlab", user: str = "cnnlab",
             timeout: float = 60) -> Iterator[PostgresServer]:
    """postgres_server's server, which the test may stop and start again."""
    tools = {t: _pg_bin(t) for t in ("initdb", "postgres", "pg_isready", "createdb")}
    missing = [t for t, path in tools.items() if path is None]
    if missing:
        unavailable(f"PostgreSQL is not installed (no {', '.join(missing)})")
    account = _server_user()
    as_user = ([] if account.pw_uid == os.geteuid()
               else ["runuser", "-u", account.pw_name, "--"])
    # not under pytest's temp dirs: those are root's alone, and the server runs as another
    folder = tempfile.mkdtemp(prefix="cnnlab-pg-")
    server: list[subprocess.Popen] = []
    try:
        os.chown(folder, account.pw_uid, account.pw_gid)
        data, sockets = os.path.join(folder, "data"), folder

        def run(args: list[str], limit: float = timeout) -> None:
            cmd = (host.command(as_user + args) if host else as_user + args)
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit,
                                  cwd=folder)
            if done.returncode:
                raise RuntimeError(f"{os.path.basename(args[0])} failed: "
                                   f"{(done.stderr or done.stdout).strip()}")

        run([tools["initdb"], "-D", data, "-U", user, "--auth=trust", "-E", "UTF8",
             "--no-sync", "--no-instructions"])
        addr = host.addr if host else "127.0.0.1"
        with open(os.path.join(data, "pg_hba.conf"), "a") as hba:
            hba.write(f"host all all {SUBNET}.0/24 trust\n")
        port = host.free_port() if host else _free_local_port()
        args = [tools["postgres"], "-D", data, "-p", str(port), "-k", sockets,
                "-c", f"listen_addresses={addr}", "-c", "fsync=off",
                "-c", "max_connections=50", "-c", "shared_buffers=16MB"]

        def start() -> None:
            log = open(os.path.join(folder, "server.log"), "a")
            try:
                if host:
                    server.append(host.popen(as_user + args, stdout=log,
                                             stderr=subprocess.STDOUT, cwd=folder))
                else:
                    server.append(subprocess.Popen(as_user + args, stdout=log,
                                                   stderr=subprocess.STDOUT, cwd=folder,
                                                   start_new_session=True))
            finally:
                log.close()
            deadline = time.monotonic() + timeout
            while True:
                ready = subprocess.run(
                    (host.command if host else list)(
                        [tools["pg_isready"], "-q", "-h", addr, "-p", str(port), "-t", "2"]),
                    capture_output=True, timeout=10)
                if ready.returncode == 0:
                    break
                if server[-1].poll() is not None or time.monotonic() > deadline:
                    with open(os.path.join(folder, "server.log")) as f:
                        raise RuntimeError(f"PostgreSQL did not start: {f.read()[-2000:]}")
                time.sleep(0.2)

        def stop() -> None:  # SIGINT: fast shutdown (SIGTERM would wait for clients)
            if server and server[-1].poll() is None:
                _stop(server[-1], signal.SIGINT, grace=15)

        start()
        run([tools["createdb"], "-h", sockets, "-p", str(port), "-U", user, dbname])
        yield PostgresServer(f"postgresql://{user}@{addr}:{port}/{dbname}", start, stop)
    finally:
        for proc in server:
            _stop(proc, signal.SIGINT, grace=15)
        shutil.rmtree(folder, ignore_errors=True)


def _free_local_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
