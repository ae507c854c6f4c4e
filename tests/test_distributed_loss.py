"""clip.launcher, clip.distributed and the distributed losses: launcher parsing, and two gloo processes on 127.0.0.1 whose
DDP-averaged gradients must equal one process on the concatenated batch."""

import math
import re
import subprocess
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from clip.distributed import (
    DistributedInfo,
    cleanup_distributed,
    gather_features,
    init_distributed,
)
from clip.launcher import DEFAULT_MASTER_PORT, expand_nodelist, first_host, read_launcher_environment
from clip.loss import (
    SIGLIP_INITIAL_LOGIT_BIAS,
    SIGLIP_INITIAL_LOGIT_SCALE,
    ContrastiveLoss,
    contrastive_loss_with_cached_features,
)

from multiprocess import free_port, spawn_ranks

WORLD_SIZE = 2
ROWS_PER_RANK = 4
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
# All that the launcher reads: a test run inside an srun step inherits them
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                      "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_STEP_NODELIST",
                      "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURMD_NODENAME", "SLURM_STEP_ID", "SLURM_GTIDS")


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node001", ["node001"]),
        ("node[001-004,007]", ["node001", "node002", "node003", "node004", "node007"]),
        ("a1,b[8-10]", ["a1", "b8", "b9", "b10"]),
        ("gpu-[1-2]-ib,cpu[09-10]", ["gpu-1-ib", "gpu-2-ib", "cpu09", "cpu10"]),
        ("r[1-2]n[1,3]", ["r1n1", "r1n3", "r2n1", "r2n3"]),
        ("10.0.0.5", ["10.0.0.5"]),
        ("n[5-5],m[007]", ["n5", "m007"]),  # a range of one, and one number with its padding
        ("a1,,b2,", ["a1", "b2"]),  # empty items name no host
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts
    assert first_host(nodelist) == hosts[0]


@pytest.mark.parametrize("bad", ["node[1-", "node]1[", "node[4-2]", "node[a-b]", "node[a]", "node[1-2-3]"])
def test_malformed_nodelist_is_an_error(bad):
    with pytest.raises(ValueError, match="SLURM node list"):
        expand_nodelist(bad)


@pytest.mark.parametrize("empty", [",", " "])
def test_a_node_list_naming_no_host_is_an_error(empty):
    with pytest.raises(ValueError, match=f"SLURM node list {empty!r} names no host"):
        first_host(empty)


def test_first_host_asks_scontrol_when_installed_and_parses_itself_when_it_fails(monkeypatch):
    import clip.launcher

    answers, asked = [], []
    # stand-ins for the modules clip.launcher sees, so that the real shutil and subprocess stay untouched
    monkeypatch.setattr(clip.launcher, "shutil", SimpleNamespace(which=lambda name: f"/usr/bin/{name}"))
    monkeypatch.setattr(clip.launcher, "subprocess",
                        SimpleNamespace(run=lambda args, **kwargs: asked.append(args) or answers.pop(0),
                                        TimeoutExpired=subprocess.TimeoutExpired))
    # scontrol's answer wins over our parser's (here they differ, to tell them apart)
    answers.append(subprocess.CompletedProcess([], 0, stdout="head07\nhead08\n"))
    assert first_host("node[1-2]") == "head07"
    assert asked == [["scontrol", "show", "hostnames", "node[1-2]"]]
    # scontrol failing (no slurm.conf on a login node), or saying nothing: our parser's first host
    answers.append(subprocess.CompletedProcess([], 1, stdout="head07\n"))
    assert first_host("node[1-2]") == "node1"
    answers.append(subprocess.CompletedProcess([], 0, stdout=""))
    assert first_host("node[1-2]") == "node1"
    # scontrol not answering (a controller out of reach) or not runnable: our parser's, after a bounded wait
    def no_answer(args, **kwargs):
        assert kwargs["timeout"] == clip.launcher.SCONTROL_TIMEOUT_S
        raise subprocess.TimeoutExpired(args, kwargs["timeout"])
    monkeypatch.setattr(clip.launcher.subprocess, "run", no_answer)
    assert first_host("node[1-2]") == "node1"

    def not_runnable(args, **kwargs):
        raise PermissionError(13, "Permission denied", "scontrol")
    monkeypatch.setattr(clip.launcher.subprocess, "run", not_runnable)
    assert first_host("node[1-2]") == "node1"


def test_torchrun_variables_win_over_slurm():
    environ = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1234",
               "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}
    launch = read_launcher_environment(environ)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("torchrun", 3, 8, 1)
    assert (launch.master_addr, launch.master_port) == ("h", 1234)


