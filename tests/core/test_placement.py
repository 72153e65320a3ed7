"""The per-stage device decision (auditml_core.placement), with CUDA faked present: it runs on any CPU machine."""

import pytest
import torch
from torch import nn

from auditml_core import models, placement
from auditml_core.errors import ConfigError
from auditml_core.runtime import Runtime


def test_forward_macs_counts_conv_and_linear_by_hand():
    model = models.build_cnn(input_shape=(1, 8, 8), n_classes=10, channels=(4,), hidden=6)
    # conv 1->4, 3x3, padded: 8*8*4 outputs x 9; pool to 4x4; linear 64->6; head 6->10
    expected = 8 * 8 * 4 * 9 + 64 * 6 + 6 * 10
    assert placement.forward_macs(model, (1, 8, 8)) == expected
    assert placement.forward_macs(nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 1)), (5,)) == 15 + 3


def test_explicit_choices_are_honoured_and_cuda_without_a_device_is_refused():
    small = {"step_macs": 10.0, "stage_macs": 100.0}
    p = placement.choose_device("train", requested="cuda", cuda_available=True, **small)
    assert p.device == "cuda" and "explicit" in p.reason  # even for tiny work: the user said so
    p = placement.choose_device("train", requested="cpu", cuda_available=True, step_macs=1e12, stage_macs=1e15)
    assert p.device == "cpu" and "explicit" in p.reason
    with pytest.raises(ConfigError, match="no CUDA device"):
        placement.choose_device("train", requested="cuda", cuda_available=False, **small)
    with pytest.raises(ConfigError, match="auto, cpu, cuda"):
        placement.choose_device("train", requested="gpu", cuda_available=True, **small)


@pytest.mark.parametrize(
    ("step", "total", "device", "why"),
    [
        (placement.MIN_STEP_MACS / 2, placement.MIN_STAGE_MACS * 10, "cpu", "small steps"),
        (placement.MIN_STEP_MACS * 2, placement.MIN_STAGE_MACS / 2, "cpu", "little work"),
        (placement.MIN_STEP_MACS, placement.MIN_STAGE_MACS, "cuda", "large enough"),
    ],
)
def test_auto_sends_only_large_work_to_cuda(step, total, device, why):
    p = placement.choose_device("distill", requested="auto", cuda_available=True, step_macs=step, stage_macs=total)
    assert p.device == device and why in p.reason
    none = placement.choose_device("distill", requested="auto", cuda_available=False, step_macs=step, stage_macs=total)
    assert none.device == "cpu" and "no CUDA" in none.reason


def test_a_stage_without_cuda_path_stays_on_the_cpu_and_says_so():
    p = placement.choose_device(
        "explain", requested="cuda", cuda_available=True, step_macs=1e12, stage_macs=1e15, cuda_path=False
    )
    assert p.device == "cpu" and "no CUDA path" in p.reason


def test_default_digits_work_stays_on_the_cpu_and_a_large_cnn_goes_to_cuda(monkeypatch):
    """The issue's two H200 anchors, through the whole rule with ``torch.cuda.is_available`` faked."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def digits_cnn():
        return models.build_cnn(input_shape=(1, 8, 8), n_classes=10, channels=(32, 64), hidden=64)

    def cnn_28():
        return models.build_cnn(input_shape=(1, 28, 28), n_classes=10, channels=(32, 64), hidden=64)

    # the default digits CNN: batch 32, ~1.1k train+val rows, 120 epochs
    p = placement.stage_placement("train", requested="auto", work=[(digits_cnn, (1, 8, 8), 32, 1150 * 120)])
    assert p.device == "cpu", p.reason
    # 60k 28x28 images at batch 256, 5 epochs
    p = placement.stage_placement("train", requested="auto", work=[(cnn_28, (1, 28, 28), 256, 60_000 * 5)])
    assert p.device == "cuda", p.reason
    assert p.record()["stage"] == "train" and p.record()["requested"] == "auto"


def test_counting_the_work_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    placement.stage_placement(
        "evaluate", requested="auto", work=[(lambda: nn.Linear(4, 2), (4,), 8, 8)], cuda_available=False
    )
    assert torch.equal(torch.rand(3), expected)


def test_runtime_keeps_the_record_for_the_manifest():
    rt = Runtime()
    rt.record_placement(placement.choose_device("audit", requested="auto", step_macs=1, stage_macs=1))
    assert rt.placement is not None and rt.placement["stage"] == "audit" and rt.placement["device"] == "cpu"
