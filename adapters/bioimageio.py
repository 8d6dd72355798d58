"""Share a fine-tuned model where the bioimage community shares models: a BioImage Model Zoo package.

``ssl-em export-bioimageio MODEL OUT.zip [--license SPDX] --author NAME`` writes a model package (spec 0.5)
with ``bioimageio.spec``: one input ``raw`` (batch, channel, z, y, x; sizes that are multiples of the
network's stride from the training crop up) and one output ``probabilities`` with a halo; the model's
own normalisation as preprocessing (``scale_linear`` to 0..1, ``clip`` where it clips), ``sigmoid`` as
postprocessing; ``pytorch_state_dict`` weights whose architecture is :func:`build_network` (importable
from ssl-em) and a ``torchscript`` entry where the network traces; test input and output tensors, a
cover image, authors, citation, the voxel size as the axes' scale. Load it elsewhere with
``bioimageio.core.load_model_description(OUT.zip)`` (or in any BioImage.IO consumer).
Needs the optional extra ``ssl-em[bioimageio]``.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ssl_em.adapters.heads import build_segmentation_model
from ssl_em.adapters.io import load_finetuned, read_adapter_sidecar
from ssl_em.adapters.peft_adapters import AdaptedModel
from ssl_em.errors import ArgumentParser, ConfigError
from ssl_em.models import create_encoder

__all__ = ["build_network", "export_bioimageio", "main"]

CITATION = ("ssl-em: self-supervised pretraining and few-label adaptation for 3-D brain EM",
            "https://github.com/ssl-em/ssl-em")


def build_network(encoder_config: dict[str, Any], head: dict[str, Any]) -> nn.Module:
    """The network of a fine-tuned ssl-em model with random weights: the registered encoder plus its head
    (LoRA already merged into the weights). The BioImage.IO ``pytorch_state_dict`` architecture."""
    encoder = create_encoder(encoder_config["architecture"], **dict(encoder_config.get("kwargs") or {}))
    head = dict(head)
    return build_segmentation_model(encoder, head.pop("type"), **head)


def _plain_network(model: nn.Module) -> nn.Module:
    """A fine-tuned model as the plain encoder + head that :func:`build_network` rebuilds."""
    if isinstance(model, AdaptedModel):  # frozen / full, or an adapter peft could not merge
        if model.method not in ("frozen", "full"):
            raise ConfigError(f"a {model.method} adapter that cannot be merged into its base has no plain "
                              "network to export; fine-tune with lora, frozen or full")
        return model.base_model
    return model


def package_license(info: dict[str, Any], given: str | None) -> str:
    """The licence the package must carry: the one the base encoder's training data impose (recorded in
    its sidecar, e.g. the shipped VNC encoder's CC-BY-NC-SA-3.0, whose share-alike term binds weights
    derived from it), else the one given."""
    from ssl_em.errors import CheckpointError
    from ssl_em.models.weights_io import read_sidecar

    inherited = None
    base = (info.get("base") or {}).get("name_or_path")
    if base and not (info.get("metadata") or {}).get("base_in_folder"):
        try:
            inherited = (read_sidecar(base).get("metadata") or {}).get("license")
        except CheckpointError:  # the base is not at hand: only the given licence can be used
            inherited = None
    if inherited and given and given != inherited and "-SA-" in inherited:
        raise ConfigError(f"--license {given}: the weights derive from an encoder trained on {inherited} data, "
                          f"whose share-alike term requires {inherited}")
    if not (given or inherited):
        raise ConfigError("--license SPDX is required: the licence the weights' training data allow "
                          "(the base encoder records none)")
    return given or inherited  # type: ignore[return-value]


def _normalization_steps(norm: Any) -> list[Any]:
    from bioimageio.spec.model.v0_5 import ClipDescr, ClipKwargs, ScaleLinearDescr, ScaleLinearKwargs

    if norm is None or norm.low is None or norm.high is None:
        raise ConfigError("the model folder records no fitted normalisation (low, high): export a model "
                          "fine-tuned with ssl-em >= 0.1 (its adapter.json metadata.normalization)")
    gain = 1.0 / max(float(norm.high) - float(norm.low), 1e-12)
    steps = [ScaleLinearDescr(kwargs=ScaleLinearKwargs(gain=gain, offset=-float(norm.low) * gain))]
    if norm.clip:
        steps.append(ClipDescr(kwargs=ClipKwargs(min=0.0, max=1.0)))
    return steps


def _test_input(shape: tuple[int, int, int], norm: Any, seed: int = 0) -> np.ndarray:
    """A realistic raw crop: the phantom's EM texture, rescaled to the model's raw intensity range."""
    from ssl_em.data.phantom import make_phantom

    ph = make_phantom((max(shape[0], 8), max(shape[1], 64), max(shape[2], 64)), seed=seed)
    raw = ph.raw[: shape[0], : shape[1], : shape[2]].astype(np.float32) / 255.0
    return (float(norm.low) + raw * (float(norm.high) - float(norm.low)))[None, None].astype(np.float32)


def _write_cover(raw: np.ndarray, probs: np.ndarray, path: Path) -> None:
    from ssl_em.utils.plotting import pyplot, save_figure

    plt = pyplot()
    z = raw.shape[2] // 2
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    axes[0].imshow(raw[0, 0, z], cmap="gray")
    axes[0].set_title("input")
    axes[1].imshow(raw[0, 0, z], cmap="gray")
    axes[1].imshow(probs[0, 0, z], cmap="magma", alpha=0.6, vmin=0, vmax=1)
    axes[1].set_title("foreground probability")
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    save_figure(fig, path, dpi=80)


def export_bioimageio(model_folder: str | Path, out_zip: str | Path, *, license: str | None, authors: list[str],
                      name: str | None = None, description: str | None = None,
                      halo: tuple[int, int, int] | None = None, torchscript: bool = True) -> Path:
    """Write the BioImage.IO package of a fine-tuned model folder (``save_finetuned``) to ``out_zip``."""
    from bioimageio.spec import save_bioimageio_package
    from bioimageio.spec.model.v0_5 import (
        ArchitectureFromLibraryDescr, Author, AxisId, BatchAxis, ChannelAxis, CiteEntry, FileDescr, Identifier,
        InputTensorDescr, LicenseId, ModelDescr, OutputTensorDescr, ParameterizedSize,
        PytorchStateDictWeightsDescr, SigmoidDescr, SizeReference, SpaceInputAxis, SpaceOutputAxisWithHalo,
        TensorId, TorchscriptWeightsDescr, Version, WeightsDescr,
    )

    folder = Path(model_folder)
    out_zip = Path(out_zip)
    if out_zip.suffix != ".zip":
        raise ConfigError(f"output {out_zip} must end in .zip (a BioImage.IO package)")
    if out_zip.exists():
        raise ConfigError(f"output {out_zip} exists: choose a new path (ssl-em never replaces a file it did not write)")
    if not authors:
        raise ConfigError("--author NAME is required: the BioImage Model Zoo lists who made the model")
    info, _ = read_adapter_sidecar(folder)
    license = package_license(info, license)
    finetuned = load_finetuned(folder, merge=True)
    meta = info.get("metadata") or {}
    net = _plain_network(finetuned.model).eval()
    encoder_config = info["base"]["encoder_config"]
    head = dict(info.get("head") or {})
    stride = tuple(int(s) for s in getattr(net.encoder, "patch_size", (1, 1, 1)))
    # "patch_shape": the crop's name in models fine-tuned before it was renamed
    patch = tuple(int(p) for p in (meta.get("crop_shape") or meta.get("patch_shape") or [max(8, s) for s in stride]))
    minimum = tuple(max(s, (p // s) * s) for p, s in zip(patch, stride))
    halo = tuple(halo) if halo is not None else tuple(m // 4 for m in minimum)
    if any(2 * h >= m for h, m in zip(halo, minimum)):
        raise ConfigError(f"halo {halo} leaves no output of the smallest input {minimum}: use a smaller --halo")
    vs = [float(v) for v in (finetuned.voxel_size or (1.0, 1.0, 1.0))]
    unit = "nanometer" if finetuned.voxel_size else None
    task = finetuned.task
    channel_names = [Identifier(f"{task.name}_{i}") for i in range(task.num_outputs)]

    with tempfile.TemporaryDirectory(prefix="ssl_em_bioimageio_") as tmp_dir:
        tmp = Path(tmp_dir)
        x = _test_input(minimum, finetuned.normalization)
        scaled = finetuned.normalization(x)  # what the package's scale_linear (+ clip) preprocessing does
        with torch.no_grad():
            y = torch.sigmoid(net(torch.from_numpy(scaled))).numpy()
        np.save(tmp / "test_input.npy", x)
        np.save(tmp / "test_output.npy", y.astype(np.float32))
        _write_cover(x, y, tmp / "cover.png")
        torch.save(net.state_dict(), tmp / "weights.pt")  # bioimageio's pytorch_state_dict format
        weights: dict[str, Any] = {"pytorch_state_dict": PytorchStateDictWeightsDescr(
            source=tmp / "weights.pt", pytorch_version=Version(torch.__version__.split("+")[0]),
            architecture=ArchitectureFromLibraryDescr(
                import_from="ssl_em.adapters.bioimageio", callable=Identifier("build_network"),
                kwargs={"encoder_config": encoder_config, "head": head}))}
        if torchscript:
            try:
                with warnings.catch_warnings():  # TorchScript is deprecated in torch >= 2.9 but consumers read it
                    warnings.simplefilter("ignore")
                    traced = torch.jit.trace(net, torch.from_numpy(scaled), check_trace=False)
                    # a trace that baked in the test size would be wrong elsewhere: check one step larger
                    other = torch.rand(1, 1, *(m + s for m, s in zip(minimum, stride)))
                    with torch.no_grad():
                        if not torch.allclose(traced(other), net(other), atol=1e-5):
                            raise ValueError("the trace does not generalise to other input sizes")
                traced.save(str(tmp / "weights.torchscript"))
                weights["torchscript"] = TorchscriptWeightsDescr(
                    source=tmp / "weights.torchscript", pytorch_version=Version(torch.__version__.split("+")[0]),
                    parent="pytorch_state_dict")
            except Exception:  # noqa: BLE001 - a network that does not trace keeps its state-dict entry only
                pass
        (tmp / "README.md").write_text(
            f"# {name or folder.name}\n\n{description or ''}\n\nA {task.name} segmentation network fine-tuned with "
            f"ssl-em ({info.get('method')} on {encoder_config['architecture']}), trained at voxel size {vs} "
            f"(z, y, x) nm; inputs at another voxel size should be resampled first. Training steps: "
            f"{meta.get('steps')}. Data: {meta.get('data', {}).get('volumes', meta.get('data'))}.\n")
        space_in = [SpaceInputAxis(id=AxisId(a), size=ParameterizedSize(min=m, step=s), scale=v, unit=unit)
                    for a, m, s, v in zip("zyx", minimum, stride, vs)]
        space_out = [SpaceOutputAxisWithHalo(id=AxisId(a), halo=h, scale=v, unit=unit,
                                             size=SizeReference(tensor_id=TensorId("raw"), axis_id=AxisId(a)))
                     for a, h, v in zip("zyx", halo, vs)]
        descr = ModelDescr(
            name=name or f"ssl-em {task.name} {encoder_config['architecture']} {info.get('method')}",
            description=description or f"{task.name} probabilities from 3-D EM, fine-tuned with ssl-em",
            authors=[Author(name=a) for a in authors],
            cite=[CiteEntry(text=CITATION[0], url=CITATION[1])],
            license=LicenseId(license),
            documentation=FileDescr(source=tmp / "README.md"),
            covers=[FileDescr(source=tmp / "cover.png")],
            tags=["electron-microscopy", "3d", task.name, "ssl-em", "segmentation"],
            inputs=[InputTensorDescr(id=TensorId("raw"), axes=[BatchAxis(), ChannelAxis(channel_names=[
                Identifier("raw")]), *space_in], test_tensor=FileDescr(source=tmp / "test_input.npy"),
                preprocessing=_normalization_steps(finetuned.normalization))],
            outputs=[OutputTensorDescr(id=TensorId("probabilities"), axes=[BatchAxis(), ChannelAxis(
                channel_names=channel_names), *space_out], test_tensor=FileDescr(source=tmp / "test_output.npy"),
                postprocessing=[SigmoidDescr()])],
            weights=WeightsDescr(**weights),
        )
        out_zip.parent.mkdir(parents=True, exist_ok=True)
        partial = out_zip.with_name(f".{out_zip.name}.partial")
        save_bioimageio_package(descr, output_path=partial)
        partial.replace(out_zip)  # complete or absent
    return out_zip


def main(argv: list[str]) -> int:
    """``ssl-em export-bioimageio MODEL OUT.zip --license SPDX --author NAME [--author ...] [--no-test]``."""
    p = ArgumentParser(prog="ssl-em export-bioimageio",
                       description="Package a fine-tuned model folder for the BioImage Model Zoo (spec 0.5).")
    p.add_argument("model", help="fine-tuned model folder (adapter.json + adapter.safetensors)")
    p.add_argument("out", help="package to write, OUT.zip")
    p.add_argument("--license", default=None, help="SPDX id that the weights' training data allow, e.g. CC-BY-4.0 "
                   "(default: the licence the base encoder records)")
    p.add_argument("--author", action="append", default=[], help="author name (repeat for several)")
    p.add_argument("--name", default=None)
    p.add_argument("--description", default=None)
    p.add_argument("--no-test", action="store_true", help="skip bioimageio.core's test of the written package")
    args = p.parse_args(argv)
    try:
        import bioimageio.spec  # noqa: F401
    except ImportError:
        raise ConfigError("export-bioimageio needs the optional extra: pip install 'ssl-em[bioimageio]'") from None
    out = export_bioimageio(args.model, args.out, license=args.license, authors=args.author, name=args.name,
                            description=args.description)
    print(f"wrote {out}")
    if not args.no_test:
        from bioimageio.core import test_model

        summary = test_model(str(out))
        print(f"bioimageio.core test: {summary.status}")
        if summary.status != "passed":
            raise ConfigError(f"{out} was written but failed bioimageio.core's test: run bioimageio test {out}")
    return 0
