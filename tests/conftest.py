"""Shared pytest setup: `--runslow` enables the tests marked `slow` (skipped by default); the job signals start at
their defaults; every test must leave the process-wide settings that later tests see as it found them; OpenAI's
merges file is in the cache folder without the network."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="also run tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    # A shell starts a background job (`pytest ... &`, as scripts and some CI runners do) with SIGINT ignored, and
    # every child process inherits that through exec: the tests of what a Ctrl-C does then sent one that did
    # nothing, and failed (or passed without testing anything) by how the suite was started
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


def merges_file_copies() -> list[Path]:
    """Copies of OpenAI's merges file on this machine: the shared reference data beside the checkout, and the one
    that open_clip (which the test extra installs) ships inside its package."""
    from clip.tokenizer import MERGES_URL

    name = MERGES_URL.rsplit("/", 1)[1]
    copies = [Path(__file__).resolve().parents[2] / "shared" / "reference" / name]
    open_clip = importlib.util.find_spec("open_clip")  # found, not imported (that would take seconds)
    if open_clip is not None and open_clip.origin is not None:
        copies.append(Path(open_clip.origin).parent / name)
    return copies


@pytest.fixture(scope="session", autouse=True)
def merges_file_in_the_cache(tmp_path_factory):
    """The tests run without the network. Where the cache folder ($CLIP_CACHE_DIR, as .ci/run sets it) lacks the
    merges file, the session's own cache folder gets a copy from `merges_file_copies`, checked against its SHA256:
    a fresh checkout's suite downloaded it (or failed offline, 200 tests)."""
    from clip.download import cache_dir, sha256_of_file
    from clip.tokenizer import MERGES_SHA256, MERGES_URL

    name = MERGES_URL.rsplit("/", 1)[1]
    cached = cache_dir() / name
    if cached.is_file() and sha256_of_file(cached) == MERGES_SHA256:
        yield cached
        return
    source = next((copy for copy in merges_file_copies()
                   if copy.is_file() and sha256_of_file(copy) == MERGES_SHA256), None)
    if source is None:  # the tests that need it download it, as the package does
        yield None
        return
    folder = tmp_path_factory.mktemp("clip-cache")
    shutil.copy(source, folder / name)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CLIP_CACHE_DIR", str(folder))
        yield folder / name


@pytest.fixture
def single_torch_thread():
    """For tests of tiny tensors: intra-op threads only add synchronisation (badly so on a loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def process_wide_settings() -> dict[str, object]:
    """What one test could change for every later test in the session. pytest's own log-capture handlers come and
    go around each phase of a test, so they are left out of the root logger's handlers."""
    root = logging.getLogger()
    return {
        "torch.get_num_threads()": torch.get_num_threads(),
        "torch.get_default_dtype()": torch.get_default_dtype(),
        "torch.are_deterministic_algorithms_enabled()": torch.are_deterministic_algorithms_enabled(),
        "torch.is_grad_enabled()": torch.is_grad_enabled(),
        "torch.backends.cudnn.benchmark": torch.backends.cudnn.benchmark,  # set by a CUDA run, also on the CPU
        "os.getcwd()": os.getcwd(),
        # setuptools adds its _vendor folder the first time torch.compile imports it: once, not the test's doing
        "sys.path": [entry for entry in sys.path if "site-packages" not in entry],
        "SIGINT handler": signal.getsignal(signal.SIGINT),
        "SIGTERM handler": signal.getsignal(signal.SIGTERM),
        "root logger level": root.level,
        "root logger handlers": [handler for handler in root.handlers
                                 if not type(handler).__module__.startswith("_pytest")],
    }


@pytest.fixture(autouse=True)
def leaves_process_wide_settings_as_found():
    # A test that changed one of these passed, and made later tests pass or fail by the order they ran in (one
    # left torch on a single thread for the rest of the session; another grew sys.path by one entry per test)
    before = process_wide_settings()
    yield
    after = process_wide_settings()
    changed = {name: (before[name], after[name]) for name in before if after[name] != before[name]}
    assert not changed, (f"this test changed process-wide settings (before, after): {changed}; put them back "
                         "(monkeypatch, or a fixture that restores them, such as single_torch_thread)")
