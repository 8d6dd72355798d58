"""Training through the real CLI: every recipe runs, resume reproduces the uninterrupted run,
checkpoints are safetensors that export to a loadable encoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from ssl_em.cli import main as cli_main
from ssl_em.utils.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY_DATA = [
    "--data.init_args.num_workers", "0",
    "--data.init_args.phantom_shape", "[16, 96, 96]",  # 16x64x64 holds no mitochondria in its training part
    "--data.init_args.batch_size", "2",
    "--data.init_args.val_samples", "2",
]


def _tiny_model(recipe: str) -> list[str]:
    if "vit3d" in recipe:
        return ["--model.init_args.encoder", "vit3d_test_patch2x16", "--data.init_args.crop_shape", "[8, 32, 32]"]
    text = (REPO / recipe).read_text() if recipe.endswith(".yaml") else ""  # a recipe, or an encoder family's name
    if "unet_small" in recipe or "encoder: unet_small" in text:  # the plain U-Net family
        if "encoder_kwargs: {spacing" in text:  # in its 3-D layout (FIB-SEM neurons), as its recipe trains
            return ["--model.init_args.encoder", "unet_test", "--model.init_args.encoder_kwargs",
                    "{spacing: [8, 8, 8], crop_shape: [8, 32, 32]}", "--data.init_args.crop_shape", "[8, 32, 32]"]
        return ["--model.init_args.encoder", "unet_test", "--data.init_args.crop_shape", "[1, 32, 32]"]
    return ["--model.init_args.encoder", "unet3d_test", "--data.init_args.crop_shape", "[8, 32, 32]"]


RECIPES = sorted(str(p.relative_to(REPO)) for p in (REPO / "recipes").rglob("*.yaml"))


@pytest.mark.parametrize(("recipe", "extra", "task", "two_views"), [
    ("recipes/finetune/mito_lora.yaml", ["--data.init_args.task", "neuron"], "neuron", False),
    ("recipes/pretrain/spark_unet3d_tiny.yaml", ["--model.init_args.method", "spark_simclr"], None, True),
    ("recipes/pretrain/spark_unet3d_tiny.yaml", [], None, False),
])
def test_values_that_must_agree_are_set_once(recipe, extra, task, two_views):
    """The data's task is the model's; the pretraining method decides whether the data gives two views:
    one setting each, so a model and its data cannot disagree (they did when both were set by hand)."""
    from ssl_em.fit import build_cli

    cli = build_cli(["--config", str(REPO / recipe), *TINY_DATA, *extra], run=False)
    assert getattr(cli.model.hparams, "task", None) == task == cli.datamodule.hparams.get("task")
    assert cli.datamodule.hparams["two_views"] is two_views


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_runs_through_the_cli(recipe, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "../shared/data" in (REPO / recipe).read_text():  # the shipped encoders' recipes read real EM
        if not (REPO.parent / "shared" / "data").is_dir():
            pytest.skip("../shared/data (real EM volumes) is not beside this clone")
        monkeypatch.chdir(REPO)  # their data paths are relative to the project root
    rc = cli_main(["fit", "--config", str(REPO / recipe), "--trainer.fast_dev_run", "2",
                   "--trainer.default_root_dir", str(tmp_path), *_tiny_model(recipe), *TINY_DATA])
    assert rc == 0


class StopAt(Callback):
    """Ends training after ``step`` optimizer steps, as an interruption would (same schedule horizon)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class PoisonWeights(Callback):
    """Makes every weight NaN after the first step, as a diverging run would."""

    def on_train_batch_end(self, trainer, module, *args) -> None:
        with torch.no_grad():
            for p in module.parameters():
                p.fill_(float("nan"))