def test_slurm_variables():
    environ = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
               "SLURM_JOB_NODELIST": "gpu[017-018]", "SLURM_JOB_ID": "123456"}
    launch = read_launcher_environment(environ)
    assert (launch.launcher, launch.rank, launch.world_size, launch.local_rank) == ("slurm", 5, 8, 1)
    assert launch.master_addr == "gpu017"
    assert launch.master_port == DEFAULT_MASTER_PORT + 456
    launch = read_launcher_environment({**environ, "MASTER_ADDR": "head", "MASTER_PORT": "4000"})
    assert (launch.master_addr, launch.master_port) == ("head", 4000)


def test_concurrent_slurm_steps_wait_at_different_ports():
    # Two sruns at once in one allocation had the job's one port: the second step's rank 0 could not bind it, and
    # its other ranks joined the first step's process group
    def port(job, step):
        environ = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu[017-018]",
                   "SLURM_JOB_ID": str(job), "SLURM_STEP_ID": str(step)}
        return read_launcher_environment(environ).master_port

    assert port(123456, 0) == DEFAULT_MASTER_PORT + 456  # a job's first step keeps the port it had
    assert len({port(123456, step) for step in range(1000)}) == 1000  # a job's steps: all different
    for job in (7, 999, 123456):  # neighbouring jobs (a job array's tasks) in their first 47 steps: all different
        ports = [port(job + offset, step) for offset in range(21) for step in range(47)]
        assert len(set(ports)) == len(ports)
    assert all(DEFAULT_MASTER_PORT <= port(job, step) < 32768 for job in (0, 999, 4294967295) for step in (0, 7, 999))
    environ = {"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu017", "SLURM_JOB_ID": "5",
               "SLURM_STEP_ID": "3", "MASTER_PORT": "4000"}
    assert read_launcher_environment(environ).master_port == 4000  # still the override


def test_torchrun_variables_missing_one_name_it():
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    for name in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        environ = {key: value for key, value in torchrun.items() if key != name}
        with pytest.raises(RuntimeError, match=f"RANK and WORLD_SIZE are set but {name} is not; launch with torchrun"):
            read_launcher_environment(environ)


