"""clip-train run as its command runs, signalling itself at chosen points of its process's life, for the tests of
its exit status (test_clip_train_signals.py). Deterministic: each signal is sent from the code it interrupts.

    python signalled_clip_train.py ENTRY POINT:SIGNAL[,POINT:SIGNAL...] CLIP_TRAIN_ARGS...

ENTRY: "script" (python scripts/train.py, through clip_commands.clip_train as the clip-train command) or "module"
(python -m clip.cli.train: clip.cli.train.command alone, without clip_commands' handling of the imports).
POINT: "import" (as clip.train is imported: no other point with it), "config" (as the config is read), "step2"
(before the run's second forward pass), "teardown" (as train destroys the process group), "returned" (as train
has returned to clip-train), "exit" (at the interpreter's exit, after clip-train's main returned), "finalization"
(as the interpreter frees its modules, after its exit functions ran: past the point where Python puts back the
default action of every signal it handled).
"""

import atexit
import os
import runpy
import signal
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def send(signame: str) -> None:
    os.kill(os.getpid(), getattr(signal, signame))


class SignalOnImport:
    """A meta path finder that only signals, as `module` is first looked for."""

    def __init__(self, module: str, signame: str) -> None:
        self.module, self.signame = module, signame

    def find_spec(self, name, path, target=None):
        if name == self.module:
            send(self.signame)
        return None


class SignalWhenFreed:
    """Signals as it is freed: kept by the __main__ module alone, that is as the interpreter clears its modules."""

    def __init__(self, signame: str) -> None:
        # Kept here: the module's globals may be gone by then
        self.kill, self.pid, self.signum = os.kill, os.getpid(), getattr(signal, signame)

    def __del__(self) -> None:
        self.kill(self.pid, self.signum)


def signalling(real, signame: str, call: int = 1, after: bool = False):
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call and not after:
            send(signame)
        result = real(*args, **kwargs)
        if calls["n"] == call and after:
            send(signame)
        return result

    return wrapper


def main() -> None:
    entry, points, args = sys.argv[1], dict(p.split(":") for p in sys.argv[2].split(",")), sys.argv[3:]
    if "import" in points:
        sys.meta_path.insert(0, SignalOnImport("clip.train", points.pop("import")))
    else:
        # Patched where clip-train finds them: it is imported afterwards, by the entry
        import clip.config
        import clip.train

        if "config" in points:
            clip.config.load_config = signalling(clip.config.load_config, points.pop("config"))
        if "step2" in points:
            clip.train.contrastive_step = signalling(clip.train.contrastive_step, points.pop("step2"), call=2)
        if "teardown" in points:
            clip.train.cleanup_distributed = signalling(clip.train.cleanup_distributed, points.pop("teardown"))
        if "returned" in points:
            clip.train.train = signalling(clip.train.train, points.pop("returned"), after=True)
        if "exit" in points:
            atexit.register(send, points.pop("exit"))  # registered first: run last
    if "finalization" in points:
        globals()["signal_when_freed"] = SignalWhenFreed(points.pop("finalization"))
    assert not points, f"unknown points: {points}"
    if entry == "script":
        sys.argv = [str(REPO / "scripts" / "train.py"), *args]
        runpy.run_path(sys.argv[0], run_name="__main__")
    else:
        sys.argv = ["clip-train", *args]
        runpy.run_module("clip.cli.train", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
