"""Shared fixtures: run the real CLI, create units, mount for real and always unmount.

Every mount made through :func:`mounter` is torn down even when the test fails: ``fusermount3
-u``, then ``fusermount3 -uz``, then SIGKILL of the daemon; and the test fails if the daemon's
log holds a traceback or an ERROR line the test did not declare as expected.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

BIN = Path(sys.executable).parent
FM = str(BIN / "fusemirror")
FSCK = str(BIN / "fsck.fusemirror")


def run_fm(*args: str, check: bool = True, env: dict[str, str] | None = None,
           user: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``fusemirror ARGS`` (or a user's command via setpriv) and return the result."""
    cmd = [FM, *args]
    if user is not None:
        cmd = as_user(user, cmd)
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(env), timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def run_fsck(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([FSCK, *args], capture_output=True, text=True, env=_env(env),
                          timeout=600)


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    if extra:
        env.update(extra)
    return env


def as_user(user: str, cmd: list[str]) -> list[str]:
    import pwd

    pw = pwd.getpwnam(user)
    return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups",
            "--reset-env", "env", f"PATH={BIN}:/usr/bin:/bin:/usr/sbin:/sbin",
            f"HOME={pw.pw_dir}", *cmd]


def status(unit: str | Path) -> dict[str, Any]:
    return json.loads(run_fm("status", str(unit), "--json").stdout)


