"""Segmentation metrics on numpy label arrays (any shape, axis order z, y, x).

Overlap (IoU, Dice, precision/recall), VOI and ARAND from one shared contingency table,
topology-aware scores (clDice, expected run length), synapse detection F1 and instance AP;
:func:`evaluate` picks the set for a task. Only numpy loads here; scipy / scikit-image / cc3d
load inside the functions that use them.
"""

from ssl_em.metrics.contingency import Contingency as Contingency
from ssl_em.metrics.contingency import adapted_rand_error as adapted_rand_error
from ssl_em.metrics.contingency import contingency_table as contingency_table
from ssl_em.metrics.contingency import iou_matrix as iou_matrix
from ssl_em.metrics.contingency import variation_of_information as variation_of_information
from ssl_em.metrics.detection import average_precision as average_precision
from ssl_em.metrics.detection import centroids as centroids
from ssl_em.metrics.detection import synapse_f1 as synapse_f1
from ssl_em.metrics.evaluate import evaluate as evaluate
from ssl_em.metrics.overlap import dice as dice
from ssl_em.metrics.overlap import iou as iou
from ssl_em.metrics.overlap import jaccard as jaccard
from ssl_em.metrics.overlap import precision_recall as precision_recall
from ssl_em.metrics.topology import cldice as cldice
from ssl_em.metrics.topology import erl as erl
from ssl_em.metrics.topology import skeletonize_labels as skeletonize_labels

__all__ = [
    "Contingency",
    "adapted_rand_error",
    "average_precision",
    "centroids",
    "cldice",
    "contingency_table",
    "dice",
    "erl",
    "evaluate",
    "iou",
    "iou_matrix",
    "jaccard",
    "precision_recall",
    "skeletonize_labels",
    "synapse_f1",
    "variation_of_information",
]
