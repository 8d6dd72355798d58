"""Label-efficiency study: does self-supervised pretraining beat training from scratch with few labels?

One engine for ``ssl-em demo`` and ``benchmarks/label_efficiency.py``:

1. **Regions.** The labelled volume is split in-plane (along y) into a training region and a
   disjoint evaluation region with a gap of at least half a patch (checked by ``check_disjoint``).
   The last y-slab of the training region is held back for validation: it ranks learning rates and
   picks each run's best weights; runs train on the rest (``fit``).
2. **Labels** (``Regime``). A label fraction keeps labels on that fraction of the z-sections (at
   least one, reproducible per seed, ``sparse_slices``), in training and validation alike; ``patches``
   paints N squares (``painted_size`` at the working spacing) on N sections of the fit part, each holding
   foreground (``paint_patches``), and leaves the validation slab unlabelled, so those runs keep their
   last weights and reuse the rate swept at the smallest fraction. Every other voxel is unlabelled.
3. **Pretraining** (once per study, ``pretrain_steps``) of the family's encoder on the unlabelled
   volumes (never on the evaluation region) with the ``Pretraining`` module, exported with ``save_encoder``.
4. **Methods** (``STUDY_METHODS``), each with the same labels, the same step budget and its own learning
   rate from a short sweep scored on the validation slab:
   ``lora`` / ``frozen`` / ``full`` start from the pretrained encoder; ``scratch`` is the same
   network from random init, all trained; ``lora_random`` is LoRA + head on a random encoder (the
   control: if it matches ``lora``, the pretrained features are not what helps); ``unet`` is the
   classic U-Net users write (``unet_small``, :mod:`ssl_em.models.unet`, shaped by the plan) from scratch, and
   ``rf`` an ilastik-style random forest on the same labels.
5. **One pipeline.** Every run is an ``ssl-em fit`` fine-tuning run: ``FineTuning`` + ``EMDataModule`` +
   a Lightning ``Trainer`` with ``max_steps``, validation every ``val_every`` steps and the best
   checkpoint (``ModelCheckpoint``); evaluation goes through ``predict_volume`` (``ssl-em predict``),
   then the task's post-processing and metrics (IoU for mito/synapse, VOI and adapted Rand error for
   neurons). Budgets are steps, so the same seed gives the same records whatever else the machine does.
6. **Runs that survive.** Each finished step is appended to ``results.jsonl``; a rerun skips them.
   A diverging run is retried at a third of its rate, then recorded as ``diverged``.

Outputs in ``out``: ``results.jsonl`` (one line per finished step), ``results.json`` (records
``{method, regime, fraction, patches, seed, labelled_voxels, metric, value}``, runs, precision, plan),
``results.md``, ``label_efficiency.png``, ``overlays.png``, ``pretrain/`` (encoder, loss curve,
reconstruction panel).
"""

from __future__ import annotations

from ssl_em.study.config import (
    FAMILIES as FAMILIES,
    LOWER_IS_BETTER as LOWER_IS_BETTER,
    LR_GRID as LR_GRID,
    METRICS as METRICS,
    STUDY_METHODS as STUDY_METHODS,
    StudyConfig as StudyConfig,
    budget_units as budget_units,
)
from ssl_em.study.regions import Regions as Regions, plan_regions as plan_regions
from ssl_em.study.report import (
    headline as headline,
    markdown_table as markdown_table,
    summarize as summarize,
    summary_lines as summary_lines,
)
from ssl_em.study.runner import Study as Study
from ssl_em.study.train import (
    Labelled as Labelled,
    build_data as build_data,
    build_module as build_module,
    fine_tune as fine_tune,
    predict_probabilities as predict_probabilities,
    pretrain as pretrain,
    score as score,
)
