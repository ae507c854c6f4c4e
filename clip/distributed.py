"""The process group of a distributed run and its collectives: joining the group that the launcher's variables
describe (read by `clip.launcher`), this process's device, an all-gather that carries gradients, and the
collectives by which the ranks agree.

Nothing here runs at import. The only state is torch.distributed's own process group, created by
`init_distributed` and destroyed by `cleanup_distributed`; everything else is passed around as a frozen
`DistributedInfo`.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist

from .device_names import DeviceNotAvailableError, device_availability_problem, device_kind_available
from .launcher import read_launcher_environment
from .stopping import STOP_SIGNALS

logger = logging.getLogger("clip.distributed")


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


class DeviceUnavailable(DeviceNotAvailableError):
    """The device a run asks for is not on this machine, or not one per process (said in one line by clip-train).
    A DeviceNotAvailableError, as clip.load's refusal of a device is: one type catches both."""


class RendezvousPortInUse(RuntimeError):
    """Rank 0 cannot listen at the launcher's port: another program has it (said in one line by clip-train)."""


def _select_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    selected = torch.device(device)
    if selected.type == "cuda":
        # Not clip.load's check (`device_availability_problem`): "cuda" here is this rank's GPU among those it
        # sees (LOCAL_RANK), which becomes torch's current device, and the messages name the setting
        if not torch.cuda.is_available():
            raise DeviceUnavailable(f"train.device = {device!r}, but CUDA is not available on this machine")
        visible = torch.cuda.device_count()
        if selected.index is None:
            selected = torch.device("cuda", _local_gpu_index(local_rank, visible))
        elif selected.index >= visible:  # torch's "invalid device ordinal" names neither
            raise DeviceUnavailable(f"train.device = {device!r}, but this process sees {visible} GPU(s)")
        torch.cuda.set_device(selected)
    elif selected.type != "cpu":
        _check_other_device(selected, device)
    return selected


def _check_other_device(selected: torch.device, device: str) -> None:
    """Refuses a device of a kind other than CUDA that this machine lacks ("mps" off a Mac; torch said so in a
    traceback from the first tensor moved there, "PyTorch is not linked with support for mps devices"), or
    whose index is past those this process sees: clip.load's check. Also, unlike clip.load, a kind torch gives
    no way to ask about."""
    if device_kind_available(selected.type) is None:
        # clip.load lets a plugin's kind (torch_xla's "xla") through: it only places a model there, and a device
        # that is missing fails at once. A run is refused it. Its setup (the ranks' rendezvous, a download of
        # train.init_weights, a resume's reads) may take minutes before a missing device would fail; and its
        # ranks meet with nccl (CUDA) or gloo, neither the backend such a device's tensors need (torch_xla's own)
        raise DeviceUnavailable(
            f"train.device = {device!r}, but training runs on devices torch can check for here ('cpu', 'cuda', "
            f"'mps', 'xpu', ...): torch has no torch.{selected.type}.is_available"
        )
    problem = device_availability_problem(selected)
    if problem is not None:
        raise DeviceUnavailable(f"train.device = {device!r}, but {problem}")


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

    if not dist.is_available():  # torch built without it (some macOS and mobile builds): no is_initialized either
        raise RuntimeError(
            f"the launcher's variables ask for {launch.world_size} processes, but this torch build has no distributed "
            f"support (torch.distributed.is_available() is False): run one process, or install a torch build with it"
        )
    if dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised; call cleanup_distributed() first")
    backend = backend or ("nccl" if selected.type == "cuda" else "gloo")
    host = f"[{launch.master_addr}]" if ":" in launch.master_addr else launch.master_addr  # IPv6 needs brackets
    if launch.rank == 0:
        # Said before the wait: a world size the ranks do not fill (python run by hand in an sbatch script,
        # which sets SLURM_PROCID and SLURM_NTASKS without srun's tasks) waits out COLLECTIVE_TIMEOUT silently.
        # srun sets SLURM_STEP_NUM_TASKS in every task; the batch script's own shell has SLURM_NTASKS alone
        outside_srun = launch.launcher == "slurm" and "SLURM_STEP_NUM_TASKS" not in os.environ
        logger.log(
            logging.WARNING if outside_srun else logging.INFO,
            "rank 0 of %d (%s's variables): waiting at %s:%d for the other ranks to join (at most %d minutes)%s",
            launch.world_size, launch.launcher, host, launch.master_port, COLLECTIVE_TIMEOUT.total_seconds() // 60,
            "; SLURM_STEP_NUM_TASKS is not set, as in the batch script itself rather than in a task of srun: "
            "started there, by hand, this process is alone and waits for ranks that never come (launch the job's "
            "processes with srun, or torchrun)" if outside_srun else "",
        )
    # Imported before the group exists: its functions' default `group=group.WORLD` is evaluated at import, and
    # imported later (torch._dynamo imports it, which the optimizer's constructor imports) it held the default
    # process group for the rest of the process. destroy_process_group then freed nothing: gloo's worker threads
    # lived on into the interpreter's exit, where one still freeing its last collective's tensors needs the GIL,
    # and a thread that asks for it then is ended mid-destructor: std::terminate, status -6
    import torch.distributed.nn.functional  # noqa: F401
    with default_signal_action():
        try:
            dist.init_process_group(
                backend=backend,
                init_method=f"tcp://{host}:{launch.master_port}",
                rank=launch.rank,
                world_size=launch.world_size,
                device_id=selected if selected.type == "cuda" else None,
                timeout=COLLECTIVE_TIMEOUT,
            )
        except dist.DistNetworkError as error:
            # torch's traceback named the port but not the variable that sets it. Two SLURM jobs on one node may
            # be given one port (`clip.launcher`'s default, 1 in 1000); the other job's ranks are not disturbed
            # libuv's TCPStore says EADDRINUSE; the older one (USE_LIBUV=0) "Address already in use"
            if "EADDRINUSE" not in str(error) and "address already in use" not in str(error).lower():
                raise
            raise RendezvousPortInUse(
                f"rank 0 cannot wait for the other ranks at port {launch.master_port} of {host}: another program "
                f"(another job's rank 0?) is listening there; give the ranks a free one: MASTER_PORT exported before "
                f"srun, or torchrun's --master-port"
            ) from error
    return DistributedInfo(
        rank=launch.rank, world_size=launch.world_size, local_rank=launch.local_rank, device=selected
    )