def test_rank_or_world_size_alone_is_an_error_naming_what_is_missing():
    # One without the other fell through silently: under srun to SLURM's rank (not necessarily this RANK), elsewhere
    # to a single process, each of the job's processes training alone
    slurm_task = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu[1-2]"}
    for alone, missing in (("RANK", "WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not"),
                           ("WORLD_SIZE", "RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT are not")):
        with pytest.raises(RuntimeError, match=f"^{alone} is set but {missing}; launch with torchrun, which sets "
                                               f"them all, or unset {alone}$"):
            read_launcher_environment({alone: "0"})
    # with the rest of torchrun's but not it: the one missing named
    torchrun = {"LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    with pytest.raises(RuntimeError, match="^WORLD_SIZE is set but RANK is not; .* or unset WORLD_SIZE$"):
        read_launcher_environment({**torchrun, "WORLD_SIZE": "2"})
    assert read_launcher_environment({**torchrun, "WORLD_SIZE": "2", "RANK": "1"}).rank == 1
    assert read_launcher_environment(slurm_task).rank == 1  # SLURM's alone, as before


def test_rank_or_world_size_under_srun_must_be_slurms():
    # Under srun SLURM's variables say the rank and the world. A job script's `export WORLD_SIZE=$SLURM_NTASKS`
    # beside MASTER_ADDR and MASTER_PORT, as many SLURM guides write it, says the same and was refused for want of
    # torchrun's other variables; `export RANK=$SLURM_PROCID` in the batch script gives every task rank 0
    slurm_task = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_STEP_NODELIST": "gpu[1-2]",
                  "MASTER_ADDR": "gpu1", "MASTER_PORT": "12355"}
    for agreeing in ({"WORLD_SIZE": "2"}, {"RANK": "1"}, {"RANK": "1", "WORLD_SIZE": "2"}):
        launcher = read_launcher_environment({**slurm_task, **agreeing})
        assert (launcher.launcher, launcher.rank, launcher.world_size, launcher.master_port) == ("slurm", 1, 2, 12355)
    with pytest.raises(RuntimeError, match=r"^RANK is 0 but this task's rank \(SLURM_PROCID\) is 1 \(a RANK "
                                           r"exported in the batch script is the same in every task\): unset RANK "
                                           r"\(SLURM's are used\), or launch with torchrun, which sets them all$"):
        read_launcher_environment({**slurm_task, "RANK": "0"})
    with pytest.raises(RuntimeError, match=r"^WORLD_SIZE is 4 but the step's task count \(SLURM_STEP_NUM_TASKS\) "
                                           r"is 2: unset RANK and WORLD_SIZE \(SLURM's"):
        read_launcher_environment({**slurm_task, "SLURM_STEP_NUM_TASKS": "2", "RANK": "1", "WORLD_SIZE": "4"})
    with pytest.raises(RuntimeError, match=r"^RANK is 0 but .* is 1; WORLD_SIZE is 0 but the step's task count "
                                           r"\(SLURM_NTASKS\) is 2 \(a RANK"):
        read_launcher_environment({**slurm_task, "RANK": "0", "WORLD_SIZE": "0"})
    # All five of torchrun's exported in the batch script: every task was rank 0 (of them, one waited forever)
    everything = {**slurm_task, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    with pytest.raises(RuntimeError, match=r"^RANK is 0 but this task's rank \(SLURM_PROCID\) is 1 \(a RANK"):
        read_launcher_environment(everything)
    assert read_launcher_environment({**everything, "RANK": "1", "LOCAL_RANK": "1"}).rank == 1  # each task's own
    # torchrun inside the srun step, or a launcher that starts several processes per task: theirs, as before
    assert read_launcher_environment({**everything, "TORCHELASTIC_RUN_ID": "7"}).launcher == "torchrun"
    assert read_launcher_environment({**everything, "WORLD_SIZE": "16"}).rank == 0


def test_slurm_defaults_and_the_older_node_list_name():
    # SLURM_NODELIST, the older name salloc and sbatch still set, is read when the other two are absent; a task
    # without SLURM_LOCALID is local rank 0, and a step without SLURM_JOB_ID waits at torchrun's default port
    environ = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_NODELIST": "gpu[005-006]"}
    launch = read_launcher_environment(environ)
    assert (launch.master_addr, launch.master_port, launch.local_rank) == ("gpu005", DEFAULT_MASTER_PORT, 0)
    # with no node list and no MASTER_ADDR there is no host to meet at: an error, not a guess
    with pytest.raises(RuntimeError, match="SLURM_PROCID is set but neither MASTER_ADDR nor SLURM_STEP_NODELIST"):
        read_launcher_environment({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"})
    assert read_launcher_environment({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "MASTER_ADDR": "h"}).master_addr == "h"


def test_slurm_step_on_part_of_the_job():
    # srun -N 2 -n 4 in an allocation of 4 nodes and 8 tasks: task 0 runs on the step's first node, and the
    # step has 4 tasks (SLURM_NTASKS stays the job's under srun --preserve-env). With the job's, the ranks
    # met at a host that runs none of them and waited for 4 ranks that never came, until the timeout.
    environ = {"SLURM_PROCID": "1", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "7",
               "SLURM_JOB_NODELIST": "gpu[001-004]", "SLURM_NODELIST": "gpu[001-004]",
               "SLURM_STEP_NODELIST": "gpu[003-004]", "SLURM_STEP_NUM_TASKS": "4"}
    launch = read_launcher_environment(environ)
    assert (launch.master_addr, launch.world_size, launch.rank) == ("gpu003", 4, 1)


def test_a_gpu_index_past_the_visible_ones_is_named(monkeypatch):
    # torch.cuda.set_device said "invalid device ordinal", naming neither the setting nor the count
    from clip.distributed import DeviceUnavailable, _select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: pytest.fail("set_device reached"))
    with pytest.raises(DeviceUnavailable, match=r"train.device = 'cuda:2', but this process sees 2 GPU\(s\)"):
        _select_device("cuda:2", 0)
    with pytest.raises(DeviceUnavailable, match="local rank 3 but this process sees 2 GPUs"):
        _select_device("cuda", 3)


def test_a_device_kind_this_machine_lacks_is_named(monkeypatch):
    # train.device = "mps" off a Mac stopped the run with torch's traceback from the first tensor moved there
    from clip.distributed import DeviceUnavailable, _select_device

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(DeviceUnavailable, match="train.device = 'mps', but this machine has no mps device"):
        _select_device("mps", 0)
    assert _select_device("cpu", 0) == torch.device("cpu")


def test_a_device_of_another_kind_is_checked_as_clip_load_checks_it_and_refused_where_torch_cannot_tell(
    monkeypatch,
):
    # clip.load's check (clip.device_names): an index past the devices this process sees was not checked for kinds
    # other than CUDA, and failed at the first tensor moved there
    from clip.device_names import DeviceNotAvailableError, available_device
    from clip.distributed import DeviceUnavailable, _select_device

    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    monkeypatch.setattr(torch.xpu, "device_count", lambda: 1)
    with pytest.raises(DeviceUnavailable, match=r"train.device = 'xpu:1', but this process sees 1 xpu device\(s\)"):
        _select_device("xpu:1", 0)
    assert _select_device("xpu", 0) == torch.device("xpu")
    # A kind torch cannot ask about (torch_xla's): clip.load leaves it to the plugin, training refuses it
    assert available_device("xla", "") == torch.device("xla")
    with pytest.raises(DeviceUnavailable, match=r"train.device = 'xla', but training runs on devices torch can "
                                                r"check for here .*no torch.xla.is_available") as refused:
        _select_device("xla", 0)
    assert isinstance(refused.value, DeviceNotAvailableError)  # one type to catch for clip.load's and training's


def test_srun_preserve_env_without_a_job_task_count_is_still_a_slurm_step():
    # sbatch sets SLURM_NTASKS only when given a task count, and srun --preserve-env keeps the batch environment:
    # every task ran as a single process of its own, all writing to one output_dir
    environ = {"SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4", "SLURM_LOCALID": "3",
               "SLURM_STEP_NODELIST": "gpu[001-002]", "SLURM_JOB_ID": "7"}
    launch = read_launcher_environment(environ)
    assert (launch.launcher, launch.rank, launch.world_size, launch.master_addr) == ("slurm", 3, 4, "gpu001")


def test_rank_0_not_on_the_first_host_of_the_step_is_an_error_not_a_wait():
    # A heterogeneous step (srun ... : ...) has the components' nodes in one node list that Slurm sorts by name:
    # task 0 of component 0 on gpu-b01 is not on its first host, where every rank looked for it until the timeout
    environ = {"SLURM_PROCID": "0", "SLURM_NTASKS": "3", "SLURM_STEP_NUM_TASKS": "3", "SLURM_JOB_ID": "7",
               "SLURM_STEP_NODELIST": "gpu-a[01-02],gpu-b01", "SLURM_JOB_NODELIST": "gpu-a[01-02],gpu-b01",
               "SLURMD_NODENAME": "gpu-b01"}
    with pytest.raises(RuntimeError, match="rank 0 on gpu-b01, not on gpu-a01.*export MASTER_ADDR"):
        read_launcher_environment(environ)
    assert read_launcher_environment({**environ, "MASTER_ADDR": "gpu-b01"}).master_addr == "gpu-b01"
    # without SLURM_GTIDS the other ranks cannot tell; rank 0 on the first host is the usual case
    assert read_launcher_environment({**environ, "SLURM_PROCID": "1"}).master_addr == "gpu-a01"
    assert read_launcher_environment({**environ, "SLURMD_NODENAME": "gpu-a01"}).master_addr == "gpu-a01"


def test_the_ranks_beside_rank_0_and_on_the_first_host_see_it_elsewhere_too():
    # A heterogeneous step whose component 0 (ranks 0-1) runs on gpu-b01 and component 1 (ranks 2-5) on gpu-a[01-02]:
    # rank 0 failed, and the other ranks waited out the 30-minute rendezvous under a bare srun. SLURM_GTIDS names the
    # step's ranks on each task's node.
    step = {"SLURM_NTASKS": "6", "SLURM_STEP_NUM_TASKS": "6", "SLURM_JOB_ID": "7",
            "SLURM_STEP_NODELIST": "gpu-a[01-02],gpu-b01", "SLURM_STEP_TASKS_PER_NODE": "2(x3)"}

    def task(rank, node, ranks_here):
        return {**step, "SLURM_PROCID": str(rank), "SLURMD_NODENAME": node, "SLURM_GTIDS": ranks_here}

    with pytest.raises(RuntimeError, match=r"ranks 2,3 \(SLURM_GTIDS\) on gpu-a01 and rank 0 elsewhere.*MASTER_ADDR"):
        read_launcher_environment(task(3, "gpu-a01", "2,3"))  # on the first host, which lacks rank 0
    with pytest.raises(RuntimeError, match="rank 0 on gpu-b01, not on gpu-a01.*MASTER_ADDR"):
        read_launcher_environment(task(1, "gpu-b01", "0,1"))  # beside rank 0
    # gpu-a02's ranks cannot tell where rank 0 runs: SLURM_GTIDS names only this node's ranks
    assert read_launcher_environment(task(5, "gpu-a02", "4,5")).master_addr == "gpu-a01"
    assert read_launcher_environment({**task(3, "gpu-a01", "2,3"), "MASTER_ADDR": "gpu-b01"}).master_addr == "gpu-b01"
    # the usual layout: rank 0 on the first host, beside rank 1
    assert read_launcher_environment(task(1, "gpu-a01", "0,1")).master_addr == "gpu-a01"
    # a SLURM_GTIDS that does not list the task's own rank is not this step's (left by a wrapper): it tells nothing
    assert read_launcher_environment(task(3, "gpu-a01", "0")).master_addr == "gpu-a01"
    assert read_launcher_environment(task(5, "gpu-b01", "0")).master_addr == "gpu-a01"


@pytest.mark.parametrize("environ, named", [
    ({"SLURM_PROCID": "first", "SLURM_NTASKS": "2", "MASTER_ADDR": "n1"}, "SLURM_PROCID='first'"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "", "MASTER_ADDR": "n1"}, "SLURM_NTASKS=''"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "a", "MASTER_PORT": "29500x"},
     "MASTER_PORT='29500x'"),
])
def test_a_launcher_variable_that_is_no_number_is_named(environ, named):
    # The one error line read "invalid literal for int() with base 10: 'first'", naming no variable
    with pytest.raises(RuntimeError, match=f"cannot read the launcher's variables: {named} is not a whole number"):
        read_launcher_environment(environ)


