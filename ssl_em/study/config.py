"""Study configuration, the methods compared, their learning-rate grids and the metrics per task."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ssl_em.errors import ConfigError, check_fraction, check_positive

STUDY_METHODS = ("lora", "frozen", "full", "scratch", "lora_random", "unet", "rf")
UNET_CONTROL = "unet_small"  # the ``unet`` method: the plain U-Net users train (ssl_em.models.unet)
NOT_TRAINED = ("rf",)  # baselines without an optimiser: no rate, no step budget
# study method -> (adapter method, starts from the pretrained encoder)
ADAPTER = {"lora": ("lora", True), "frozen": ("frozen", True), "full": ("full", True),
           "scratch": ("full", False), "lora_random": ("lora", False)}
# family -> encoder to pretrain, objective, pretraining rate
FAMILIES: dict[str, dict[str, Any]] = {
    # U-Net lora: adapters on the encoder path, decoder path trained in full (like a ViT's UNETR
    # decoder; why: add_adapter's train_decoder)
    # the plain U-Net users train (shaped by the plan) with SparK: the best of dense inpainting, SparK and
    # SparK + SimCLR at one painted patch on VNC (benchmarks/results/vnc_mito_unet_objectives)
    "cnn": dict(encoder="unet_small", method="spark", method_kwargs={"mask_ratio": 0.6}, lr=2e-3,
                adapter_kwargs={"train_decoder": True}),
    "vit": dict(encoder="vit3d_tiny_patch2x16", method="mae", method_kwargs={"mask_ratio": 0.75}, lr=1.5e-3),
}
# learning-rate sweep grids (AdamW peak rates): adapters and heads need larger rates than full
# training; centred where short CPU runs (~100-400 steps) on the phantom and VNC peaked
# (full, scratch and unet share one grid, centred on the unet's best at all labels, 2e-3)
LR_GRID = {"lora": (6e-3, 2e-2, 6e-2), "lora_random": (6e-3, 2e-2, 6e-2), "frozen": (1e-2, 3e-2, 1e-1),
           "full": (6e-4, 2e-3, 6e-3), "scratch": (6e-4, 2e-3, 6e-3), "unet": (6e-4, 2e-3, 6e-3), "rf": (0.0,)}
#: settings renamed since records were written: the digest reads them by their old name, so tables resume
RECORDED_NAMES = {"painted_size": "patch_size", "crop_shape": "patch_shape", "eval_slab": "eval_fraction",
                  "val_slab": "val_fraction"}
# StudyConfig fields only the fine-tuning runs read: changing them keeps a study's finished pretraining
FINE_TUNING_ONLY = ("adapter_kwargs", "encoder_lr_scale", "ema_decay", "fractions", "patches", "painted_size", "steps", "eval_steps",
                    "val_every", "val_samples", "sweep_share", "sweep_every_fraction", "lrs", "tta", "calibrate",
                    "max_eval_voxels", "max_val_voxels")
LAYOUTS = ("auto", "plan", "2d", "3d")
#: anisotropy (z spacing / in-plane) where "auto" probes 2-D against 3-D crops: the plan's rule (2-D from 4x) was
#: measured at 5.4x (VNC mitochondria at 9.2 nm: 2-D better, benchmarks/unet_baseline.py) and is a guess below
#: (another lab's SBEM at 3.4x: 2-D 0.446 vs the rule's 3-D 0.299 IoU)
PROBE_ANISOTROPY = (2.0, 5.0)
METRICS = {"mito": ("iou", "dice", "ap50"), "synapse": ("iou", "dice", "detection_f1"), "neuron": ("voi", "arand"),
           "membrane": ("iou", "dice", "vrand", "vinfo")}
LOWER_IS_BETTER = {"voi", "arand"}
_NAMES = {"iou": "IoU", "dice": "Dice", "ap50": "AP50", "voi": "VOI", "arand": "ARAND", "detection_f1": "F1", "vrand": "V_rand",
          "vinfo": "V_info"}


@dataclass(frozen=True)
class Regime:
    """Labels a run trains on: a ``fraction`` of the z-sections labelled in full, or ``patches`` painted
    squares (``StudyConfig.painted_size`` at the working spacing, each on its own section, each holding
    foreground), as a person paints them in a viewer."""

    fraction: float | None = None
    patches: int | None = None

    @property
    def name(self) -> str:
        if self.patches is not None:
            return f"{self.patches} patch{'es' if self.patches != 1 else ''}"
        return f"{self.fraction:.0%} sections"


@dataclass
class StudyConfig:
    """Everything a study depends on; written into ``results.json``.

    Budgets are optimiser steps: ``steps`` per fine-tuning run (each sweep rate gets ``sweep_share``
    of them), ``pretrain_steps`` for pretraining (0 with ``encoder`` skips it); the same seed gives the
    same records on any machine. ``val_every`` steps the run is scored on the validation slab and the
    best-scoring weights are evaluated. ``max_minutes`` only guards the whole study's wall clock:
    runs not started by then are left for a rerun, which skips finished runs (``results.jsonl``).
    Rates are swept per (method, fraction) on seed 0's labels unless ``sweep_every_fraction`` is
    False (then only at the smallest fraction). ``crop_shape`` is (z, y, x) voxels; ``eval_slab`` / ``val_slab`` are
    shares of y (slabs; a data module's ``val_fraction`` is a share of z-sections).
    """

    task: str = "mito"
    family: str = "cnn"
    architecture: str | None = None  # override the family's encoder (e.g. unet3d_test in tests)
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    encoder: str | None = None  # an exported encoder (path or name) to start from
    adapter_kwargs: dict[str, Any] | None = None  # add_adapter options of lora / lora_random; None: the family's
    encoder_lr_scale: float = 1.0  # pretrained methods: the encoder path trains at this fraction of the rate
    # network methods are scored (and validated) with an exponential moving average of their weights of this
    # decay (Lightning's EMAWeightAveraging) instead of the last step's; None: the weights as trained
    ema_decay: float | None = None
    methods: tuple[str, ...] = STUDY_METHODS
    fractions: tuple[float, ...] = (0.05, 1.0)
    patches: tuple[int, ...] = ()  # painted-patch regimes (numbers of patches), beside the fractions
    painted_size: int = 256  # a painted square's side at the working spacing (clipped to the training region)
    seeds: int = 1
    steps: int = 300
    # the runs' weights are also scored on the evaluation region after these steps (IoU against fine-tuning
    # steps, as a person who stops early gets it; the schedule is the whole run's): "at_steps" in the records
    eval_steps: tuple[int, ...] = ()
    pretrain_steps: int = 600
    pretrain_method: str | None = None  # pretraining objective; None: the family's (spark / mae)
    val_every: int = 50
    val_samples: int = 16  # validation crops (fixed) from the labelled sections of the validation slab
    max_minutes: float | None = None
    sweep_share: float = 0.25
    sweep_every_fraction: bool = True  # False: sweep at the smallest fraction, reuse the rate above it
    lrs: dict[str, tuple[float, ...]] | None = None
    crop_shape: tuple[int, int, int] | None = None  # None: the plan's (ssl_em.plan), at the working spacing
    batch_size: int | None = None  # None: the plan's
    # 2-D or 3-D crops: "auto" probes both where z is 2-5x coarser than x (the plan's anisotropy rule is unsure
    # there) and keeps the better on the validation slab; "plan": the rule alone; "2d" / "3d": forced
    layout: str = "auto"
    # what picks a run's best weights, a sweep's rate and the layout: "crops" (soft Dice of val_samples crops of the
    # validation slab) or "slab" (soft Dice over its whole labelled sections, predicted as the evaluation is;
    # mitochondria and synapses)
    validation: str = "crops"
    downsample: int | None = None  # in-plane factor to the working spacing; None: the plan's, 1: native
    eval_slab: float = 0.3
    val_slab: float = 0.2
    # evaluation mirrors each window in y and x (and z with depth) and averages, as nnU-Net does; off by
    # default: 4x the evaluation's compute
    tta: bool = False
    # post-processing settings each run chooses on its own labels, the validation slab's when it has one
    # (synapses: threshold and minimum cleft size; neurons: agglomeration threshold; Task.calibrate);
    # False: the task's defaults
    calibrate: bool = True
    max_eval_voxels: int = 4_000_000  # the evaluation region is centre-cropped in x to this size
    max_val_voxels: int = 1_000_000  # likewise the validation part scored in the rate sweep
    voxel_size: tuple[float, float, float] | None = None
    precision: str = "auto"
    device: str = "auto"  # "auto": CUDA when a GPU is visible
    fill_missing: bool = False  # zarr chunks absent from an input read as the fill value (else an error)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ConfigError(f"family {self.family!r} is not one of {', '.join(FAMILIES)}")
        if self.task not in METRICS:
            raise ConfigError(f"task {self.task!r} is not one of {', '.join(METRICS)}")
        unknown = [m for m in self.methods if m not in STUDY_METHODS]
        if unknown:
            raise ConfigError(f"unknown methods {unknown}; choose from {', '.join(STUDY_METHODS)}")
        bad = [f for f in self.fractions if not 0 < f <= 1]
        if bad:
            raise ConfigError(f"label fractions {bad} must be in (0, 1]")
        self.fractions = tuple(sorted(float(f) for f in self.fractions))
        if self.pretrain_method is not None:
            from ssl_em.pretrain.module import OBJECTIVES

            if self.pretrain_method not in OBJECTIVES:
                raise ConfigError(f"pretrain_method {self.pretrain_method!r} is not one of {', '.join(OBJECTIVES)}")
        if any(int(n) < 1 for n in self.patches) or int(self.painted_size) < 1:
            raise ConfigError(f"patches {list(self.patches)} and painted_size {self.painted_size} must be >= 1")
        self.patches = tuple(sorted(int(n) for n in self.patches))
        if not self.fractions and not self.patches:
            raise ConfigError("no label regime: give fractions, patches or both")
        if any(int(s) < 1 for s in self.eval_steps):
            raise ConfigError(f"eval_steps {list(self.eval_steps)} must be steps >= 1")
        self.eval_steps = tuple(sorted({int(s) for s in self.eval_steps}))
        if int(self.steps) < 1 or int(self.pretrain_steps) < 0 or int(self.val_every) < 1:
            raise ConfigError(f"steps {self.steps} and val_every {self.val_every} must be >= 1, "
                              f"pretrain_steps {self.pretrain_steps} >= 0")
        for method, rates in (self.lrs or {}).items():
            if method not in LR_GRID or not rates or min(float(r) for r in rates) <= 0:
                raise ConfigError(f"lrs {method!r}: {list(rates)} must be positive rates of a method in "
                                  f"{', '.join(LR_GRID)}")
        if self.lrs is not None:
            self.lrs = {m: tuple(float(r) for r in rates) for m, rates in self.lrs.items()}
        check_positive(self.seeds, "seeds")
        check_fraction(self.encoder_lr_scale, "encoder_lr_scale", allow_one=True)
        if self.ema_decay is not None:
            check_fraction(self.ema_decay, "ema_decay")
        check_fraction(self.eval_slab, "eval_slab")
        check_fraction(self.val_slab, "val_slab", allow_zero=True)  # 0: no validation, last weights
        check_fraction(self.sweep_share, "sweep_share", allow_zero=True, allow_one=True)
        for name in ("batch_size", "downsample", "max_minutes"):
            if getattr(self, name) is not None:
                check_positive(getattr(self, name), name)
        if self.validation not in ("crops", "slab"):
            raise ConfigError(f"validation={self.validation!r} is not 'crops' or 'slab'")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"layout={self.layout!r} is not one of {', '.join(LAYOUTS)}")
        if self.crop_shape is not None and (len(self.crop_shape) != 3 or min(self.crop_shape) < 1):
            raise ConfigError(f"crop_shape={list(self.crop_shape)} must be three sizes >= 1 (z, y, x)")
        if self.crop_shape is not None:
            self.crop_shape = tuple(int(p) for p in self.crop_shape)  # type: ignore[assignment]
        from ssl_em.utils.precision import resolve_device

        self.device = resolve_device(self.device)  # results.json records the device the runs used
        if self.adapter_kwargs is None:
            self.adapter_kwargs = dict(FAMILIES[self.family].get("adapter_kwargs", {}))

    @property
    def regimes(self) -> tuple[Regime, ...]:
        """Scarcest first: painted patches, then section fractions."""
        return tuple(Regime(patches=n) for n in self.patches) + tuple(Regime(fraction=f) for f in self.fractions)

    @property
    def spacing(self) -> tuple[float, float, float] | None:
        """The working voxel size (z, y, x) nm: ``voxel_size`` downsampled in-plane by ``downsample``."""
        if self.voxel_size is None:
            return None
        d = self.downsample or 1
        return (self.voxel_size[0], self.voxel_size[1] * d, self.voxel_size[2] * d)

    @property
    def task_kwargs(self) -> dict[str, Any]:
        """The task's settings at the working spacing (mitochondria: boundaries and sizes in nm), the same
        for every method: all of them train and predict on the working grid."""
        return {"voxel_size": list(self.spacing)} if self.task == "mito" and self.spacing else {}

    @property
    def arch(self) -> str:
        return self.architecture or FAMILIES[self.family]["encoder"]


def resolve_encoder(encoder: str | None, family: str, architecture: str | None = None) -> str | None:
    """``--encoder`` of the demo and the study: ``"auto"`` = the encoder ssl-em ships for ``architecture``
    (default: the family's; None when it ships none, and the study pretrains one); ``"none"`` =
    random init, pretrained from scratch; anything else is a path or name used as is."""
    if encoder is None or encoder.lower() == "none":
        return None
    if encoder != "auto":
        return encoder
    from ssl_em.models.pretrained import pretrained_dir

    folder = pretrained_dir(architecture or FAMILIES[family]["encoder"])
    return folder.name if folder is not None else None


def _lrs(cfg: StudyConfig, method: str) -> tuple[float, ...]:
    return tuple((cfg.lrs or {}).get(method, LR_GRID[method]))


def budget_units(cfg: StudyConfig) -> float:
    """Total fine-tuning steps of a study in units of ``cfg.steps`` (sweeps included)."""
    total = 0.0
    for m in (m for m in cfg.methods if m not in NOT_TRAINED):
        k = len(_lrs(cfg, m))
        # painted patches alone leave nothing to validate on: no sweep (Study.sweep takes the grid's centre)
        sweeps = 0 if k < 2 or not cfg.fractions else len(cfg.fractions) if cfg.sweep_every_fraction else 1
        total += len(cfg.regimes) * cfg.seeds + sweeps * k * cfg.sweep_share
    return total
