"""``precision: auto`` is chosen by timing this model's step, never by CPU flags; cached per machine."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from ssl_em.utils.precision import measure_module_precision, resolve_precision, time_step

REPO = Path(__file__).resolve().parents[1]


class FakeClock:
    """``time.perf_counter`` for the measuring code, advanced only by the scripted steps: the test compares
    the milliseconds it scripts, never how busy the machine happens to be."""

    now = 0.0

    @classmethod
    def perf_counter(cls) -> float:
        return cls.now

    @classmethod
    def install(cls) -> None:
        time.perf_counter = cls.perf_counter  # this process only (the test's, or the bf16 probe's child)


@pytest.fixture
def fake_clock(monkeypatch):
    monkeypatch.setattr(time, "perf_counter", FakeClock.perf_counter)


class ScriptedStep(torch.nn.Module):
    """A model whose training step takes ``ms[precision]`` milliseconds on the fake clock and returns
    ``loss[precision]``; under bf16 it can instead crash its process (a real SIGSEGV) or hang, as oneDNN's
    AMX bf16 kernels do for some Conv3d shapes. It is pickled into the child process that tries bf16,
    where unpickling installs the fake clock too."""

    def __init__(self, ms: dict[str, float], loss: dict[str, float] | None = None, on_bf16: str | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.ms, self.loss, self.on_bf16 = ms, loss or {"32": 1.0, "bf16": 1.0}, on_bf16

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        FakeClock.install()

    def training_loss(self, batch: dict) -> torch.Tensor:
        precision = "bf16" if torch.is_autocast_enabled("cpu") else "32"
        if precision == "bf16" and self.on_bf16 == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        if precision == "bf16" and self.on_bf16 == "hang":
            threading.Event().wait()
        if precision == "bf16" and self.on_bf16 == "raise":
            raise RuntimeError("no bf16 kernel for this op")
        FakeClock.now += self.ms[precision] / 1000
        return (self.weight * batch["raw"]).sum() * self.loss[precision]


BATCH = {"raw": torch.ones(2, 1, 4, 8, 8)}


def batch_of(n: int) -> dict:
    """A batch of ``n`` crops: the cache tells models apart by their input's shape."""
    return {"raw": torch.ones(n, 1, 4, 8, 8)}


def test_bf16_only_when_measured_faster_and_finite(tmp_path: Path, monkeypatch, fake_clock) -> None:
    monkeypatch.setenv("SSL_EM_CACHE", str(tmp_path))
    fast = measure_module_precision(ScriptedStep({"32": 60, "bf16": 5}), batch_of(1), "cpu")
    assert fast["precision"] == "bf16" and not fast["cached"]
    assert fast["ms_per_step"] == {"32": 60.0, "bf16": 5.0}  # the scripted times, here and in the bf16 child
    assert "faster" in fast["reason"]
    slow = measure_module_precision(ScriptedStep({"32": 5, "bf16": 40}), batch_of(2), "cpu")
    assert slow["precision"] == "32" and "not faster" in slow["reason"]  # an emulating CPU, or slower kernels
    assert slow["ms_per_step"] == {"32": 5.0, "bf16": 40.0}
    diverging = measure_module_precision(ScriptedStep({"32": 60, "bf16": 5}, {"32": 1.0, "bf16": math.nan}), batch_of(3),
                                         "cpu")
    assert diverging["precision"] == "32" and diverging["finite"] == {"32": True, "bf16": False}
    again = measure_module_precision(ScriptedStep({"32": 60, "bf16": 5}), batch_of(1), "cpu")
    assert again["cached"] and again["precision"] == "bf16"  # the same model and crop: from the cache
    cache = json.loads((tmp_path / "precision.json").read_text())
    assert len(cache) == 3 and all("torch" in key and key.startswith("cpu:") for key in cache)
    assert resolve_precision("auto", "cpu") == "32"  # unmeasured: never bf16 from CPU flags


def test_an_emulated_bf16_warm_up_is_not_timed_further(fake_clock) -> None:
    calls: list[str] = []

    def step(precision: str) -> float:
        calls.append(precision)
        FakeClock.now += 0.04
        return 1.0

    ms, finite = time_step(step, "bf16", "cpu", repeats=3, give_up_ms=10)
    assert calls == ["bf16"] and ms == 40.0 and finite
    ms, finite = time_step(step, "32", "cpu", repeats=3)
    assert len(calls) == 5  # a warm-up and three timed steps