def test_the_pure_helpers_of_clip_distributed(monkeypatch):
    import clip.distributed
    from clip.device_names import device_kind_available
    from clip.distributed import StepAgreement, agreement_flags, raise_on_every_rank, ranks_phrase

    assert [ranks_phrase(1), ranks_phrase(4), ranks_phrase(4, all_of=True), ranks_phrase(1, all_of=True)] == [
        "1 rank", "4 ranks", "all 4 ranks", "1 rank"]
    cpu = torch.device("cpu")
    assert not DistributedInfo(rank=1, world_size=2, local_rank=1, device=cpu).is_main
    # a device kind whose module says it is unavailable is not; one that this torch cannot ask about is unknown
    monkeypatch.setattr(torch, "clip_test_kind", SimpleNamespace(is_available=lambda: False), raising=False)
    assert device_kind_available("clip_test_kind") is False and device_kind_available("no_such_kind") is None
    # one process: its own verdict, stop included
    one = DistributedInfo(rank=0, world_size=1, local_rank=0, device=cpu)
    verdict = StepAgreement.read(agreement_flags(torch.tensor(True), torch.tensor(float("inf")), True, one))
    assert (verdict.losses_finite, verdict.gradients_finite, verdict.stop) == (True, False, True)
    assert not StepAgreement.read(agreement_flags(torch.tensor(True), None, False, one)).stop
    # a rank's own failure is raised there, and `elsewhere` on the ranks that did not fail
    with pytest.raises(KeyError):
        raise_on_every_rank(KeyError("here"), one, ValueError("elsewhere"))
    raise_on_every_rank(None, one, ValueError("elsewhere"))
    monkeypatch.setattr(clip.distributed, "any_rank", lambda flag, dist_info: True)  # some rank failed
    monkeypatch.setattr(clip.distributed, "from_rank_zero", lambda value, dist_info: None)  # rank 0 did not
    two = DistributedInfo(rank=1, world_size=2, local_rank=1, device=cpu)
    with pytest.raises(KeyError):
        raise_on_every_rank(KeyError("here"), two, ValueError("elsewhere"))
    with pytest.raises(ValueError, match="elsewhere"):
        raise_on_every_rank(None, two, ValueError("elsewhere"))


