"""Task definitions: targets from labels, losses, post-processing back to instances, input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ssl_em.adapters.tasks import NEURON_OFFSETS, get_task, list_tasks
from ssl_em.errors import ConfigError, LabelError


def _two_blobs() -> np.ndarray:
    labels = np.zeros((6, 24, 24), np.uint32)
    labels[1:5, 3:11, 3:11] = 1
    labels[1:5, 3:11, 11:19] = 2  # touching the first: only the boundary channel separates them
    return labels


def test_registry_and_num_outputs():
    assert list_tasks() == ["membrane", "mito", "neuron", "synapse"]
    assert [get_task(n).num_outputs for n in list_tasks()] == [1, 2, len(NEURON_OFFSETS), 1]
    with pytest.raises(ConfigError, match="unknown task"):
        get_task("nuclei")


@pytest.mark.parametrize("name", ["mito", "synapse", "neuron", "membrane"])
def test_targets_and_loss_shapes(name):
    task = get_task(name)
    labels = _two_blobs() if name != "membrane" else (_two_blobs() > 0).astype(np.uint8)
    mask = np.zeros(labels.shape, np.float32)
    mask[2:4] = 1
    target, tmask = task.make_targets(labels, mask)
    assert target.shape == tmask.shape == (task.num_outputs, *labels.shape)
    assert target.dtype == tmask.dtype == np.float32
    assert tmask[:, :2].max() == 0 and tmask[:, 4:].max() == 0  # unlabelled sections stay ignored
    logits = torch.randn(1, *target.shape, requires_grad=True)
    loss = task.loss(logits, torch.from_numpy(target)[None], torch.from_numpy(tmask)[None])
    loss.backward()
    assert torch.isfinite(loss) and logits.grad[:, :, :2].abs().max() == 0


def test_mito_boundary_separates_touching_instances():
    target, _ = get_task("mito", voxel_size=(50, 4, 4)).make_targets(_two_blobs())
    fg, boundary = target
    assert fg.sum() == (_two_blobs() > 0).sum()
    assert boundary[2, 6, 10] == 1 and boundary[2, 6, 11] == 1  # inner boundaries on both sides of the contact
    assert boundary[2, 6, 6] == 0
    assert boundary[1, 6, 6] == 0  # in-plane: the first section is not all boundary for anisotropic voxels
    assert get_task("mito", voxel_size=(8, 8, 8)).make_targets(_two_blobs())[0][1][1, 6, 6] == 1  # 3-D if isotropic
    assert get_task("mito").make_targets(_two_blobs())[0][1][1, 6, 6] == 0  # unknown: serial sections (plan's rule)


def test_neuron_affinities_match_slow_reference():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (4, 6, 7)).astype(np.int64)
    mask = (rng.random(labels.shape) > 0.2).astype(np.float32)
    offsets = [(-1, 0, 0), (0, -1, 0), (0, 0, 2), (0, -3, 0), (0, 9, 0)]
    for zero_label in ("boundary", "ignore"):
        target, tmask = get_task("neuron", offsets=offsets, zero_label=zero_label).make_targets(labels, mask)
        for c, o in enumerate(offsets):
            for v in np.ndindex(labels.shape):
                w = tuple(a + b for a, b in zip(v, o))
                inside = all(0 <= a < n for a, n in zip(w, labels.shape))
                a = labels[v]
                b = labels[w] if inside else 0
                valid = inside and mask[v] > 0 and mask[w] > 0 and (
                    (a or b) if zero_label == "boundary" else (a and b))
                assert tmask[c][v] == float(bool(valid)), (c, v)
                assert target[c][v] == float(inside and a != 0 and a == b), (c, v)
    assert tmask[4].max() == 0  # offset longer than the volume: everything masked


def test_postprocess_recovers_instances():
    labels = _two_blobs()
    mito = get_task("mito", voxel_size=(50, 4, 4))
    target, _ = mito.make_targets(labels)
    inst = mito.postprocess(target, (50, 4, 4))
    assert inst.shape == labels.shape and len(np.unique(inst[inst > 0])) == 2
    by_distance = get_task("mito", split="distance")
    apart = labels.copy()
    apart[:, :, 11:13] = 0  # the distance split needs a neck between the two
    fg, _ = by_distance.make_targets(apart)
    assert fg.shape == (1, *labels.shape)
    assert len(np.unique(by_distance.postprocess(fg, (50, 4, 4))[apart > 0])) == 2
    clefts = get_task("synapse").postprocess(np.stack([labels == 1])[:, :, :, :].astype(np.float32) * 0.9)
    assert clefts.max() == 1
    assert get_task("membrane").postprocess(np.full((1, 2, 3, 4), 0.7)).dtype == np.uint8


def test_neuron_postprocess_from_perfect_affinities():
    labels = np.zeros((4, 20, 20), np.int32)
    labels[:, :, :9], labels[:, :, 10:] = 1, 2  # a 1-voxel boundary (id 0) between two neurons
    labels[:, 12:, 10:] = 3
    labels[:, 11, 10:] = 0
    task = get_task("neuron")
    aff, _ = task.make_targets(labels)
    seg = task.postprocess(aff)
    for i in (1, 2, 3):  # each neuron is one segment, and no two share one
        ids = np.unique(seg[labels == i])
        assert len(ids) == 1 and ids[0] != 0
    assert len({int(np.unique(seg[labels == i])[0]) for i in (1, 2, 3)}) == 3


@pytest.mark.parametrize(
    "name,raw,labels,mask,match",
    [
        ("mito", np.zeros((2, 4, 4)), np.zeros((2, 4, 5), np.uint8), None, r"labels shape \(2, 4, 5\) != raw shape"),
        ("mito", np.full((2, 4, 4), np.nan), np.zeros((2, 4, 4), np.uint8), None, "NaN"),
        ("mito", None, np.zeros((2, 4, 4), np.uint8), np.zeros((2, 4, 4)), "no labelled voxel"),
        ("membrane", None, np.full((2, 4, 4), 2, np.uint8), None, r"must be 0/1, found \[2\]"),
        ("mito", None, np.full((2, 4, 4), -1, np.int32), None, "negative"),
        ("mito", None, np.full((2, 4, 4), 0.5), None, "must be integers"),
        ("neuron", None, np.zeros((2, 4, 4), np.int32), None, "every id is 0"),
        ("synapse", None, np.zeros((2, 4, 4), np.uint8), np.ones((2, 4, 3)), r"mask shape"),
    ],
)
def test_bad_inputs_give_one_line_label_errors(name, raw, labels, mask, match):
    task = get_task(name)
    with pytest.raises(LabelError, match=match) as err:
        task.check(raw, labels, mask)
        task.make_targets(labels, mask)
    assert "\n" not in str(err.value)


def test_a_training_crop_without_objects_is_not_an_error():
    target, tmask = get_task("neuron").make_targets(np.zeros((2, 4, 4), np.int64))
    assert target.max() == 0 and tmask.max() == 0  # boundary only: nothing to learn, nothing raised
    target, tmask = get_task("mito").make_targets(np.zeros((2, 4, 4), np.int64))
    assert target.max() == 0 and tmask.min() == 1  # labelled background is a real negative


def test_synapse_calibration_on_painted_patches_removes_false_clefts():
    """Probabilities like a network's trained on a few patches centred on clefts: real clefts at 0.8, a
    cell-sized region near 0.6 and specks at 0.9. Settings chosen on one painted patch per section give
    detections the default 0.5 threshold misses by hundreds of false clefts."""
    from ssl_em.data.phantom import make_phantom
    from ssl_em.metrics import evaluate

    ph = make_phantom((12, 192, 192), seed=3)
    clefts, vs = ph.labels("synapse") > 0, ph.voxel_size
    rng = np.random.default_rng(0)
    probs = np.where(clefts, 0.8, 0.1).astype(np.float32)
    probs[:, 100:160, 20:90] = np.maximum(probs[:, 100:160, 20:90], 0.6)  # a whole cell marked faintly
    specks = (rng.random(clefts.shape) < 0.002) & ~clefts
    probs[specks] = 0.9
    task = get_task("synapse")
    truth = clefts.astype(np.uint8)
    before = evaluate(task.postprocess(probs[None], vs), truth, "synapse", vs)
    painted = np.zeros(clefts.shape, np.uint8)
    for z in range(0, clefts.shape[0], 3):  # one 96 x 96 square per third section, around a cleft and the cell
        painted[z, 80:176, 10:106] = 1
    settings = task.calibrate(probs[None], truth, painted, vs)
    assert 0.6 <= settings["threshold"] < 0.8 and settings["min_volume_nm3"] > np.prod(vs)
    after = evaluate(task.postprocess(probs[None], vs), truth, "synapse", vs)
    assert before["detection_fp"] > 100 and after["detection_fp"] < 0.1 * before["detection_fp"]
    assert after["iou"] > before["iou"] + 0.2 and after["detection_recall"] >= 0.8 * before["detection_recall"]
    # the threshold from weighted samples (a forest's out-of-bag pixels) instead of the probability volume
    known = painted > 0
    samples = (probs[known], clefts[known], np.ones(int(known.sum()), np.float32))
    assert get_task("synapse").calibrate(None, truth, painted, vs, samples=samples) == settings
    wrong = (1 - probs[known], clefts[known], np.ones(int(known.sum()), np.float32))  # an inverted classifier
    assert get_task("synapse").calibrate(None, truth, painted, vs, samples=wrong)["labelled_iou"] < 0.5
    assert get_task("synapse").calibrate(probs[None], truth, np.zeros_like(painted), vs) == {}  # nothing labelled
    with pytest.raises(LabelError, match="differ in shape"):
        task.calibrate(probs[None, :-1], truth, painted, vs)
    assert get_task("mito").calibrate(probs[None], truth, painted, vs) == {}


def test_neuron_calibration_finds_the_cut_of_under_confident_affinities():
    """Affinities that never fall below 0.5 across membranes (0.66 there, 0.88 inside cells, plus noise,
    as gala seed 2's network gave) leave no boundary at the default 0.5, so one fragment holds every cell;
    the threshold chosen on a labelled half (fragments and agglomeration) cuts them on the other."""
    from ssl_em.data.phantom import make_phantom
    from ssl_em.metrics import evaluate

    ph = make_phantom((12, 96, 128), seed=5)
    task = get_task("neuron")
    target, _ = task.make_targets(ph.neurons)
    noise = np.random.default_rng(0).normal(0, 0.03, target.shape).astype(np.float32)
    probs = np.clip(0.66 + 0.22 * target + noise, 0, 1)
    scored = (slice(None), slice(None), slice(64, None))
    default = task.postprocess(probs)
    assert default.max() == 1  # one segment
    before = evaluate(default[scored].astype(np.int64), ph.neurons[scored], "neuron", erl=False)
    half = np.zeros(ph.neurons.shape, np.uint8)
    half[:, :, :64] = 1
    settings = task.calibrate(probs, ph.neurons, half, (1.0, 1.0, 1.0))
    assert 0.66 < settings["threshold"] < 0.88 and task.calibrated == {"threshold": settings["threshold"]}
    after = evaluate(task.postprocess(probs)[scored].astype(np.int64), ph.neurons[scored], "neuron", erl=False)
    assert before["voi_merge"] > 2 * after["voi_merge"] and after["voi"] < 0.5 * before["voi"], (before, after)
    assert get_task("neuron").calibrate(probs, np.zeros_like(ph.neurons), half) == {}
