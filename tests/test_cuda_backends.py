"""The CUDA math switches a run sets, and the peak throughput its MFU is measured against."""

from __future__ import annotations

import contextlib

import pytest
import torch

from clip.config import TrainLoopConfig
from clip.cuda_backends import configure_cuda_backends, has_precision_api, ieee_float32_matmul
from clip.run_start import configure_process
from clip.throughput import peak_flops


def tf32_switches() -> tuple[bool, bool]:
    """(matmul, convolution) TF32 as they stand, read through the older getters (which torch.compile's
    inductor reads; they raise once the two APIs were mixed) and, where torch has them, the per-backend ones,
    which must agree."""
    switches = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    assert (torch.get_float32_matmul_precision() != "highest") == switches[0]
    if has_precision_api():
        assert (torch.backends.cuda.matmul.fp32_precision == "tf32",
                torch.backends.cudnn.conv.fp32_precision == "tf32") == switches
    return switches


def per_backend_matmul() -> dict[str, str]:
    """torch >= 2.9's per-backend float32 matmul switches (CUDA's, the CPU's), empty before."""
    if not has_precision_api():
        return {}
    return {"cuda": torch.backends.cuda.matmul.fp32_precision, "cpu": torch.backends.mkldnn.matmul.fp32_precision}


def per_backend_switches() -> list[tuple[object, str]]:
    """(switch object, value) of every per-backend fp32_precision switch a test may write, the generic one first."""
    if not has_precision_api():
        return []
    backends = torch.backends
    objects = [backends, backends.cuda.matmul, backends.mkldnn.matmul, backends.cudnn.conv,
               *([backends.cudnn.rnn] if hasattr(backends.cudnn, "rnn") else [])]
    return [(switch, switch.fp32_precision) for switch in objects]


@pytest.fixture()
def restore_backends():
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    switches = per_backend_switches()
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1:]
    for switch, value in switches:
        if switch.fp32_precision != value:
            switch.fp32_precision = value


@pytest.mark.parametrize("allow_tf32", [True, False])
def test_configure_sets_tf32_both_ways_and_autotunes_convolutions(restore_backends, allow_tf32):
    configure_cuda_backends(allow_tf32=not allow_tf32)
    torch.backends.cudnn.benchmark = False
    configure_cuda_backends(allow_tf32=allow_tf32)
    assert tf32_switches() == (allow_tf32, allow_tf32)
    assert torch.backends.cudnn.benchmark is True


@pytest.mark.skipif(not has_precision_api(), reason="torch < 2.9 has only the whole-process switches")
@pytest.mark.parametrize("allow_tf32", [True, False])
def test_every_getter_reads_after_configure_also_when_a_script_used_the_per_backend_switches(
    restore_backends, allow_tf32
):
    # The trainer wrote the per-backend switches: the older getters then raised, and torch.compile's inductor
    # reads them (torch 2.9 to 2.13 on every CUDA compile: "mix of the legacy and new APIs").
    torch.backends.cuda.matmul.fp32_precision = "ieee" if allow_tf32 else "tf32"  # a script's own choice
    torch.backends.cudnn.conv.fp32_precision = "ieee" if allow_tf32 else "tf32"
    configure_cuda_backends(allow_tf32=allow_tf32)
    assert tf32_switches() == (allow_tf32, allow_tf32)  # raises if any getter does
    with ieee_float32_matmul():
        assert tf32_switches()[0] is False
    assert tf32_switches() == (allow_tf32, allow_tf32)


@pytest.mark.skipif(not has_precision_api(), reason="torch < 2.9 has only the whole-process switches")
def test_ieee_blocks_restore_a_precision_chosen_through_the_per_backend_switch(restore_backends):
    # After such a write the whole-process getter still names the value from before it.
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    with ieee_float32_matmul():
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"


@pytest.mark.skipif(not has_precision_api(), reason="torch < 2.9 has only the whole-process switches")
@pytest.mark.parametrize("choice", ["cpu_bf16", "medium", "cuda_tf32"])
def test_ieee_blocks_put_every_switch_back_and_never_raise(restore_backends, choice):
    # A CPU user's bf16 matmuls (oneDNN's switch, set through the per-backend API) made the block raise on
    # reading the whole-process value; "medium" came back as "high" (the CPU switch from bf16 to TF32).
    if choice == "cpu_bf16":
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    elif choice == "medium":
        torch.set_float32_matmul_precision("medium")
    else:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    before = per_backend_matmul()
    with ieee_float32_matmul():
        assert per_backend_matmul() == {"cuda": "ieee", "cpu": "ieee"}
    assert per_backend_matmul() == before


