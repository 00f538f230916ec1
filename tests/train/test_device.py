"""train.device: one field; auto takes a GPU where there is one (CUDA probes faked here)."""

import pytest
import torch

from stackrec_dist.errors import DeviceError
from stackrec_dist.train.device import DeviceChoice, resolve_cluster_device, resolve_device


def test_auto_takes_the_gpu_when_cuda_is_there():
    choice = resolve_device("auto", cuda_count=lambda: 1)
    assert choice == DeviceChoice("cuda")
    assert (choice.backend, choice.amp_dtype, choice.use_gpu) == ("nccl", torch.bfloat16, True)
    assert choice.torch_device(local_rank=3) == torch.device("cuda", 3)


def test_auto_falls_back_to_cpu():
    choice = resolve_device("auto", cuda_count=lambda: 0)
    assert choice == DeviceChoice("cpu")
    assert (choice.backend, choice.amp_dtype, choice.torch_device()) == ("gloo", None, torch.device("cpu"))
    assert "fp32" in choice.describe() and "PyTorch reference" in choice.describe()


def test_explicit_index_and_missing_devices_are_one_clear_error():
    assert resolve_device("cuda:1", cuda_count=lambda: 2).torch_device() == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="has no CUDA device"):
        resolve_device("cuda", cuda_count=lambda: 0)
    with pytest.raises(DeviceError, match="has 2 CUDA device"):
        resolve_device("cuda:5", cuda_count=lambda: 2)
    with pytest.raises(DeviceError, match="must be auto, cpu, cuda or cuda:N"):
        resolve_device("gpu0", cuda_count=lambda: 0)


def test_ray_workers_follow_the_clusters_gpus_not_the_drivers():
    assert resolve_cluster_device("auto", cluster_gpus=8) == DeviceChoice("cuda")
    assert resolve_cluster_device("auto", cluster_gpus=0) == DeviceChoice("cpu")
    assert resolve_cluster_device("cpu", cluster_gpus=8) == DeviceChoice("cpu")
    with pytest.raises(DeviceError, match="offers no GPU"):
        resolve_cluster_device("cuda", cluster_gpus=0)


def test_every_shipped_config_runs_unchanged_on_both(monkeypatch):
    """No config pins a device: CPU here, the GPU on a GPU machine."""
    from pathlib import Path

    from stackrec_dist.config import load_config

    for path in sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")):
        assert load_config(path).train.device in ("auto",), path
