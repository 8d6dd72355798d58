"""Label-efficiency study: does self-supervised pretraining beat training from scratch with few labels?

One engine for ``ssl-em demo`` and ``benchmarks/label_efficiency.py``:

1. **Regions.** The labelled volume is split in-plane (along y) into a training region and a
   disjoint evaluation region with a gap of at least half a patch (checked by ``check_disjoint``).
   The last y-slab of the training region is the validation part used only to pick learning rates.
2. **Labels.** A label fraction keeps labels on that fraction of the z-sections (at least one,
   reproducible per seed, ``sparse_slices``); every other voxel is unlabelled (mask 0).
3. **Pretraining** (once per study, wall-clock budget) of the family's encoder on the unlabelled
   volumes (never on the evaluation region), exported with ``save_encoder``.
4. **Methods** (``METHODS``), each with the same labels, the same wall-clock budget and its own
   learning rate from a short sweep scored on the validation part:
   ``lora`` / ``frozen`` / ``full`` start from the pretrained encoder; ``scratch`` is the same
   network from random init, all trained; ``lora_random`` is LoRA + head on a random encoder (the
   control: if it matches ``lora``, the pretrained features are not what helps); ``unet`` is a
   standard MONAI 3-D U-Net trained from scratch as users otherwise would (a different network
   from the ``scratch`` U-Net of the cnn family).
5. **Evaluation** on the evaluation region: sliding-window probabilities -> the task's
   post-processing -> metrics (IoU for mito/synapse, VOI and adapted Rand error for neurons).

Training is a plain loop rather than a Lightning ``Trainer``: each run is seconds to minutes and a
study holds dozens of them, and the learning rate follows a warm-up-cosine schedule over the run's
*wall-clock* budget (not a step count), so every method gets the same time and ends annealed.
Outputs in ``out``: ``results.json`` (records ``{method, fraction, seed, metric, value}``),
``results.md``, ``label_efficiency.png``, ``overlays.png``, ``pretrain/`` (encoder, loss curve,
reconstruction panel).
"""

from __future__ import annotations

from ssl_em.study.config import (
    FAMILIES as FAMILIES,
    LOWER_IS_BETTER as LOWER_IS_BETTER,
    LR_GRID as LR_GRID,
    METHODS as METHODS,
    METRICS as METRICS,
    StudyConfig as StudyConfig,
    budget_units as budget_units,
)
from ssl_em.study.regions import Regions as Regions, label_sections as label_sections, plan_regions as plan_regions
from ssl_em.study.report import headline as headline, markdown_table as markdown_table, summarize as summarize
from ssl_em.study.runner import Study as Study
from ssl_em.study.train import (
    Labelled as Labelled,
    build_learner as build_learner,
    finetune as finetune,
    predict as predict,
    pretrain as pretrain,
    score as score,
    train_for as train_for,
)
