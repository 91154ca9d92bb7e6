"""The CUDA path: run by `make gpu-check` on a GPU; every test skips on a CPU, saying why."""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import augment
import datasets
import probe
import synthetic
import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by make gpu-check)")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--width", "0.125", "--clip-seconds", "0.5", "--sample-rate", "8000", "--batch-size", "8",
        "--workers", "0", "--log-every", "1", "--val-every", "0", "--lr", "1e-3", "--skip-check"]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    return synthetic.make_synthetic_set(str(folder), num_files=40, seconds=1.2, sample_rate=16000, seed=1)


def test_device_resampling_matches_the_cpu():
    audio = torch.randn(6, 2, 9000) * 0.3
    rates = torch.tensor([16000, 16000, 22050, 16000, 22050, 16000])
    on_cpu = datasets.resample_batch(audio, rates, 4000, 8000)
    on_gpu = datasets.resample_batch(audio.cuda(), rates, 4000, 8000).cpu()
    assert torch.allclose(on_cpu, on_gpu, atol=1e-4)


def test_default_chain_on_the_gpu_keeps_shape_and_stays_finite():
    chain = augment.build_chain(augment.DEFAULT_AUGMENT, 1.0, 22050)
    views = torch.randn(192, 59535, device="cuda") * 0.3
    out = chain(views, torch.Generator(device="cuda").manual_seed(0))
    assert out.shape == views.shape and out.device.type == "cuda" and torch.isfinite(out).all()
    assert augment.build_chain(augment.DEFAULT_AUGMENT, 0.0, 22050)(views).equal(views)


@pytest.mark.parametrize("extra", [[], ["--compile"], ["--precision", "fp16"], ["--activation-checkpointing"]])
def test_training_on_the_gpu_runs_bf16_with_device_augmentation(tiny_set, tmp_path, extra):
    result = train.main(TINY + ["--train-csv", tiny_set, "--out", str(tmp_path / "run"), "--steps", "4",
                                "--resample-on", "device", "--augment-on", "device"] + extra)
    values = [loss for _, loss in result["losses"]]
    assert len(values) == 4 and np.isfinite(values).all()


def count_syncs(argv):
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train.main(argv)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def test_no_host_device_sync_on_non_logging_steps(tiny_set, tmp_path):
    common = TINY + ["--train-csv", tiny_set, "--log-every", "1000", "--save-every", "1000"]
    short = count_syncs(common + ["--steps", "3", "--out", str(tmp_path / "short")])
    long = count_syncs(common + ["--steps", "9", "--out", str(tmp_path / "long")])
    assert long == short, f"{(long - short) / 6:.1f} host-device syncs per step"


def test_torchrun_nccl_with_sync_batch_norm(tiny_set, tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
               *TINY, "--train-csv", tiny_set, "--steps", "3", "--sync-bn", "--out", str(tmp_path / "nccl")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_probe_on_the_gpu(tiny_set, tmp_path):
    out = str(tmp_path / "run")
    train.main(TINY + ["--train-csv", tiny_set, "--out", out, "--steps", "3"])
    results = probe.main(["--checkpoint", out, "--csv", tiny_set, "--label-column", "timbre", "--max-epochs", "3",
                          "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "probe.json")])
    assert results and results[0]["tracks"]["test"] > 0