def test_auto_picks_this_ranks_gpu_where_cuda_is_available(monkeypatch):
    from clip.distributed import _select_device

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert _select_device("auto", 1) == torch.device("cuda", 1) and chosen == [torch.device("cuda", 1)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _select_device("auto", 1) == torch.device("cpu")


@pytest.mark.parametrize("master_addr, init_method", [("10.0.0.5", "tcp://10.0.0.5:4000"),
                                                      ("fd00::5", "tcp://[fd00::5]:4000")])
def test_the_process_group_is_joined_where_the_launcher_says(monkeypatch, master_addr, init_method):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    joined = []
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: joined.append(kwargs))
    launcher = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": master_addr, "MASTER_PORT": "4000"}
    for name, value in launcher.items():
        monkeypatch.setenv(name, value)
    info = init_distributed(device="cpu")
    assert info == DistributedInfo(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    assert [(kw["init_method"], kw["rank"], kw["world_size"], kw["backend"]) for kw in joined] == [
        (init_method, 1, 2, "gloo")]
    # a world of one joins no group, and keeps the launcher's local rank
    joined.clear()
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    assert init_distributed(device="cpu") == DistributedInfo(rank=0, world_size=1, local_rank=1,
                                                             device=torch.device("cpu"))
    assert joined == []

    # A torch built without distributed support has no is_initialized: said so, not an AttributeError
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="ask for 2 processes, but this torch build has no distributed support"):
        init_distributed(device="cpu")


def test_gpu_of_a_local_rank():
    from clip.distributed import _local_gpu_index

    assert [_local_gpu_index(rank, 8) for rank in (0, 3, 7)] == [0, 3, 7]  # every GPU visible to each rank
    assert _local_gpu_index(5, 1) == 0  # SLURM --gpus-per-task=1: each rank sees only its own
    with pytest.raises(RuntimeError, match="local rank 4 but this process sees 4 GPUs"):
        _local_gpu_index(4, 4)