@pytest.mark.parametrize("recipe", ["recipes/pretrain/spark_unet3d_tiny.yaml", "recipes/finetune/mito_lora.yaml"])
def test_fit_returns_nonzero_when_training_fails(recipe, tmp_path, monkeypatch, capsys):
    """A run whose loss went NaN and one that got no batch exit 1 with one line (Lightning itself
    returns normally from both), so scripts and the recipe test above see them."""
    monkeypatch.chdir(tmp_path)
    args = ["fit", "--config", str(REPO / recipe), "--precision", "32", "--trainer.default_root_dir", str(tmp_path),
            *_tiny_model(recipe), *TINY_DATA]
    poisoned = json.dumps([{"class_path": "test_training.PoisonWeights"}])
    assert cli_main([*args, "--trainer.fast_dev_run", "2", "--trainer.callbacks", poisoned]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ssl-em fit: error: train loss is nan at step 1"), err
    assert cli_main([*args, "--trainer.max_steps", "2", "--trainer.limit_train_batches", "0"]) == 1
    assert "no optimizer step was taken" in capsys.readouterr().err
    assert cli_main([*args, "--trainer.fast_dev_run", "2"]) == 0  # the same run, untouched, passes


def _pretrain(tmp_path: Path, max_steps: int, extra: list[str] = (), stop_at: int | None = None) -> Path:
    root = tmp_path / "run"
    callbacks = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                  "init_args": {"dirpath": str(root / "ckpt"), "save_last": True, "every_n_train_steps": 4}}]
    if stop_at is not None:
        callbacks.append({"class_path": "test_training.StopAt", "init_args": {"step": stop_at}})
    rc = cli_main(["fit", "--config", str(REPO / "recipes/pretrain/spark_unet3d_tiny.yaml"),
              "--trainer.max_steps", str(max_steps), "--trainer.default_root_dir", str(root),
              "--trainer.val_check_interval", "4", "--trainer.limit_val_batches", "1",
              "--trainer.callbacks", json.dumps(callbacks),
              "--model.init_args.panel_every_n_steps", "4",
              "--data.init_args.samples_per_epoch", "16", "--precision", "32",
              *_tiny_model("unet"), *TINY_DATA, *extra])
    assert rc == 0
    return root


def test_pretraining_resume_matches_uninterrupted_run(tmp_path):
    full = _pretrain(tmp_path / "a", 8)
    _pretrain(tmp_path / "b", 8, stop_at=4)
    resumed = _pretrain(tmp_path / "b", 8, ["--ckpt_path", str(tmp_path / "b/run/ckpt/last.ckpt")])
    a = load_checkpoint(full / "ckpt" / "last.ckpt")
    b = load_checkpoint(resumed / "ckpt" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 8
    for key, value in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][key], value, msg=f"{key} differs after resume")
    assert a["ssl_em"]["encoder_config"]["architecture"] == "unet3d_test"
    assert a["ssl_em"]["data"]["normalization"]["mode"] == "percentile"
    panels = list((full).rglob("panels/*.png"))
    assert panels, "no reconstruction panel written"


class PauseAt(Callback):
    """Hangs after ``step`` optimizer steps, so a test can SIGKILL the run there (mid-epoch); ``marker``
    is created on arrival, so the test kills when the run is there, not after a guessed sleep."""

    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, marker

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            import time

            Path(self.marker).touch()
            time.sleep(600)


def _fit_command(root: Path, extra: list[str] = ()) -> list[str]:
    """`ssl-em fit` of the SparK recipe, 12 steps (epochs of 8), a CSV loss per step, `last.ckpt` every 4
    steps in Lightning's default place (root/lightning_logs/version_N/checkpoints)."""
    import sys

    logger = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root)}}
    ckpt = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"save_last": True, "every_n_train_steps": 4}}
    callbacks = [ckpt, *extra]
    recipe = str(REPO / "recipes/pretrain/spark_unet3d_tiny.yaml")
    return [sys.executable, "-m", "ssl_em.cli", "fit", "--config", recipe,
            "--trainer.max_steps", "12", "--trainer.default_root_dir", str(root), "--trainer.log_every_n_steps", "1",
            "--trainer.limit_val_batches", "0", "--trainer.logger", json.dumps(logger),
            "--trainer.callbacks", json.dumps(callbacks), "--trainer.enable_progress_bar", "false",
            "--model.init_args.panel_every_n_steps", "0", "--data.init_args.samples_per_epoch", "16",
            "--precision", "32", *_tiny_model("unet"), *TINY_DATA]


def _loss_curve(metrics: Path) -> dict[int, float]:
    import csv

    rows = csv.DictReader(metrics.open())
    return {int(row["step"]): float(row["train/loss"]) for row in rows if row.get("train/loss")}


