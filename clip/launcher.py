"""What the launcher told this process: torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) or SLURM's (SLURM_PROCID, the step's task count and node list, ...) read into a LauncherEnvironment,
with SLURM's compressed node lists expanded to find the rendezvous host. Variables that make no distributed run
are LauncherMisconfigured, which clip-train says in one line.

Nothing here runs at import, and nothing here touches torch: the environment is a mapping passed in. Joining the
process group the variables describe, and choosing this process's device, are `clip.distributed`'s.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from .launcher_death import launched_by_torchrun

# Under SLURM without MASTER_PORT (which always wins), each job step waits at its own port:
#     29500 + (SLURM_JOB_ID + 617 * SLURM_STEP_ID) mod 1000
# torchrun's default and the 999 ports above it: unprivileged, and below Linux's ephemeral range (32768-60999), from
# which the ranks' own connections take their ports. Two steps of one job running at once on a node (two sruns in
# an allocation) would otherwise meet at one port: the second step's rank 0 cannot bind it, and its other ranks join
# the first step's group. With the step id in the sum, the steps of one job have different ports (617 is coprime to
# 1000). A job array's tasks are jobs of their own (SLURM_JOB_ID; SLURM_ARRAY_JOB_ID is the shared one): those whose
# ids differ by less than 21 keep different ports in their first 47 steps (617 is near 1000 / golden ratio, which
# spreads its multiples over the range). Other pairs of jobs on one node meet with a chance of 1 in 1000, as before:
# export MASTER_PORT for those.
DEFAULT_MASTER_PORT = 29500
SLURM_PORT_SPREAD = 1000
SLURM_STEP_PORT_STRIDE = 617
# What torchrun sets for each of its workers (besides others this library does not read)
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class LauncherEnvironment:
    """What a launcher told this process; `None` from `read_launcher_environment` means no launcher."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" or "slurm"


def expand_nodelist(nodelist: str) -> list[str]:
    """Expands SLURM's compressed host list: "node[001-003,007],gpu-a[1-2]-ib" ->
    ["node001", "node002", "node003", "node007", "gpu-a1-ib", "gpu-a2-ib"]. Zero padding is kept, and
    several bracket groups in one name expand to their cartesian product."""
    hosts: list[str] = []
    for item in _split_top_level_commas(nodelist.strip()):
        hosts.extend(_expand_host_pattern(item))
    return hosts


def _split_top_level_commas(text: str) -> list[str]:
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in SLURM node list {text!r}")
        elif char == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in SLURM node list {text!r}")
    items.append(text[start:])
    return [item for item in items if item]


def _expand_host_pattern(pattern: str) -> list[str]:
    match = re.search(r"\[([^\[\]]*)\]", pattern)
    if match is None:
        return [pattern]
    prefix, suffix = pattern[: match.start()], pattern[match.end() :]
    names = []
    for part in match.group(1).split(","):
        bounds = part.split("-")
        if len(bounds) == 1 and bounds[0].isdigit():
            numbers, width = [bounds[0]], 0
        elif len(bounds) == 2 and all(b.isdigit() for b in bounds) and int(bounds[0]) <= int(bounds[1]):
            width = len(bounds[0])  # "001-004" keeps three digits
            numbers = [str(n).zfill(width) for n in range(int(bounds[0]), int(bounds[1]) + 1)]
        else:
            raise ValueError(f"cannot parse range {part!r} in SLURM node list {pattern!r}")
        for number in numbers:
            names.extend(_expand_host_pattern(prefix + number + suffix))
    return names


SCONTROL_TIMEOUT_S = 30


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list, by `scontrol show hostnames` when SLURM's tools are installed,
    else by our own parser (which covers the syntax SLURM documents for host lists), also when scontrol fails,
    says nothing or does not answer within SCONTROL_TIMEOUT_S."""
    if shutil.which("scontrol"):
        try:
            # a bounded wait: every rank asks this before training, and an scontrol stuck on an unreachable
            # controller or a hung file system would hold the whole job at start-up without a word
            result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                    check=False, timeout=SCONTROL_TIMEOUT_S)
        except (subprocess.TimeoutExpired, OSError):
            result = None
        if result is not None and result.returncode == 0 and result.stdout.split():
            return result.stdout.split()[0]
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise ValueError(f"SLURM node list {nodelist!r} names no host")
    return hosts[0]


class LauncherMisconfigured(RuntimeError):
    """A launcher's variables that make no distributed run (said in one line by clip-train)."""


def read_launcher_environment(environ: Mapping[str, str], check_ranges: bool = True) -> LauncherEnvironment | None:
    """torchrun's variables when present (they win, so torchrun inside an srun step works), else SLURM's,
    else None: a single process. Plain `python train.py` inside `salloc` has no SLURM_PROCID and is
    single-process; launch the job's processes with `srun` (one task per GPU) or with torchrun.
    LauncherMisconfigured where they make no run, also for RANK or WORLD_SIZE without the rest of torchrun's
    (under srun: one that is not SLURM's); with `check_ranges`, also for numbers that make no process group
    (`_check_ranges`), which a process that makes none (a one-process command asking whether it is one of several)
    need not refuse."""
    try:
        launch = _launcher_environment(environ)
    except ValueError as error:  # a rank that is no number, a node list that does not parse
        raise LauncherMisconfigured(f"cannot read the launcher's variables: {error}") from error
    if launch is not None and check_ranges:
        _check_ranges(launch, environ)
    return launch