def test_no_launcher_means_one_process(monkeypatch):
    assert read_launcher_environment({"PATH": "/bin"}) is None
    with pytest.raises(RuntimeError, match="LOCAL_RANK"):
        read_launcher_environment({"RANK": "0", "WORLD_SIZE": "2"})
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    info = init_distributed(device="cpu")
    assert info == DistributedInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert info.is_main and not info.is_distributed and not dist.is_initialized()
    features = torch.randn(3, 2)
    assert gather_features(features) is features


def test_ranks_wait_for_each_other_longer_than_nccls_default(monkeypatch):
    # NCCL's 10 minutes ended healthy runs whose rank 0 alone was downloading the initial weights.
    from datetime import timedelta

    from clip import distributed

    joined = {}
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kwargs: joined.update(kwargs))
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    info = init_distributed(device="cpu")
    assert (info.rank, info.world_size) == (1, 2)
    assert joined["timeout"] == distributed.COLLECTIVE_TIMEOUT == timedelta(minutes=30)
    assert joined["backend"] == "gloo" and joined["init_method"] == "tcp://127.0.0.1:29500"


def test_rank_0_says_where_and_for_how_many_ranks_it_waits_before_the_rendezvous(monkeypatch, caplog):
    # python run by hand in an sbatch script has SLURM_PROCID=0 and the job's SLURM_NTASKS, and no other task:
    # rank 0 waited out the rendezvous timeout without a word
    from clip import distributed

    monkeypatch.setattr(distributed.dist, "init_process_group", lambda **kwargs: None)
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in {"SLURM_PROCID": "0", "SLURM_NTASKS": "256", "SLURM_JOB_NODELIST": "node[07-38]",
                        "SLURM_JOB_ID": "0"}.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level("INFO", logger="clip.distributed"):
        init_distributed(device="cpu")
    (said,) = caplog.records  # a warning, saying why it may wait for nothing
    assert said.levelname == "WARNING" and said.message.startswith(
        "rank 0 of 256 (slurm's variables): waiting at node07:29500 for the other ranks to join (at most 30 minutes); "
        "SLURM_STEP_NUM_TASKS is not set, as in the batch script itself rather than in a task of srun")
    caplog.clear()
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "256")  # a task of srun's
    with caplog.at_level("INFO", logger="clip.distributed"):
        init_distributed(device="cpu")
    assert [(record.levelname, record.message) for record in caplog.records] == [
        ("INFO", "rank 0 of 256 (slurm's variables): waiting at node07:29500 for the other ranks to join (at most 30 "
                 "minutes)")]
    caplog.clear()
    monkeypatch.setenv("SLURM_PROCID", "1")
    with caplog.at_level("INFO", logger="clip.distributed"):
        init_distributed(device="cpu")
    assert caplog.messages == []  # the others say nothing: hundreds of lines in a large job


def test_a_port_another_program_listens_at_is_one_error_naming_master_port(monkeypatch):
    # torch's DistNetworkError traceback (EADDRINUSE) named the port but not what sets it: two SLURM jobs on one
    # node can be given the same default port
    from clip import distributed

    def port_taken(**kwargs):
        raise dist.DistNetworkError("The server socket has failed to listen on any local network address. port: "
                                    "29742, useIpv6: false, code: -98, name: EADDRINUSE, message: address already in use")

    monkeypatch.setattr(distributed.dist, "init_process_group", port_taken)
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29742"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(distributed.RendezvousPortInUse, match=r"^rank 0 cannot wait for the other ranks at port 29742 "
                                                               r"of 127\.0\.0\.1: .* MASTER_PORT exported before srun"):
        init_distributed(device="cpu")

    def port_taken_said_the_older_way(**kwargs):  # torch's TCPStore without libuv (USE_LIBUV=0)
        raise dist.DistNetworkError("The server socket has failed to bind to [::]:29742 (errno: 98 - Address already "
                                    "in use).")

    monkeypatch.setattr(distributed.dist, "init_process_group", port_taken_said_the_older_way)
    with pytest.raises(distributed.RendezvousPortInUse, match="MASTER_PORT exported before srun"):
        init_distributed(device="cpu")

    def unreachable(**kwargs):
        raise dist.DistNetworkError("connection refused")

    monkeypatch.setattr(distributed.dist, "init_process_group", unreachable)
    with pytest.raises(dist.DistNetworkError, match="^connection refused$"):  # other network errors: torch's own
        init_distributed(device="cpu")