def test_fit_resumes_after_sigkill_with_the_same_loss_curve(tmp_path):
    """SIGKILL mid-epoch after the step-4 checkpoint, then `--ckpt_path last` from the same output folder:
    the resumed run finds the killed run's last.ckpt (in version_0; the new run logs to version_1, where
    Lightning alone looked and found nothing) and its losses equal an uninterrupted run's."""
    import os
    import subprocess
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    full = tmp_path / "full"
    subprocess.run(_fit_command(full), cwd=tmp_path, env=env, check=True, capture_output=True, timeout=600)
    killed = tmp_path / "killed"
    paused = tmp_path / "paused"
    pause = {"class_path": "test_training.PauseAt", "init_args": {"step": 6, "marker": str(paused)}}
    proc = subprocess.Popen(_fit_command(killed, [pause]), cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while time.time() < deadline and not paused.exists():  # at step 6: mid-epoch, two steps after the checkpoint
        time.sleep(0.2)
    assert paused.exists(), "the run never reached its pause at step 6"
    proc.kill()
    proc.wait()
    assert load_checkpoint(last)["global_step"] == 4
    done = subprocess.run(_fit_command(killed) + ["--ckpt_path", "last"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {last}" in done.stderr
    a = _loss_curve(full / "lightning_logs" / "version_0" / "metrics.csv")
    b = _loss_curve(killed / "lightning_logs" / "version_1" / "metrics.csv")  # the resumed run's own log
    assert sorted(a) == list(range(12)) and sorted(b) == list(range(4, 12)), (sorted(a), sorted(b))
    for step in b:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a[step], b[step])


def test_exported_encoder_loads_with_the_pretrained_weights(tmp_path):
    import ssl_em

    root = _pretrain(tmp_path, 4)
    out = tmp_path / "encoder"
    assert cli_main(["export-encoder", str(root / "ckpt" / "last.ckpt"), str(out)]) == 0
    encoder = ssl_em.load_encoder(out)
    state = load_checkpoint(root / "ckpt" / "last.ckpt")["state_dict"]
    for name, value in encoder.state_dict().items():
        torch.testing.assert_close(value, state[f"objective.encoder.{name}"])
    sidecar = json.loads((out / "encoder.json").read_text())
    assert sidecar["metadata"]["method"] == "spark"
    assert sidecar["metadata"]["normalization"]["mode"] == "percentile"


class RankRecord(Callback):
    """Writes what each DDP rank saw (a digest of every crop it trained on) and its weights at the end."""

    def __init__(self, out: str) -> None:
        self.out, self.crops = out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        import hashlib

        tensors = batch.values() if isinstance(batch, dict) else [batch]
        for t in (t for t in tensors if isinstance(t, torch.Tensor)):
            self.crops += [hashlib.sha1(crop.detach().cpu().numpy().tobytes()).hexdigest() for crop in t]

    def on_train_end(self, trainer, pl_module) -> None:
        import hashlib

        weights = hashlib.sha1(b"".join(v.detach().cpu().numpy().tobytes()
                                        for _, v in sorted(pl_module.state_dict().items()))).hexdigest()
        Path(self.out, f"rank{trainer.global_rank}.json").write_text(json.dumps({"crops": self.crops,
                                                                                 "weights": weights}))


def test_ddp_with_two_cpu_processes(tmp_path):
    """Lightning DDP (gloo) over 2 CPU processes through the real CLI: the ranks train on disjoint crops
    and end with identical weights (gradients were averaged, not two models trained side by side)."""
    import os
    import subprocess
    import sys

    root = tmp_path / "ddp"
    record = {"class_path": "test_training.RankRecord", "init_args": {"out": str(tmp_path)}}
    cmd = [sys.executable, "-m", "ssl_em.cli", "fit", "--config", str(REPO / "recipes/pretrain/spark_unet3d_tiny.yaml"),
           "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--trainer.max_steps", "3", "--trainer.limit_val_batches", "0", "--trainer.default_root_dir", str(root),
           "--trainer.callbacks", json.dumps([{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                               "init_args": {"dirpath": str(root / "ckpt"), "save_last": True}},
                                              record]),
           "--precision", "32", "--data.init_args.samples_per_epoch", "12",
           *_tiny_model("unet"), *TINY_DATA]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests")}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "distributed_backend=gloo" in done.stderr + done.stdout
    ckpt = load_checkpoint(root / "ckpt" / "last.ckpt")
    assert ckpt["global_step"] == 3
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(len(r["crops"]) >= 3 for r in ranks)
    assert not set(ranks[0]["crops"]) & set(ranks[1]["crops"]), "both ranks trained on the same crops"
    assert ranks[0]["weights"] == ranks[1]["weights"]
