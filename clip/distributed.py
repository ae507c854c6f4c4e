"""Process-group setup from launcher variables (torchrun or SLURM) and an all-gather that carries gradients.

Nothing here runs at import. The only state is torch.distributed's own process group, created by
`init_distributed` and destroyed by `cleanup_distributed`; everything else is passed around as a frozen
`DistributedInfo`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist

logger = logging.getLogger("clip.distributed")

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


@dataclass(frozen=True)
class DistributedInfo:
    rank: int  # global rank of this process, 0 .. world_size - 1
    world_size: int  # number of processes in the job
    local_rank: int  # rank among the processes of this node; selects the GPU
    device: torch.device  # where this process's model and batches live

    @property
    def is_main(self) -> bool:
        """The process that logs, evaluates and writes checkpoints."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def ranks_phrase(count: int, all_of: bool = False) -> str:
    """"1 rank" / "4 ranks" (or "all 4 ranks") for log lines, which a 1-process run also prints."""
    if count == 1:
        return "1 rank"
    return f"all {count} ranks" if all_of else f"{count} ranks"


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


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list, by `scontrol show hostnames` when SLURM's tools are installed,
    else by our own parser (which covers the syntax SLURM documents for host lists)."""
    if shutil.which("scontrol"):
        result = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False)
        if result.returncode == 0 and result.stdout.split():
            return result.stdout.split()[0]
    hosts = expand_nodelist(nodelist)
    if not hosts:
        raise ValueError(f"SLURM node list {nodelist!r} names no host")
    return hosts[0]


class LauncherMisconfigured(RuntimeError):
    """A launcher's variables that make no distributed run (said in one line by clip-train)."""


def read_launcher_environment(environ: Mapping[str, str]) -> LauncherEnvironment | None:
    """torchrun's variables when present (they win, so torchrun inside an srun step works), else SLURM's,
    else None: a single process. Plain `python train.py` inside `salloc` has no SLURM_PROCID and is
    single-process; launch the job's processes with `srun` (one task per GPU) or with torchrun.
    LauncherMisconfigured where they make no run."""
    try:
        return _launcher_environment(environ)
    except ValueError as error:  # a rank that is no number, a node list that does not parse
        raise LauncherMisconfigured(f"cannot read the launcher's variables: {error}") from error


def _launcher_environment(environ: Mapping[str, str]) -> LauncherEnvironment | None:
    if "RANK" in environ and "WORLD_SIZE" in environ:
        missing = [name for name in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if name not in environ]
        if missing:
            raise LauncherMisconfigured(
                f"RANK and WORLD_SIZE are set but {', '.join(missing)} is not; launch with torchrun"
            )
        return LauncherEnvironment(
            rank=_integer(environ, "RANK"),
            world_size=_integer(environ, "WORLD_SIZE"),
            local_rank=_integer(environ, "LOCAL_RANK"),
            master_addr=environ["MASTER_ADDR"],
            master_port=_integer(environ, "MASTER_PORT"),
            launcher="torchrun",
        )
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
            world_size=_integer(environ, "SLURM_STEP_NUM_TASKS" if environ.get("SLURM_STEP_NUM_TASKS")
                                else "SLURM_NTASKS"),
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


class DeviceUnavailable(RuntimeError):
    """The device a run asks for is not on this machine, or not one per process (said in one line by clip-train)."""


def _select_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    selected = torch.device(device)
    if selected.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"train.device = {device!r}, but CUDA is not available on this machine")
        visible = torch.cuda.device_count()
        if selected.index is None:
            selected = torch.device("cuda", _local_gpu_index(local_rank, visible))
        elif selected.index >= visible:  # torch's "invalid device ordinal" names neither
            raise DeviceUnavailable(f"train.device = {device!r}, but this process sees {visible} GPU(s)")
        torch.cuda.set_device(selected)
    elif selected.type != "cpu" and not device_kind_available(selected.type):
        # torch said it in a traceback from the first tensor moved there ("PyTorch is not linked with support
        # for mps devices")
        raise DeviceUnavailable(f"train.device = {device!r}, but this machine has no {selected.type} device")
    return selected


def device_kind_available(kind: str) -> bool:
    """Whether tensors can be placed on devices of this kind here (torch.mps, torch.xpu, ...)."""
    if kind == "mps":
        return torch.backends.mps.is_available()
    available = getattr(getattr(torch, kind, None), "is_available", None)
    return callable(available) and bool(available())