class TinyTwoTower(nn.Module):
    """Two linear encoders with CLIP's or SigLIP's logit parameters."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image_encoder = nn.Linear(6, 8)
        self.text_encoder = nn.Linear(5, 8)
        siglip = kind == "siglip"
        self.logit_scale = nn.Parameter(torch.tensor(SIGLIP_INITIAL_LOGIT_SCALE if siglip else math.log(1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(SIGLIP_INITIAL_LOGIT_BIAS)) if siglip else None

    def forward(self, images, texts):
        return self.image_encoder(images), self.text_encoder(texts), self.logit_scale, self.logit_bias


def reference_on_concatenated_batch(kind, chunk_size, images, texts):
    model = TinyTwoTower(kind)
    loss, metrics = ContrastiveLoss(kind, chunk_size=chunk_size)(*model(images, texts))
    loss.backward()
    return metrics, {name: p.grad for name, p in model.named_parameters()}


def check_against_reference(ddp_model, metrics, reference, case):
    reference_metrics, reference_grads = reference
    for name in reference_metrics:
        torch.testing.assert_close(metrics[name], reference_metrics[name], **TOLERANCE, msg=f"{case}: {name}")
    for name, parameter in ddp_model.module.named_parameters():
        torch.testing.assert_close(parameter.grad, reference_grads[name], **TOLERANCE, msg=f"{case}: {name}")


def worker(rank: int, port: int) -> None:
    import os

    for name in LAUNCHER_VARIABLES:
        os.environ.pop(name, None)
    # Launched as SLURM would: the master address comes from the node list, the port from MASTER_PORT.
    os.environ.update({"SLURM_PROCID": str(rank), "SLURM_NTASKS": str(WORLD_SIZE), "SLURM_LOCALID": str(rank),
                       "SLURM_JOB_NODELIST": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    info = init_distributed(device="cpu")
    try:
        assert (info.rank, info.world_size, info.is_distributed) == (rank, WORLD_SIZE, True)
        assert dist.get_backend() == "gloo"
        generator = torch.Generator().manual_seed(1)
        images = torch.randn(WORLD_SIZE * ROWS_PER_RANK, 6, generator=generator)
        texts = torch.randn(WORLD_SIZE * ROWS_PER_RANK, 5, generator=generator)
        local = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)

        for kind, chunk_size in [("clip", None), ("clip", 3), ("siglip", None)]:
            reference = reference_on_concatenated_batch(kind, chunk_size, images, texts)
            loss_fn = ContrastiveLoss(kind, chunk_size=chunk_size, distributed=True)

            ddp_model = DistributedDataParallel(TinyTwoTower(kind))
            loss, metrics = loss_fn(*ddp_model(images[local], texts[local]))
            loss.backward()
            check_against_reference(ddp_model, metrics, reference, f"{kind} chunk={chunk_size}")

            # The training loop's accumulation recipe: 2 micro-batches of 2 rows per rank.
            ddp_model = DistributedDataParallel(TinyTwoTower(kind))
            with torch.no_grad():
                cached_images, cached_texts, _, _ = ddp_model(images[local], texts[local])
            micro_images, micro_texts = images[local].chunk(2), texts[local].chunk(2)
            for index in range(2):
                last = index == 1
                ddp_model.require_backward_grad_sync = last  # what no_sync() toggles
                image_features, text_features, logit_scale, logit_bias = ddp_model(micro_images[index], micro_texts[index])
                loss, metrics = contrastive_loss_with_cached_features(
                    loss_fn, cached_images, cached_texts, image_features, text_features, index, logit_scale, logit_bias
                )
                loss.backward()
            check_against_reference(ddp_model, metrics, reference, f"{kind} chunk={chunk_size} cached")

            # The random model's accuracies are 1/8 both ways; these features have a pair found in some rows
            # of each rank, and more often text->image than image->text, so accuracy counted against the
            # wrong rank's columns, or the two directions swapped, differs from the concatenated batch.
            features_generator = torch.Generator().manual_seed(2)
            features = torch.randn(WORLD_SIZE * ROWS_PER_RANK, 8, generator=features_generator)
            noisy = features + torch.randn(features.shape, generator=features_generator)
            scale_and_bias = (torch.tensor(2.0), torch.tensor(-1.0) if kind == "siglip" else None)
            _, reference_metrics = ContrastiveLoss(kind, chunk_size=chunk_size)(features, noisy, *scale_and_bias)
            assert reference_metrics["image_to_text_accuracy"].item() == 0.75
            if kind == "clip":
                assert reference_metrics["text_to_image_accuracy"].item() == 0.875
            _, metrics = loss_fn(features[local], noisy[local], *scale_and_bias)
            for name in reference_metrics:
                torch.testing.assert_close(metrics[name], reference_metrics[name], **TOLERANCE,
                                           msg=f"{kind} chunk={chunk_size} features: {name}")

            # A loss built without distributed=True (say, for one rank's own evaluation) reports this rank's
            # rows alone, in a distributed run too: its metrics are not averaged with the other ranks'
            _, own_metrics = ContrastiveLoss(kind, chunk_size=chunk_size)(features[local], noisy[local], *scale_and_bias)
            unit = nn.functional.normalize
            own_scores = unit(features[local], dim=-1) @ unit(noisy[local], dim=-1).t()
            own_accuracy = (own_scores.argmax(dim=1) == torch.arange(ROWS_PER_RANK)).float().mean()
            assert own_metrics["image_to_text_accuracy"].item() == own_accuracy.item(), (rank, kind, chunk_size)
    finally:
        cleanup_distributed()


def test_two_gloo_processes_match_one_process_on_the_concatenated_batch():
    spawn_ranks(worker, (free_port(),), nprocs=WORLD_SIZE)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_a_subgroup_places_this_ranks_rows_by_its_rank_in_the_group_and_averages_over_its_size(monkeypatch, kind):
    # The losses take a process group; this rank is member 1 of a subgroup of 2 and rank 5 of 8 in the world. Its
    # rows are rows 3..5 of the subgroup's gathered batch: by its global rank they would be matched with columns
    # that do not exist (CLIP) or with none (SigLIP's diagonal off the matrix), and its logged metrics divided by 8.
    import torch.nn.functional as F

    import clip.loss as loss_module

    subgroup = object()
    torch.manual_seed(0)
    images, texts = torch.randn(6, 8), torch.randn(6, 8)
    mine = slice(3, 6)

    def gather(features, group):  # the subgroup's batch: member 0's rows, then this rank's
        assert group is subgroup
        full = images if torch.allclose(features, F.normalize(images[mine], dim=-1)) else texts
        return torch.cat([F.normalize(full[:3], dim=-1), features])

    monkeypatch.setattr(loss_module, "gather_features", gather)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1 if group is subgroup else 5)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2 if group is subgroup else 8)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, op=None, group=None: tensor.mul_(2))  # two alike members
    scale, bias = torch.tensor(math.log(10.0)), torch.tensor(-2.0)
    loss, metrics = ContrastiveLoss(kind, distributed=True, group=subgroup)(
        images[mine], texts[mine], scale, bias if kind == "siglip" else None)
    all_images, all_texts = F.normalize(images, dim=-1), F.normalize(texts, dim=-1)
    labels = torch.arange(3, 6)
    if kind == "clip":
        expected = (F.cross_entropy(10 * all_images[mine] @ all_texts.t(), labels)
                    + F.cross_entropy(10 * all_texts[mine] @ all_images.t(), labels)) / 2
    else:
        logits = 10 * all_images[mine] @ all_texts.t() - 2
        signs = -torch.ones_like(logits)
        signs[torch.arange(3), labels] = 1
        expected = -F.logsigmoid(signs * logits).sum() / 3
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(metrics["loss"], expected)  # summed over the subgroup's 2, divided by 2


@pytest.mark.parametrize(("changed", "said"), [
    ({"MASTER_PORT": "99999"}, "MASTER_PORT=99999 is no TCP port (1 to 65535)"),
    ({"MASTER_PORT": "0"}, "MASTER_PORT=0 is no TCP port"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 is no number of processes (at least 1)"),
    ({"RANK": "-1"}, "RANK=-1 is not a rank of 2 processes (0 to 1, from WORLD_SIZE)"),
    ({"RANK": "2"}, "RANK=2 is not a rank of 2 processes"),
    ({"LOCAL_RANK": "-1"}, "LOCAL_RANK=-1 is negative"),
])
def test_launcher_numbers_that_make_no_process_group_are_refused_naming_the_variable(changed, said):
    # torch's own errors: a traceback ("Port out of range" for `export MASTER_PORT=$((29500 + SLURM_JOB_ID))`,
    # "TCPStore world size cannot be 0"), "rank parameter missing" for a negative rank, and for a rank beyond the
    # world a 30-minute wait
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    with pytest.raises(RuntimeError, match="^the launcher's variables make no process group: " + re.escape(said)):
        read_launcher_environment({**torchrun, **changed})
    assert read_launcher_environment(torchrun).rank == 1


def test_slurm_numbers_that_make_no_process_group_are_refused_naming_slurm_s_variables():
    task = {"SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "gpu[1-2]"}
    with pytest.raises(RuntimeError, match=re.escape("SLURM_PROCID=2 is not a rank of 2 processes (0 to 1, from "
                                                     "SLURM_STEP_NUM_TASKS)")):
        read_launcher_environment(task)
    with pytest.raises(RuntimeError, match=re.escape("SLURM_STEP_NUM_TASKS=0 is no number of processes")):
        read_launcher_environment({**task, "SLURM_STEP_NUM_TASKS": "0"})
    with pytest.raises(RuntimeError, match=re.escape("MASTER_PORT=70000 is no TCP port")):
        read_launcher_environment({**task, "SLURM_PROCID": "1", "MASTER_PORT": "70000"})
