"""Keeping freed memory in the process while training on the CPU (clip.cpu_memory): the malloc settings made
and put back, their effect on page faults, and the trainer's use of them."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from clip import cpu_memory
from clip.train import train

from test_train_loop import tiny_config

ROOT = Path(__file__).resolve().parents[1]


class RecordingLibc:
    """Stands in for glibc: records mallopt / malloc_trim calls; mallopt answers `accepts`."""

    def __init__(self, accepts: bool = True) -> None:
        self.calls: list[tuple] = []
        self.accepts = accepts

    def mallopt(self, parameter: int, value: int) -> int:
        self.calls.append(("mallopt", parameter, value))
        return int(self.accepts)

    def malloc_trim(self, pad: int) -> int:
        self.calls.append(("malloc_trim", pad))
        return 1


def test_settings_are_made_for_the_block_and_put_back_after_it_even_on_an_error():
    libc = RecordingLibc()
    with pytest.raises(KeyError), cpu_memory.freed_memory_kept(libc, environment={}) as kept:
        assert kept
        assert libc.calls == [("mallopt", cpu_memory.M_MMAP_MAX, 0),
                              ("mallopt", cpu_memory.M_TRIM_THRESHOLD, 2**31 - 1)]
        raise KeyError("the run failed")
    assert libc.calls[2:] == [("mallopt", cpu_memory.M_MMAP_MAX, 65536),
                              ("mallopt", cpu_memory.M_MMAP_THRESHOLD, 32 * 2**20),
                              ("mallopt", cpu_memory.M_TRIM_THRESHOLD, 64 * 2**20),
                              ("malloc_trim", 0)]


def test_a_refused_setting_is_reported_and_the_thresholds_are_still_set_after_it(caplog):
    libc = RecordingLibc(accepts=False)
    with cpu_memory.freed_memory_kept(libc, environment={}) as kept:
        assert not kept
    assert "refused" in caplog.text
    assert libc.calls[-1] == ("malloc_trim", 0)


class PartlyRefusingLibc(RecordingLibc):
    """Accepts every mallopt but the one for `refused`."""

    def __init__(self, refused: int) -> None:
        super().__init__()
        self.refused = refused

    def mallopt(self, parameter: int, value: int) -> int:
        return super().mallopt(parameter, value) and int(parameter != self.refused)


@pytest.mark.parametrize("refused", [cpu_memory.M_MMAP_MAX, cpu_memory.M_TRIM_THRESHOLD])
def test_either_setting_refused_is_reported_as_not_kept(refused, caplog):
    # Both are needed: with mmap still on, or the heap's top still trimmed, freed buffers keep going back
    libc = PartlyRefusingLibc(refused)
    with cpu_memory.freed_memory_kept(libc, environment={}) as kept:
        assert not kept
    assert "refused" in caplog.text
    assert libc.calls[-1] == ("malloc_trim", 0)


@pytest.mark.parametrize("environment", [{"MALLOC_MMAP_THRESHOLD_": "65536"},
                                         {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
                                         {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}])
def test_the_users_own_malloc_settings_are_left_alone(environment, caplog):
    libc = RecordingLibc()
    with caplog.at_level("INFO"), cpu_memory.freed_memory_kept(libc, environment=environment) as kept:
        assert not kept
    assert libc.calls == []
    assert next(iter(environment)) in caplog.text
    others = {"GLIBC_TUNABLES": "glibc.pthread.rseq=0", "PATH": "/bin", "PWD": "/src/jemalloc", "_": "/usr/bin/python"}
    with cpu_memory.freed_memory_kept(libc, environment=others):
        assert libc.calls  # other tunables and variables are not malloc's (whatever their names end or hold)


def test_without_glibc_nothing_is_changed(monkeypatch):
    monkeypatch.setattr(cpu_memory.platform, "libc_ver", lambda: ("", ""))
    assert cpu_memory.glibc() is None
    with cpu_memory.freed_memory_kept() as kept:
        assert not kept


# Allocates, fills and frees a 64 MiB tensor many times, and prints the page faults of the last rounds.
# glibc by default maps a block this size afresh each time (over its 32 MiB cut-off), so every page is
# faulted in and zeroed again: 16,384 faults per round with 4 KiB pages. Kept, the heap first grows by a few
# blocks (torch asks for 64-byte aligned memory, which a freed block of exactly its size cannot serve), then
# serves every round from freed memory.
FAULTS_SCRIPT = textwrap.dedent("""
    import ctypes, json, resource
    import torch
    from clip.cpu_memory import freed_memory_kept

    # Transparent huge pages set to "always" would fault a fresh 64 MiB block in 2 MiB at a time: 4 KiB pages
    # keep the default's count well above the noise (PR_SET_THP_DISABLE). A kernel or sandbox that refuses it
    # (seccomp) leaves the count to chance: reported, and the test skips.
    thp_disabled = ctypes.CDLL("libc.so.6").prctl(41, 1, 0, 0, 0) == 0

    def rounds():
        for _ in range(12):
            torch.empty(16 * 2**20).fill_(1.0)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(4):
            torch.empty(16 * 2**20).fill_(1.0)
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    # The default first: the settings, once made, stay for the process
    default = rounds()
    with freed_memory_kept() as kept:
        print(json.dumps({"default": default, "kept": kept, "kept_faults": rounds(), "thp_disabled": thp_disabled}))
""")


@pytest.mark.skipif(cpu_memory.glibc() is None, reason="glibc's malloc settings only")
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    # A fresh process: the settings are process-wide. Without the caller's malloc variables, which would change
    # the default or turn the settings off.
    environment = {name: value for name, value in os.environ.items()
                   if cpu_memory.users_malloc_settings({name: value}) is None}
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    run = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], capture_output=True, text=True, check=True, cwd=ROOT,
                         env=environment, timeout=120)
    faults = json.loads(run.stdout)
    if not faults["thp_disabled"]:
        pytest.skip("prctl(PR_SET_THP_DISABLE) refused here: huge pages would make the fault counts meaningless")
    assert faults["kept"]
    assert faults["kept_faults"] < faults["default"] / 4, faults


@pytest.mark.parametrize("setting, entered", [([], True), (["train.keep_freed_cpu_memory=false"], False)])
def test_a_cpu_run_keeps_freed_memory_for_its_length_unless_told_not_to(tmp_path, monkeypatch, setting, entered):
    events = []

    @contextlib.contextmanager
    def recording():
        events.append("start")
        yield True
        events.append("end")

    monkeypatch.setattr("clip.run_start.freed_memory_kept", recording)
    train(tiny_config(tmp_path, "schedule.steps=1", "eval.every_n_steps=0", *setting))
    assert events == (["start", "end"] if entered else [])



def test_of_the_malloc_variables_only_glibcs_thresholds_are_the_users_setting():
    # glibc's MALLOC_*_ tunables (a trailing underscore) set what keeping freed memory sets; MALLOC_ARENA_MAX
    # only the number of arenas, which this leaves as it is
    assert cpu_memory.users_malloc_settings({"MALLOC_TRIM_THRESHOLD_": "0"}) == "MALLOC_TRIM_THRESHOLD_"
    assert cpu_memory.users_malloc_settings({"MALLOC_ARENA_MAX": "2"}) is None


def test_a_64_bit_glibc_is_found():
    # Not finding it turns the whole feature off, and the page-fault test above skips instead of failing
    import platform
    import struct

    if not (sys.platform == "linux" and platform.libc_ver()[0] == "glibc" and struct.calcsize("P") == 8):
        pytest.skip("not 64-bit glibc")
    assert cpu_memory.glibc() is not None