def _local_gpu_index(local_rank: int, visible_gpus: int) -> int:
    """One process per GPU. All of a node's GPUs visible to every process (torchrun, plain srun): the
    LOCAL_RANK-th. One GPU visible (SLURM's --gpus-per-task or --gpu-bind, or a per-rank
    CUDA_VISIBLE_DEVICES): that one, whatever the local rank. (Several processes on a node that has only
    one GPU would all pick it; NCCL then stops them with "Duplicate GPU detected".)"""
    if visible_gpus == 1:
        return 0
    if local_rank >= visible_gpus:
        raise DeviceUnavailable(
            f"local rank {local_rank} but this process sees {visible_gpus} GPUs: start at most one process per "
            f"GPU on each node (torchrun --nproc-per-node, SLURM --ntasks-per-node), or give each process one GPU"
        )
    return local_rank


# How long a rank waits in a collective (and at the rendezvous) for the others. NCCL's own default is 10
# minutes; ranks wait longer than that, at full health, while rank 0 alone downloads train.init_weights (a
# released ViT-L/14 is 890 MB) or writes a checkpoint of a large model and its optimizer state to a slow
# shared file system, and while the nodes of a large job start. A crashed rank does not leave the others
# waiting this long: torchrun and the SLURM script (srun --wait) end them.
COLLECTIVE_TIMEOUT = timedelta(minutes=30)


def init_distributed(backend: str | None = None, device: str = "auto") -> DistributedInfo:
    """Joins the process group the launcher describes and returns this process's place in it.

    device: "auto" (CUDA when available, else CPU), "cpu", "cuda" (the LOCAL_RANK-th visible GPU, or the only one) or an explicit
    "cuda:N". backend: None picks nccl for CUDA and gloo for CPU. Without launcher variables, or with a
    world of one, no process group is created and `is_distributed` is False.
    """
    launch = read_launcher_environment(os.environ)
    local_rank = launch.local_rank if launch else 0
    selected = _select_device(device, local_rank)
    if launch is None or launch.world_size == 1:
        return DistributedInfo(rank=0, world_size=1, local_rank=local_rank, device=selected)

    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised; call cleanup_distributed() first")
    backend = backend or ("nccl" if selected.type == "cuda" else "gloo")
    host = f"[{launch.master_addr}]" if ":" in launch.master_addr else launch.master_addr  # IPv6 needs brackets
    if launch.rank == 0:
        # Said before the wait: a world size the ranks do not fill (python run by hand in an sbatch script,
        # which sets SLURM_PROCID and SLURM_NTASKS without srun's tasks) waits out COLLECTIVE_TIMEOUT silently.
        logger.info(
            "rank 0 of %d (%s's variables): waiting at %s:%d for the other ranks to join (at most %d minutes)",
            launch.world_size, launch.launcher, host, launch.master_port, COLLECTIVE_TIMEOUT.total_seconds() // 60,
        )
    dist.init_process_group(
        backend=backend,
        init_method=f"tcp://{host}:{launch.master_port}",
        rank=launch.rank,
        world_size=launch.world_size,
        device_id=selected if selected.type == "cuda" else None,
        timeout=COLLECTIVE_TIMEOUT,
    )
    return DistributedInfo(
        rank=launch.rank, world_size=launch.world_size, local_rank=launch.local_rank, device=selected
    )


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _all_gather_single(output: torch.Tensor, tensor: torch.Tensor, group) -> None:
    # torch 2.13 renamed the single-tensor collectives (the old names warn on every call); older torch has
    # only the old names, with the same arguments. Looked up here, not at import: torch builds without
    # distributed support have neither.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, tensor, group=group)


def _reduce_scatter_single(output: torch.Tensor, tensor: torch.Tensor, group) -> None:
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    reduce_scatter(output, tensor, op=dist.ReduceOp.SUM, group=group)


class _AllGatherWithGradient(torch.autograd.Function):
    """all_gather in forward; in backward, rank r receives the SUM over all ranks of the gradient that
    their losses sent to slot r (a reduce-scatter)."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.rows = tensor.shape[0]
        world_size = dist.get_world_size(group)
        gathered = tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))
        _all_gather_single(gathered, tensor.contiguous(), group=group)
        return gathered  # rank order: rows [r*B, (r+1)*B) come from rank r

    @staticmethod
    def backward(ctx, grad_gathered: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad_gathered = grad_gathered.contiguous()
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            grad_local = grad_gathered.new_empty((ctx.rows, *grad_gathered.shape[1:]))
            _reduce_scatter_single(grad_local, grad_gathered, group=ctx.group)
            return grad_local, None
        # gloo has no reduce-scatter: all-reduce the whole gradient (twice the traffic) and keep our slot.
        grad_gathered = grad_gathered.clone()  # autograd may still need the incoming buffer
        dist.all_reduce(grad_gathered, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad_gathered[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows], None


def gather_features(features: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """[B, D] on each rank -> [world_size * B, D] on every rank, in rank order, differentiable.

    Every rank must pass the same shape (use equal per-rank batches, e.g. drop_last). Without an
    initialised process group, or with a world of one, the features are returned as they are.

    Why gradients come out exact. Each rank r computes a loss L_r over its own B rows against all N
    gathered columns, scaled so that the global loss is L = mean_r L_r. The features of rank r enter
    every rank's loss (as columns), so dL/d(features_r) = 1/W * sum_q dL_q/d(features_r). Backward of
    this gather hands rank r exactly sum_q dL_q/d(features_r) (the reduce-scatter), and DDP's averaging
    of parameter gradients supplies the 1/W. So the averaged gradient equals the single-process gradient
    on the concatenated batch.

    The alternative that open_clip popularised -- gather without gradient, put the local tensor back
    into its own slot -- only sees dL_r/d(features_r); it is exact only when every rank computes the
    full [N, N] loss identically (W times the compute and memory), and even then DDP's averaging
    leaves the gradient W times too small unless the loss is multiplied by W. We use the reduce-scatter
    instead: [B, N] work per rank and no rescaling.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return features
    return _AllGatherWithGradient.apply(features, group)