@pytest.mark.parametrize("failure", ["crash", "hang"])
def test_a_bf16_step_that_crashes_or_hangs_costs_nothing(failure: str, tmp_path: Path, monkeypatch, fake_clock) -> None:
    """The bf16 step runs in a child: its crash (SIGSEGV) or hang leaves this process training in fp32,
    with the reason recorded, and the cache keeps the verdict so the next run does not try again."""
    monkeypatch.setenv("SSL_EM_CACHE", str(tmp_path))
    model = ScriptedStep({"32": 60, "bf16": 5}, on_bf16=failure)  # bf16 would be "faster" if it returned
    record = measure_module_precision(model, BATCH, "cpu", timeout_s=5)
    assert record["precision"] == "32" and not record["cached"]
    expected = "crashed with SIGSEGV" if failure == "crash" else "hung"
    assert expected in record["reason"] and record["ms_per_step"]["bf16"] is None
    assert record["ms_per_step"]["32"] == 60.0 and torch.equal(model.weight.detach(), torch.ones(1))
    again = measure_module_precision(model, BATCH, "cpu", timeout_s=5)
    assert again["cached"] and again["precision"] == "32" and again["reason"] == record["reason"]
    assert expected in json.loads((tmp_path / "precision.json").read_text()).popitem()[1]["reason"]


def test_a_bf16_step_that_raises_is_a_recorded_fallback(tmp_path: Path, monkeypatch, fake_clock) -> None:
    monkeypatch.setenv("SSL_EM_CACHE", str(tmp_path))
    record = measure_module_precision(ScriptedStep({"32": 5, "bf16": 5}, on_bf16="raise"), BATCH, "cpu",
                                      use_cache=False)
    assert record["precision"] == "32" and record["reason"] == "bf16 step raised no bf16 kernel for this op"


def test_a_model_that_cannot_be_pickled_trains_in_fp32_without_trying_bf16(tmp_path: Path, monkeypatch,
                                                                           fake_clock) -> None:
    """Weight-norm parametrizations (DINO's head) cannot be pickled into the probe process: bf16 is not
    tried where training runs either."""
    monkeypatch.setenv("SSL_EM_CACHE", str(tmp_path))
    model = ScriptedStep({"32": 5, "bf16": 1})
    model.proj = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(2, 2))
    record = measure_module_precision(model, BATCH, "cpu")
    assert record["precision"] == "32" and "cannot be sent to a probe process" in record["reason"]
    assert record["ms_per_step"]["bf16"] is None


def test_measuring_a_module_leaves_its_weights_and_the_rng_as_they_were(tmp_path: Path, monkeypatch) -> None:
    from ssl_em.adapters.finetune import FineTuning
    from ssl_em.data.datamodule import EMDataModule

    monkeypatch.setenv("SSL_EM_CACHE", str(tmp_path))
    torch.manual_seed(0)
    module = FineTuning(task="mito", encoder="unet3d_test", adapter="full", export_on_fit_end=False)
    dm = EMDataModule(task="mito", crop_shape=(8, 32, 32), batch_size=2, phantom_shape=(16, 96, 96),
                      samples_per_epoch=2, val_fraction=0)
    batch = next(iter(dm.train_dataloader()))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    record = measure_module_precision(module, batch, "cpu")
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert all(p.grad is None for p in module.parameters())
    assert record["precision"] in ("32", "bf16") and record["ms_per_step"]["32"] > 0
    assert "FineTuning" in record["key"] and "(2, 1, 8, 32, 32)" in record["key"]


def test_fit_with_auto_precision_says_what_it_measured(tmp_path: Path, monkeypatch, capsys) -> None:
    from ssl_em.cli import main as cli_main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SSL_EM_CACHE", str(tmp_path / "cache"))
    args = ["fit", "--config", str(REPO / "recipes/finetune/mito_lora.yaml"), "--trainer.fast_dev_run", "1",
            "--trainer.default_root_dir", str(tmp_path), "--model.init_args.encoder", "unet3d_test",
            "--data.init_args.crop_shape", "[8, 32, 32]", "--data.init_args.num_workers", "0",
            "--data.init_args.phantom_shape", "[16, 96, 96]", "--data.init_args.batch_size", "2"]
    assert cli_main(args) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if "precision auto" in x)
    assert "fp32" in line and "ms" in line and "cached" not in line
    assert cli_main(args) == 0
    assert "cached" in next(x for x in capsys.readouterr().err.splitlines() if "precision auto" in x)
    assert cli_main([*args, "--precision", "32"]) == 0
    assert "precision auto" not in capsys.readouterr().err


def test_label_efficiency_budgets_are_steps() -> None:
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "label_efficiency.py"), "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "--steps" in out and "--pretrain-steps" in out and "--pretrain-minutes" not in out
    assert "guard" in out  # --minutes only stops new runs


@pytest.mark.parametrize("argv", [["--steps", "0"]])
def test_demo_rejects_a_zero_budget(argv, capsys) -> None:
    from ssl_em.cli import main as cli_main

    assert cli_main(["demo", "--tiny", *argv]) == 2
    assert "steps 0" in capsys.readouterr().err