def wait_for(cond: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``cond`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def is_mounted(path: str | Path) -> bool:
    p = os.path.abspath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == p for line in f)


def lock_pid(unit: str | Path) -> int | None:
    """The pid recorded in the unit's lock file (the daemon), or None."""
    try:
        text = (Path(unit) / "lock").read_text().split()
    except FileNotFoundError:
        return None
    return int(text[0]) if text else None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def kill9(unit: str | Path, mnt: str | Path | None = None) -> None:
    """SIGKILL the daemon of ``unit`` and wait until it is gone (a simulated crash)."""
    pid = lock_pid(unit)
    assert pid is not None and pid_alive(pid), "no daemon to kill"
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), what=f"pid {pid} to die")
    if mnt is not None and is_mounted(mnt):
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)


@dataclass
class Mounted:
    unit: Path
    mnt: Path
    expected_errors: list[str] = field(default_factory=list)

    @property
    def image(self) -> Path:
        return self.mnt / "image"

    def status(self) -> dict[str, Any]:
        return status(self.unit)

    def control(self, cmd: str, **args: Any) -> Any:
        sys.path.insert(0, str(Path(__file__).parent.parent))
        from fusemirror import control

        return control.request(str(self.unit / "control.sock"), cmd, **args)

    def expect_errors(self, *patterns: str) -> None:
        self.expected_errors.extend(patterns)


def check_log(unit: Path, expected: list[str]) -> list[str]:
    """Unexpected tracebacks and ERROR lines in the unit's daemon log."""
    log = unit / "daemon.log"
    if not log.exists():
        return []
    bad = []
    for line in log.read_text(errors="replace").splitlines():
        if "Traceback" in line or " ERROR " in line or " CRITICAL " in line:
            if not any(re.search(p, line) for p in expected):
                bad.append(line)
    return bad


def teardown_mount(unit: Path, mnt: Path) -> None:
    """Unmount by every means short of a lazy detach first, then make sure the daemon is gone."""
    if is_mounted(mnt):
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
    if is_mounted(mnt):
        subprocess.run(["fusermount3", "-uz", str(mnt)], capture_output=True)
    pid = lock_pid(unit)
    try:
        holder = (Path(unit) / "lock").read_text().split()[1:]
    except (FileNotFoundError, IndexError):
        holder = []
    if holder == ["agent"]:
        return      # a unit demoted and served by an agent since: the agent's fixture stops it
    if pid is not None and pid_alive(pid):
        try:
            wait_for(lambda: not pid_alive(pid), timeout=10, what="daemon exit")
        except AssertionError:
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not pid_alive(pid), timeout=10, what="daemon death")


@pytest.fixture
def mounter(tmp_path: Path) -> Iterator[Callable[..., Mounted]]:
    """``mounter(unit=None, size="64M", activate=True, args=(), env=None, create_args=())``.

    Creates (unless ``unit`` is given) and mounts a unit, returns a :class:`Mounted`. Tears
    every mount down at the end and fails the test on unexpected daemon errors.
    """
    made: list[Mounted] = []
    counter = [0]

    def _mount(unit: Path | None = None, *, size: str = "64M", activate: bool = True,
               args: tuple[str, ...] = (), env: dict[str, str] | None = None,
               create_args: tuple[str, ...] = (), mnt: Path | None = None) -> Mounted:
        counter[0] += 1
        if unit is None:
            unit = tmp_path / f"unit{counter[0]}"
            run_fm("create", str(unit), "--size", size, *create_args)
            if activate:
                run_fm("activate", str(unit))
        if mnt is None:
            mnt = tmp_path / f"mnt{counter[0]}"
            mnt.mkdir(exist_ok=True)
        m = Mounted(Path(unit), Path(mnt))
        made.append(m)
        run_fm("mount", str(unit), str(mnt), *args, env=env)
        return m

    yield _mount
    problems = []
    for m in made:
        teardown_mount(m.unit, m.mnt)
        bad = check_log(m.unit, m.expected_errors)
        if bad:
            problems.append(f"{m.unit}/daemon.log:\n  " + "\n  ".join(bad[:20]))
    if problems:
        pytest.fail("daemon logged unexpected errors:\n" + "\n".join(problems))


@pytest.fixture
def unit(tmp_path: Path) -> Path:
    """A created, ACTIVE, unmounted 64 MiB unit."""
    u = tmp_path / "u"
    run_fm("create", str(u), "--size", "64M")
    run_fm("activate", str(u))
    return u


# ---- slave agents -------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Agent:
    root: Path
    port: int
    secret_file: Path
    log: Path
    proc: subprocess.Popen | None = None
    host: str = "127.0.0.1"
    prefix: list[str] = field(default_factory=list)   # e.g. ["ip", "netns", "exec", "ns"]
    env: dict[str, str] = field(default_factory=dict)
    expected_errors: list[str] = field(default_factory=list)

    def address(self, name: str) -> str:
        return f"{self.host}:{self.port}/{name}"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        logf = open(self.log, "a")
        self.proc = subprocess.Popen(
            [*self.prefix, FM, "serve", str(self.root), "--listen", f"{self.host}:{self.port}",
             "--secret-file", str(self.secret_file)],
            stdout=logf, stderr=subprocess.STDOUT, env=_env(self.env))
        wait_for(lambda: "agent serving" in self.log.read_text() and
                 self.log.read_text().count("agent serving") > self._starts or
                 self.proc.poll() is not None, what="agent start")
        assert self.proc.poll() is None, self.log.read_text()
        self._starts = self.log.read_text().count("agent serving")

    _starts: int = 0

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    p = tmp_path / "secret"
    p.write_text("correct horse battery staple 42\n")
    p.chmod(0o600)
    return p


@pytest.fixture
def agent_factory(tmp_path: Path, secret_file: Path) -> Iterator[Callable[..., Agent]]:
    """``agent_factory(name="a", host="127.0.0.1", prefix=[])`` starts `fusemirror serve`;
    every agent is killed at the end and its log checked for tracebacks."""
    made: list[Agent] = []

    def _agent(name: str = "agent", *, host: str = "127.0.0.1", prefix: list[str] | None = None,
               start: bool = True) -> Agent:
        root = tmp_path / f"{name}-root"
        root.mkdir()
        a = Agent(root, free_port(), secret_file, tmp_path / f"{name}.log", host=host,
                  prefix=prefix or [])
        a.log.touch()
        made.append(a)
        if start:
            a.start()
        return a

    yield _agent
    problems = []
    for a in made:
        a.kill()
        for line in a.log_text().splitlines():
            if ("Traceback" in line or " ERROR " in line) and \
                    not any(re.search(p, line) for p in a.expected_errors):
                problems.append(f"{a.log}: {line}")
    if problems:
        pytest.fail("agent logged unexpected errors:\n" + "\n".join(problems[:20]))
