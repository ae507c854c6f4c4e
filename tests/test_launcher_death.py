"""A torchrun killed outright (SIGKILL) left its workers training on, in sessions of their own, holding the run
directory's lock against the rerun: under torchrun the kernel now sends them SIGTERM when it ends, which stops
the run with a checkpoint (clip.launcher_death, StopRequest.stop_when_torchrun_ends)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import clip.stopping as stopping
from clip.launcher_death import TORCHRUN_VARIABLE, has_ended
from clip.stopping import StopRequest

LAUNCHER_DEATH = Path(__file__).resolve().parents[1] / "clip" / "launcher_death.py"

# The worker loads clip/launcher_death.py alone (clip's package imports torch: seconds), asks for SIGTERM at its
# parent's end, says so in `armed`, and writes `terminated` from its SIGTERM handler.
# Its files are written whole, then renamed into place: the test, which waits for a file to exist, read "armed"
# between its creation and its text once (an empty string)
WORKER = """
import importlib.util, os, pathlib, signal, sys, time
spec = importlib.util.spec_from_file_location("launcher_death", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
folder = pathlib.Path(sys.argv[2])
def put(name, text):
    (folder / (name + ".tmp")).write_text(text)
    os.replace(folder / (name + ".tmp"), folder / name)
signal.signal(signal.SIGTERM, lambda *_: (put("terminated", "yes"), sys.exit(0)))
put("armed", str(module.sigterm_when_the_parent_ends()))
time.sleep(60)
"""
# As torchrun starts its workers: a session of their own, so that nothing but this request reaches them
LAUNCHER = """
import subprocess, sys, time
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]], start_new_session=True)
print(worker.pid, flush=True)
time.sleep(60)
"""


def wait_for(path: Path, seconds: float = 20) -> bool:
    deadline = time.monotonic() + seconds
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return path.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_worker_gets_sigterm_when_its_launcher_is_killed(tmp_path):
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, WORKER, str(LAUNCHER_DEATH), str(tmp_path)],
                                stdout=subprocess.PIPE, text=True)
    worker_pid = int(launcher.stdout.readline())
    try:
        assert wait_for(tmp_path / "armed") and (tmp_path / "armed").read_text() == "True"
        time.sleep(0.5)
        assert not (tmp_path / "terminated").exists()  # not while the launcher lives
        launcher.kill()
        launcher.wait(timeout=10)
        assert wait_for(tmp_path / "terminated"), "the worker went on after its launcher's SIGKILL"
    finally:
        launcher.kill()
        with contextlib.suppress(ProcessLookupError):  # gone already, as it should be
            os.kill(worker_pid, signal.SIGKILL)


def test_the_request_is_made_under_torchrun_only_and_a_launcher_gone_meanwhile_stops_the_run(monkeypatch):
    requests = []
    monkeypatch.setattr(stopping, "sigterm_when_the_parent_ends", lambda: requests.append(1) or True)
    killed = []
    monkeypatch.setattr(stopping.os, "kill", lambda pid, sig: killed.append((pid, sig)))
    with StopRequest() as stop:
        stop.stop_when_torchrun_ends({})  # srun's tasks, a process started by hand: nothing asked
        assert requests == [] and stop.launcher_pid is None
        parents = iter([4321, 4321])
        monkeypatch.setattr(stopping.os, "getppid", lambda: next(parents))
        ended = False
        monkeypatch.setattr(stopping, "has_ended", lambda pid: ended)
        stop.stop_when_torchrun_ends({TORCHRUN_VARIABLE: "run"})
        assert requests == [1] and stop.launcher_pid == 4321 and killed == []
        parents = iter([4321, 1])  # torchrun ended just before the request, which then sends nothing
        stop.stop_when_torchrun_ends({TORCHRUN_VARIABLE: "run"})
        assert killed == [(os.getpid(), signal.SIGTERM)]
        parents, ended = iter([4321, 4321]), True  # ... or is ending: its threads still hold its pid
        stop.stop_when_torchrun_ends({TORCHRUN_VARIABLE: "run"})
        assert killed == [(os.getpid(), signal.SIGTERM)] * 2


def test_a_worker_whose_torchrun_ended_while_it_imported_the_library_stops(monkeypatch):
    # torchrun killed during its workers' imports: the request below came too late (their parent was already
    # init), and they waited at the rendezvous torchrun had served. clip-train notes its parent's pid first.
    import clip_commands
    from clip.launcher_death import LAUNCHER_PID_VARIABLE

    environ = {TORCHRUN_VARIABLE: "run"}
    clip_commands.remember_the_launcher(environ)
    assert environ[LAUNCHER_PID_VARIABLE] == str(os.getppid())
    clip_commands.remember_the_launcher(without := {})
    assert without == {}  # not under torchrun: nothing noted
    requests, killed = [], []
    monkeypatch.setattr(stopping, "sigterm_when_the_parent_ends", lambda: requests.append(1) or True)
    monkeypatch.setattr(stopping.os, "kill", lambda pid, sig: killed.append((pid, sig)))
    monkeypatch.setattr(stopping.os, "getppid", lambda: 1)  # re-parented: torchrun is gone
    with StopRequest() as stop:
        stop.stop_when_torchrun_ends({TORCHRUN_VARIABLE: "run", LAUNCHER_PID_VARIABLE: "4321"})
        assert killed == [(os.getpid(), signal.SIGTERM)] and stop.launcher_pid == 4321 and requests == []
        killed.clear()
        monkeypatch.setattr(stopping.os, "getppid", lambda: 4321)  # still there: the request, as before
        monkeypatch.setattr(stopping, "has_ended", lambda pid: False)
        stop.stop_when_torchrun_ends({TORCHRUN_VARIABLE: "run", LAUNCHER_PID_VARIABLE: "4321"})
        assert killed == [] and requests == [1]


def test_the_request_waits_for_the_handler_that_saves(monkeypatch):
    # Outside the main thread StopRequest leaves SIGTERM alone: its default action would end the run unsaved
    requests = []
    monkeypatch.setattr(stopping, "sigterm_when_the_parent_ends", lambda: requests.append(1) or True)
    stop = StopRequest()  # not entered: it catches nothing
    stop.stop_when_torchrun_ends({TORCHRUN_VARIABLE: "run"})
    assert requests == [] and stop.launcher_pid is None


def test_the_stop_says_that_torchrun_ended(monkeypatch, caplog):
    with StopRequest() as stop:
        stop.launcher_pid = 4321
        monkeypatch.setattr(stopping.os, "getppid", lambda: 1)
        with caplog.at_level("WARNING", logger="clip.stopping"):
            os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
    assert "received signal 15 (torchrun, pid 4321, which started this process, has ended): stopping at the next " \
           "safe point" in caplog.text


def test_the_stop_says_that_torchrun_ended_while_its_other_threads_still_end(monkeypatch, caplog):
    # Seen with torchrun and kill -9: the SIGTERM comes as torchrun's main thread ends, and this process is handed to
    # one of its threads still ending, so os.getppid() is still torchrun's pid; the message said "signal 15" alone
    ended = []
    monkeypatch.setattr(stopping, "has_ended", lambda pid: ended.append(pid) or True)
    with StopRequest() as stop:
        stop.launcher_pid = os.getppid()
        with caplog.at_level("WARNING", logger="clip.stopping"):
            os.kill(os.getpid(), signal.SIGTERM)
    assert ended == [stop.launcher_pid]
    said = f"received signal 15 (torchrun, pid {stop.launcher_pid}, which started this process, has ended)"
    assert said in caplog.text


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads Linux's /proc")
def test_a_process_has_ended_once_a_zombie_or_gone():
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    assert not has_ended(os.getpid()) and not has_ended(child.pid)
    child.stdin.close()  # it ends, and stays a zombie until waited for
    deadline = time.monotonic() + 20
    while not has_ended(child.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert has_ended(child.pid)
    child.wait()
    assert has_ended(child.pid)  # gone


def test_without_proc_a_launcher_is_not_taken_for_ended(monkeypatch):
    # A sandbox without /proc: "no such file" says nothing of the process, and the run would stop at its start
    import clip.launcher_death as launcher_death

    monkeypatch.setattr(launcher_death, "Path", lambda path: Path("/nonexistent") / str(path).lstrip("/"))
    assert not launcher_death.has_ended(os.getpid())


def test_a_worker_in_a_pid_namespace_of_its_own_runs_on(monkeypatch):
    # Started into a new PID namespace under torchrun (unshare --pid), os.getppid() is 0 and /proc has no
    # process 0: that read as "torchrun has ended", and every start stopped itself with status 75
    requests, killed = [], []
    monkeypatch.setattr(stopping, "sigterm_when_the_parent_ends", lambda: requests.append(1) or True)
    monkeypatch.setattr(stopping.os, "kill", lambda pid, sig: killed.append((pid, sig)))
    monkeypatch.setattr(stopping.os, "getppid", lambda: 0)
    with StopRequest() as stop:
        stop.stop_when_torchrun_ends({TORCHRUN_VARIABLE: "run"})
        assert requests == [] and killed == [] and stop.launcher_pid is None
    assert not has_ended(0)