@contextlib.contextmanager
def default_signal_action() -> Iterator[None]:
    """SIGTERM, Ctrl-C and SIGUSR1 take their default action (end the process) inside the block, whatever handlers the
    caller installed (`train`'s and clip-train's catch them): blocked in init_process_group's C++ rendezvous, a
    process never runs a Python handler, so a caught signal would leave it waiting out the rendezvous timeout
    for ranks that may never come; the default action ends it at once. Outside the main thread, which cannot
    change them, the handlers are left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_DFL) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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

    @property
    def skipped(self) -> bool:
        return not (self.losses_finite and self.gradients_finite)

    @classmethod
    def read(cls, flags: torch.Tensor) -> StepAgreement:
        """The verdict that `agreement_flags` holds, read on the host (a device sync when they are on a GPU)."""
        all_losses_finite, all_gradients_finite, none_stopping = flags.tolist()
        return cls(all_losses_finite == 1.0, all_gradients_finite == 1.0, none_stopping == 0.0)

    @staticmethod
    def skipped_on_device(flags: torch.Tensor) -> torch.Tensor:
        """`skipped` from `agreement_flags` as a boolean scalar on their device, nothing read on the host."""
        return flags[:2].min() < 1.0


def agreement_flags(
    losses_finite: torch.Tensor, grad_norm: torch.Tensor | None, stop_requested: bool, dist_info: DistributedInfo,
) -> torch.Tensor:
    """The step's verdict as float32 [losses finite, gradients finite, not stopping] (1.0 or 0.0) on the device,
    the same on every rank: one all-reduce (MIN) over them, and nothing read on the host.

    Every rank must skip a non-finite step together, or the ranks' weights would part; and ranks receive a
    stop signal up to a step apart, but must stop after the same step. Both questions share the one collective,
    after the backward passes. The backward passes of a non-finite loss ran (on every rank alike, so DDP's
    all-reduces pair up); the caller drops their gradients. `losses_finite` is a boolean scalar on the device;
    `grad_norm` the (all-reduced, so rank-independent) gradient norm, or None where something else judges the
    gradients (fp16's gradient scaler)."""
    losses_finite = losses_finite.reshape(())  # a scalar: anything else is a bug upstream
    gradients_finite = torch.ones_like(losses_finite) if grad_norm is None else torch.isfinite(grad_norm.reshape(()))
    not_stopping = torch.full_like(losses_finite, not stop_requested, dtype=torch.bool)
    flags = torch.stack([losses_finite, gradients_finite.to(losses_finite.device), not_stopping]).to(torch.float32)
    if dist_info.is_distributed:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return flags


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
    (which names the failing rank's log), marked as another rank's failure (`failed_on_another_rank`). Every
    rank calls this at the same point (a collective), so that none is left waiting for a failed one in its
    next collective until that times out.

    A rank whose own failure reads as rank 0's is marked alike: what every rank finds from the same config (an
    epoch with fewer samples than the data workers of all ranks) was said by every one, the same line hundreds of
    times in a large job. One that reads otherwise (a path missing on its node alone) is its own to say."""
    if dist_info.is_distributed and any_rank(failure is not None, dist_info):
        # every rank takes part in the broadcast, failed or not
        said_by_rank_0 = from_rank_zero(str(failure) if dist_info.is_main and failure is not None else None,
                                        dist_info)
        if failure is None:
            elsewhere.failed_on_another_rank = True
            raise elsewhere
        if not dist_info.is_main and str(failure) == said_by_rank_0:
            failure.failed_on_another_rank = True
    if failure is not None:
        raise failure


def failed_on_another_rank(error: BaseException) -> bool:
    """Whether `error` is `raise_on_every_rank`'s pointer to another rank's failure, or this rank's own that reads as
    rank 0's: the same line on many ranks, which rank 0 alone need say."""
    return getattr(error, "failed_on_another_rank", False) is True


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


def release_run_objects(error: BaseException) -> None:
    """Frees what the failed run's frames hold (the DDP module, which holds the process group) before the
    process group is destroyed. The exception's traceback keeps those frames alive, often through a reference
    cycle, so they were freed only at interpreter exit, after the process group, where gloo's threads
    sometimes aborted the process (SIGABRT, "terminate called without an active exception") instead of its
    exit status reporting the error. The traceback keeps its lines; only the frames' local variables go. The
    errors it chains (`raise ... from`, or one raised while another was handled) hold frames of their own."""
    pending, seen = [error], set()
    while pending:
        chained = pending.pop()
        if chained is None or id(chained) in seen:
            continue
        seen.add(id(chained))
        traceback.clear_frames(chained.__traceback__)  # skips frames still running (this call's callers)
        pending += [chained.__cause__, chained.__context__]
    gc.collect()