def _check_ranges(launch: LauncherEnvironment, environ: Mapping[str, str]) -> None:
    """LauncherMisconfigured for numbers that make no process group: torch's own errors were a traceback ("Port out
    of range" for `export MASTER_PORT=$((29500 + SLURM_JOB_ID))`, "TCPStore world size cannot be 0"), a misleading
    "rank parameter missing" for a negative rank, or, for a rank beyond the world size, a wait of 30 minutes."""
    torchrun = launch.launcher == "torchrun"
    names = {"rank": "RANK" if torchrun else "SLURM_PROCID",
             "world_size": "WORLD_SIZE" if torchrun else _slurm_task_count_name(environ),
             "local_rank": "LOCAL_RANK" if torchrun else "SLURM_LOCALID"}
    problems = []
    if launch.world_size < 1:
        problems.append(f"{names['world_size']}={launch.world_size} is no number of processes (at least 1)")
    elif not 0 <= launch.rank < launch.world_size:
        problems.append(f"{names['rank']}={launch.rank} is not a rank of {launch.world_size} processes "
                        f"(0 to {launch.world_size - 1}, from {names['world_size']})")
    if launch.local_rank < 0:
        problems.append(f"{names['local_rank']}={launch.local_rank} is negative")
    if not 1 <= launch.master_port <= 65535:
        problems.append(f"MASTER_PORT={launch.master_port} is no TCP port (1 to 65535)")
    if problems:
        raise LauncherMisconfigured(f"the launcher's variables make no process group: {'; '.join(problems)}")


def _launcher_environment(environ: Mapping[str, str]) -> LauncherEnvironment | None:
    # RANK or WORLD_SIZE alone is torch's process-group description half written (a job script's `export
    # RANK=$SLURM_PROCID` without WORLD_SIZE, a wrapper that passed on only some of torchrun's variables). It fell
    # through to SLURM's variables, whose rank may not be that RANK, or to a single process, each of the job's
    # processes then training alone: which of them the user meant only they can say. Under srun SLURM's
    # variables say it, and a RANK or WORLD_SIZE is an error only where it says otherwise.
    given = [name for name in ("RANK", "WORLD_SIZE") if name in environ]
    missing = [name for name in TORCHRUN_VARIABLES if name not in environ]
    if given and not missing:
        # All five exported in a batch script (`export RANK=$SLURM_PROCID ...` is the batch shell's 0 in every task)
        # made every srun task rank 0. Not torchrun's (TORCHELASTIC_RUN_ID; SLURM's variables are not read under
        # it), and one process per task (WORLD_SIZE is the step's task count): then each task's RANK must be
        # SLURM's. Other launchers that start several processes per task give another WORLD_SIZE and are left as
        # they are.
        slurm = None if launched_by_torchrun(environ) else _slurm_environment(environ)
        if slurm is not None and slurm.world_size > 1 and _integer(environ, "WORLD_SIZE") == slurm.world_size:
            _check_agrees_with_slurm(environ, ["RANK"], slurm)
        return LauncherEnvironment(
            rank=_integer(environ, "RANK"),
            world_size=_integer(environ, "WORLD_SIZE"),
            local_rank=_integer(environ, "LOCAL_RANK"),
            master_addr=environ["MASTER_ADDR"],
            master_port=_integer(environ, "MASTER_PORT"),
            launcher="torchrun",
        )
    slurm = _slurm_environment(environ)
    if given and slurm is None:
        raise LauncherMisconfigured(
            f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} set but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not; launch with torchrun, which sets them all, or unset "
            f"{' and '.join(given)}"
        )
    if given:
        _check_agrees_with_slurm(environ, given, slurm)
    return slurm


def _check_agrees_with_slurm(environ: Mapping[str, str], given: list[str], slurm: LauncherEnvironment) -> None:
    """LauncherMisconfigured where RANK or WORLD_SIZE, set under srun without the rest of torchrun's variables,
    is not SLURM's own. A job script's `export WORLD_SIZE=$SLURM_NTASKS` beside MASTER_ADDR and MASTER_PORT (as
    many SLURM guides write it) says what SLURM says, and runs on SLURM's variables as it did before RANK or
    WORLD_SIZE alone were refused; `export RANK=$SLURM_PROCID` in the batch script gives every task the batch
    shell's rank, 0, which SLURM's would silently have overridden."""
    slurm_values = {"RANK": (slurm.rank, "this task's rank (SLURM_PROCID)"),
                    "WORLD_SIZE": (slurm.world_size, f"the step's task count ({_slurm_task_count_name(environ)})")}
    differing = []
    for name in given:
        value, what = slurm_values[name]
        if _integer(environ, name) != value:
            differing.append(f"{name} is {environ[name]} but {what} is {value}")
    if differing:
        same_everywhere = (" (a RANK exported in the batch script is the same in every task)"
                           if any(line.startswith("RANK") for line in differing) else "")
        raise LauncherMisconfigured(
            f"{'; '.join(differing)}{same_everywhere}: unset {' and '.join(given)} (SLURM's are used), or launch "
            f"with torchrun, which sets them all"
        )