@pytest.mark.skipif(not has_precision_api(), reason="torch < 2.9 has only the whole-process switches")
@pytest.mark.parametrize("cpu", ["none", "ieee"])
def test_tf32_for_cuda_leaves_an_unset_or_full_precision_cpu_matmul_switch(restore_backends, cpu):
    # torch's whole-process setter also turns the CPU's (oneDNN) float32 matmuls to TF32
    if cpu != "none":
        torch.backends.mkldnn.matmul.fp32_precision = cpu
    configure_cuda_backends(allow_tf32=True)
    assert torch.backends.mkldnn.matmul.fp32_precision == cpu
    assert tf32_switches() == (True, True)  # and every getter reads


@pytest.mark.skipif(not has_precision_api(), reason="torch < 2.9 has only the whole-process switches")
def test_tf32_off_holds_for_convolutions_after_a_script_chose_tf32_for_every_backend(restore_backends):
    # cudnn.allow_tf32 = False writes "none" to cuDNN's switch, which then inherited the generic "tf32": the
    # convolutions stayed TF32, and reading cudnn.allow_tf32 (inductor does) raised.
    torch.backends.fp32_precision = "tf32"
    configure_cuda_backends(allow_tf32=False)
    assert tf32_switches() == (False, False)


def test_retrieval_scores_run_in_ieee_float32_inside_a_tf32_run(restore_backends, monkeypatch):
    # Retrieval compares its score blocks (matmuls) with exactly computed true-pair scores: TF32's error in
    # the blocks would reorder near ties under train.tf32 = true.
    from clip.evaluation import retrieval

    configure_cuda_backends(allow_tf32=True)
    seen = []
    with ieee_float32_matmul():
        seen.append(tf32_switches()[0])
        with pytest.raises(KeyError), ieee_float32_matmul():
            raise KeyError  # restored also when the block fails
        seen.append(tf32_switches()[0])
    assert seen == [False, False] and tf32_switches() == (True, True)

    real_matmul = torch.Tensor.__matmul__

    def recording_matmul(left, right):
        seen.append(tf32_switches()[0])
        return real_matmul(left, right)

    seen.clear()
    monkeypatch.setattr(torch.Tensor, "__matmul__", recording_matmul)
    features = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    retrieval.retrieval_ranks(features, features, torch.arange(4), chunk_size=2)
    assert seen == [False] * 4 and tf32_switches() == (True, True)


def test_zeroshot_scores_run_in_ieee_float32_inside_a_tf32_run(restore_backends, monkeypatch):
    # As retrieval's: under train.tf32 = true the class scores of evaluation during training were TF32 products,
    # and could rank near-tied classes otherwise than clip-zeroshot on the same checkpoint.
    from clip.evaluation.zeroshot import evaluate_zeroshot, zeroshot_classify

    class PassThrough(torch.nn.Module):  # images are their own features; no matmul of its own
        def encode_image(self, images: torch.Tensor) -> torch.Tensor:
            return images

    configure_cuda_backends(allow_tf32=True)
    real_matmul = torch.Tensor.__matmul__
    seen = []

    def recording_matmul(left, right):
        seen.append(tf32_switches()[0])
        return real_matmul(left, right)

    monkeypatch.setattr(torch.Tensor, "__matmul__", recording_matmul)
    images, classifier = torch.eye(4, 3), torch.eye(3)
    zeroshot_classify(PassThrough(), classifier, images, device="cpu", batch_size=2)
    evaluate_zeroshot(PassThrough(), list(zip(images, [0, 1, 2, 0], strict=True)), ["a", "b", "c"],
                      classifier=classifier, device="cpu", batch_size=2)
    assert seen == [False] * 4 and tf32_switches() == (True, True)


