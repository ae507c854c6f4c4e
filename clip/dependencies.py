"""The error for a setting that needs a package or tool this environment lacks: `logging.wandb`'s wandb, webdataset
for shards, the fsspec backend of a shard URL's protocol (s3fs for s3://), a C++ compiler for `train.compile` on
the CPU. Checked before a run starts, so that it ends with one line naming what to install rather than a
traceback from deep inside the data, logging or compiler."""


class MissingDependency(ImportError):
    """A setting asks for a package that is not installed."""


def require_a_compiler_for_compile(device_type: str) -> None:
    """`train.compile` on the CPU: torch.compile's inductor builds C++ code, and without a compiler the run failed
    at its first step, after its setup, in a traceback that did not name the setting. Asked of inductor itself
    (its own search of g++ and $CXX). Not checked on CUDA, where Triton's needs depend on its version."""
    if device_type != "cpu":
        return
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another torch's layout: inductor says it itself at the first step
        return
    try:
        get_cpp_compiler()
    except Exception as error:
        if type(error).__name__ != "InvalidCxxCompiler":
            return
        raise MissingDependency(
            "train.compile = true on the CPU needs a C++ compiler, which torch.compile's inductor builds its code "
            "with: none found (g++, or the one $CXX names); install one (e.g. apt install g++) or set "
            "train.compile = false"
        ) from error