def _slurm_task_count_name(environ: Mapping[str, str]) -> str:
    return "SLURM_STEP_NUM_TASKS" if environ.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"


def _slurm_environment(environ: Mapping[str, str]) -> LauncherEnvironment | None:
    """SLURM's variables, when this is a task of an srun step; else None."""
    # SLURM_STEP_NUM_TASKS alone is enough: `srun --preserve-env` keeps the batch environment's SLURM_NTASKS,
    # which sbatch sets only when it was given a task count. Without it every task ran as a single process.
    if "SLURM_PROCID" in environ and ("SLURM_STEP_NUM_TASKS" in environ or "SLURM_NTASKS" in environ):
        # The step's nodes and tasks, which srun sets: a step may use part of the job's nodes (`srun -N 2` in
        # an allocation of 4, or `--relative`), and then task 0 is on the step's first node, not the job's;
        # `srun --preserve-env` leaves SLURM_NTASKS at the job's count. The ranks would wait for a rank 0 or
        # for ranks that are not there until the rendezvous timed out.
        nodelist = (environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
                    or environ.get("SLURM_NODELIST"))
        rank = _integer(environ, "SLURM_PROCID")
        if "MASTER_ADDR" in environ:
            master_addr = environ["MASTER_ADDR"]
        elif nodelist:
            master_addr = first_host(nodelist)
            _check_rank_0_is_on(master_addr, nodelist, rank, environ)
        else:
            raise LauncherMisconfigured("SLURM_PROCID is set but neither MASTER_ADDR nor SLURM_STEP_NODELIST nor "
                               "SLURM_JOB_NODELIST is")
        if "MASTER_PORT" in environ:
            master_port = _integer(environ, "MASTER_PORT")
        else:
            job, step = _integer(environ, "SLURM_JOB_ID", 0), _integer(environ, "SLURM_STEP_ID", 0)
            master_port = DEFAULT_MASTER_PORT + (job + SLURM_STEP_PORT_STRIDE * step) % SLURM_PORT_SPREAD
        return LauncherEnvironment(
            rank=rank,
            world_size=_integer(environ, _slurm_task_count_name(environ)),
            local_rank=_integer(environ, "SLURM_LOCALID", 0),
            master_addr=master_addr,
            master_port=master_port,
            launcher="slurm",
        )
    return None


def _check_rank_0_is_on(master_addr: str, nodelist: str, rank: int, environ: Mapping[str, str]) -> None:
    """LauncherMisconfigured where this task can tell that SLURM did not start rank 0 on `master_addr`, the first host
    of the step's node list.

    Task 0 runs there with the block, cyclic and plane distributions, but not in a heterogeneous step (srun ... : ...),
    whose node list Slurm sorts by name across the components, nor with an arbitrary layout (SLURM_HOSTFILE); the
    ranks would then wait at a host where no rank 0 listens until the rendezvous timed out. A task knows its node
    (SLURMD_NODENAME, in the node lists' own terms) and the step's ranks on that node (SLURM_GTIDS), so the ranks on
    rank 0's node and on the first host see it. The ranks on the other nodes cannot: nothing in their environment says
    where task 0 runs (SLURM_STEP_TASKS_PER_NODE gives counts, not which tasks, and in a heterogeneous step SLURM_NODEID
    counts the nodes in component order, not in the node list's), so they wait until srun ends them (the --wait of
    scripts/slurm_train.sbatch) or the rendezvous times out."""
    node = environ.get("SLURMD_NODENAME")
    if not node:
        return
    ranks_here = environ.get("SLURM_GTIDS", "").split(",")
    step_ranks_known = str(rank) in ranks_here  # else it is not this step's: a task's own rank is among them
    holds_rank_0 = rank == 0 or (step_ranks_known and "0" in ranks_here)
    why = ("(a heterogeneous step, whose node list Slurm sorts, or an arbitrary task layout): export MASTER_ADDR "
           "before srun (in a heterogeneous job, the first host of SLURM_JOB_NODELIST_HET_GROUP_0)")
    if holds_rank_0 and node != master_addr:
        raise LauncherMisconfigured(
            f"SLURM started rank 0 on {node}, not on {master_addr}, the first host of the step's node list "
            f"{nodelist!r}, where the other ranks would look for it {why}"
        )
    if step_ranks_known and not holds_rank_0 and node == master_addr:
        raise LauncherMisconfigured(
            f"SLURM started ranks {','.join(ranks_here)} (SLURM_GTIDS) on {node} and rank 0 elsewhere, though {node} "
            f"is the first host of the step's node list {nodelist!r}, where the ranks look for rank 0 {why}"
        )


def _integer(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    """A launcher variable's number; a ValueError naming the variable (int's own message names none)."""
    if default is not None and name not in environ:
        return default
    value = environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not a whole number") from None