class StepAgreement(NamedTuple):
    """What every rank decides alike after a step's backward passes."""

    losses_finite: bool  # every rank's loss, of every micro-batch, was finite
    gradients_finite: bool  # the gradient norm is finite (always True when none was given)
    stop: bool  # some rank was asked to stop: checkpoint after this step


def agree_after_backward(
    losses_finite: torch.Tensor, grad_norm: torch.Tensor | None, stop_requested: bool, dist_info: DistributedInfo,
) -> StepAgreement:
    """The step's verdict, from one collective and the step's only device sync.

    Every rank must skip a non-finite step together, or the ranks' weights would part; and ranks receive a
    stop signal up to a step apart, but must stop after the same step. Both questions share one all-reduce
    (MIN over [losses finite, gradients finite, not stopping]) after the backward passes, so the host waits
    for the device once per step: reading the loss before its backward pass would leave the device idle
    while the host launches that pass, once per micro-batch. The backward passes of a non-finite loss ran
    (on every rank alike, so DDP's all-reduces pair up); the caller drops their gradients.
    `losses_finite` is a boolean scalar on the device; `grad_norm` the (all-reduced, so rank-independent)
    gradient norm, or None where something else judges the gradients (fp16's gradient scaler)."""
    losses_finite = losses_finite.reshape(())  # a scalar: anything else is a bug upstream
    gradients_finite = torch.ones_like(losses_finite) if grad_norm is None else torch.isfinite(grad_norm.reshape(()))
    not_stopping = torch.full_like(losses_finite, not stop_requested, dtype=torch.bool)
    flags = torch.stack([losses_finite, gradients_finite.to(losses_finite.device), not_stopping]).to(torch.float32)
    if dist_info.is_distributed:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    all_losses_finite, all_gradients_finite, none_stopping = flags.tolist()
    return StepAgreement(all_losses_finite == 1.0, all_gradients_finite == 1.0, none_stopping == 0.0)


def broadcast_buffers_from_rank_zero(module: torch.nn.Module) -> None:
    """Every rank's module buffers set to rank 0's (a collective: every rank calls it at the same point). DDP
    gives every rank rank 0's buffers at the start of each forward pass, after which each rank updates them
    with its own batch: a ResNet's BatchNorm statistics differ between ranks after a step, and an evaluation
    that each rank runs on its share of the data would use several models, none of them the one saved."""
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def any_rank(flag: bool, dist_info: DistributedInfo) -> bool:
    """Whether `flag` is set on some rank (a collective: every rank calls it at the same point)."""
    value = torch.tensor([float(flag)], device=dist_info.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def raise_on_every_rank(failure: BaseException | None, dist_info: DistributedInfo, elsewhere: BaseException) -> None:
    """Raises on every rank when some rank failed: its own `failure` where it has one, else `elsewhere`
    (which names the failing rank's log). Every rank calls this at the same point (a collective), so that
    none is left waiting for a failed one in its next collective until that times out."""
    if dist_info.is_distributed and any_rank(failure is not None, dist_info) and failure is None:
        raise elsewhere
    if failure is not None:
        raise failure


def from_rank_zero(value, dist_info: DistributedInfo):
    """Rank 0's `value` (picklable) on every rank (a collective: every rank calls it at the same point)."""
    if not dist_info.is_distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0, device=dist_info.device)
    return holder[0]


def gather_objects(value, dist_info: DistributedInfo) -> list:
    if not dist_info.is_distributed:
        return [value]
    gathered = [None] * dist_info.world_size
    dist.all_gather_object(gathered, value)
    return gathered