def test_peak_flops_follows_dtype_and_tf32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    cuda = torch.device("cuda")
    assert peak_flops(cuda, torch.bfloat16) == 989e12
    assert peak_flops(cuda, torch.float32) == 67e12  # plain IEEE fp32
    assert peak_flops(cuda, torch.float32, tf32=True) == 494e12
    assert peak_flops(cuda, torch.bfloat16, tf32=True) == 989e12  # tf32 changes float32 work only
    assert peak_flops(torch.device("cpu"), torch.float32) is None
    assert peak_flops(torch.device("mps"), torch.float32) is None  # not a CUDA device: no CUDA name to ask for
    assert peak_flops(cuda, torch.float64) is None  # no tensor-core peak: not float32's
    assert peak_flops(cuda, torch.float16) == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_flops(cuda, torch.bfloat16) == 756e12 and peak_flops(cuda, torch.float32, tf32=True) == 378e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")  # SXM
    assert peak_flops(cuda, torch.bfloat16) == 989e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200 NVL")
    assert peak_flops(cuda, torch.bfloat16) == 835e12
    # Whole model names: "A100" is also in the name of the RTX A1000, which an A100's peak made read ~10x too low
    for name, bf16_peak in [("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100 80GB PCIe", 312e12),
                            ("NVIDIA RTX A1000", None), ("NVIDIA RTX A1000 6GB Laptop GPU", None),
                            ("NVIDIA GH200 480GB", 989e12)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
        assert peak_flops(cuda, torch.bfloat16) == bf16_peak, name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert peak_flops(cuda, torch.bfloat16) is None and peak_flops(cuda, torch.float32, tf32=True) is None


def test_every_card_of_the_peak_table_is_found_by_its_own_name_with_the_data_sheets_ratios(monkeypatch):
    # A name that contains another's ("H100 NVL", "H100") must come first, or the card takes the other's peak: an
    # H100 NVL read as an SXM H100 overstates its peak by 18% and understates its MFU as much
    from clip.throughput import PEAK_FLOPS_BY_DEVICE, _BF16

    cuda = torch.device("cuda")
    for model_name, peaks in PEAK_FLOPS_BY_DEVICE:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"NVIDIA {model_name}")
        assert peak_flops(cuda, torch.bfloat16) == peaks[_BF16], model_name
        assert peak_flops(cuda, torch.float32, tf32=True) == peaks["tf32"], model_name
        # The dense figures of every listed card: TF32 at half the 16-bit rate, plain float32 at 1/10 to 1/20 of it
        assert peaks["tf32"] == pytest.approx(peaks[_BF16] / 2, rel=0.01), model_name
        assert 10 < peaks[_BF16] / peaks[torch.float32] < 20, model_name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 NVL")
    assert peak_flops(cuda, torch.bfloat16) == 835e12  # the NVL card's own peak, not the SXM part's


def test_tf32_is_a_config_key_that_defaults_off():
    # Off by default: under bf16 autocast it would only make the loss's float32 similarities less precise.
    from clip.config import TrainConfig, from_dict

    assert TrainConfig().train.tf32 is False
    assert from_dict(TrainConfig, {"train": {"tf32": True}}).train.tf32 is True


def every_switch() -> tuple:
    """What configure_cuda_backends may change, read without the older getters (which raise after a mix)."""
    return (torch.backends.cudnn.benchmark, *(value for _, value in per_backend_switches()))


@pytest.mark.parametrize("tf32", [True, False])
@pytest.mark.parametrize("script", ["defaults", "per_backend_tf32"])
def test_a_cuda_run_puts_every_switch_back_when_it_ends(restore_backends, tf32, script):
    # A notebook that trained on the GPU kept cuDNN autotuning on and its convolutions in IEEE float32 (torch's
    # default is TF32) for whatever it ran next
    torch.backends.cudnn.benchmark = False
    if script == "per_backend_tf32" and has_precision_api():
        torch.backends.cuda.matmul.fp32_precision = "tf32"
    before = (every_switch(), torch.backends.cudnn.allow_tf32 if script == "defaults" else None,
              torch.get_float32_matmul_precision() if script == "defaults" else None)
    with contextlib.ExitStack() as on_exit:
        configure_process(TrainLoopConfig(tf32=tf32), torch.device("cuda"), on_exit)  # only flags: no GPU needed
        assert torch.backends.cudnn.benchmark is True and tf32_switches() == (tf32, tf32)
    assert every_switch() == before[0]
    if script == "defaults":
        assert (torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()) == before[1:]
