"""``precision: auto`` is chosen by timing this model's step, never by CPU flags; cached per machine."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssl_em.utils.precision import measure_module_precision, measure_precision, resolve_precision

REPO = Path(__file__).resolve().parents[1]


def _step(ms: dict[str, float], loss: dict[str, float], calls: list[str]):
    def step(precision: str) -> float:
        calls.append(precision)
        time.sleep(ms[precision] / 1000)
        return loss[precision]
    return step


def test_bf16_only_when_measured_faster_and_finite(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SSL_EM_CACHE", str(tmp_path))
    calls: list[str] = []
    fast = measure_precision(_step({"32": 30, "bf16": 5}, {"32": 1.0, "bf16": 1.0}, calls), "a", "cpu")
    assert fast["precision"] == "bf16" and not fast["cached"] and fast["ms_per_step"]["bf16"] < 20
    assert calls == ["32"] * 4 + ["bf16"] * 4  # a warm-up and three timed steps each
    slow_calls: list[str] = []
    slow = measure_precision(_step({"32": 5, "bf16": 40}, {"32": 1.0, "bf16": 1.0}, slow_calls), "b", "cpu")
    assert slow["precision"] == "32"  # slower bf16 (an emulating CPU, or one whose bf16 kernels lose) is not taken
    assert slow_calls.count("bf16") == 1  # 8x slower already in its warm-up: not timed further
    diverging = measure_precision(_step({"32": 30, "bf16": 5}, {"32": 1.0, "bf16": math.nan}, []), "c", "cpu")
    assert diverging["precision"] == "32" and diverging["finite"] == {"32": True, "bf16": False}
    calls.clear()
    again = measure_precision(_step({"32": 30, "bf16": 5}, {"32": 1.0, "bf16": 1.0}, calls), "a", "cpu")
    assert again["cached"] and again["precision"] == "bf16" and calls == []  # from the cache: nothing run
    cache = json.loads((tmp_path / "precision.json").read_text())
    assert len(cache) == 3 and all("torch" in key and key.startswith("cpu:") for key in cache)
    assert resolve_precision("auto", "cpu") == "32"  # unmeasured: never bf16 from CPU flags


def test_measuring_a_module_leaves_its_weights_and_the_rng_as_they_were(tmp_path: Path, monkeypatch) -> None:
    from ssl_em.adapters.finetune import FineTuning
    from ssl_em.data.datamodule import EMDataModule

    monkeypatch.setenv("SSL_EM_CACHE", str(tmp_path))
    torch.manual_seed(0)
    module = FineTuning(task="mito", encoder="unet3d_test", adapter="full", export_on_fit_end=False)
    dm = EMDataModule(task="mito", patch_shape=(8, 32, 32), batch_size=2, phantom_shape=(16, 96, 96),
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
            "--data.init_args.patch_shape", "[8, 32, 32]", "--data.init_args.num_workers", "0",
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
