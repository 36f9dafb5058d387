"""Centripetal SGD (C-SGD): cluster similar filters, train each cluster's members to one point,
then merge them exactly.

The package reads as the paper's four steps, one module each:

S1 survey (:mod:`.survey`)
    :func:`survey` streams a survey set through the network and keeps, for every channel,
    the global average pool (GAP) of its output for each image: a survey vector
    ``g^(p)`` in R^N. Only ``N x C`` numbers per layer are stored, never a feature map.
S2 clustering (:mod:`.clustering`)
    :func:`similarity` is the Pearson correlation of two survey vectors,
    ``SIM(p, q) = (E[g_p g_q] - E[g_p] E[g_q]) / sqrt(Var g_p Var g_q)``, and
    :func:`cluster` merges clusters bottom-up (most similar pair first, the merged cluster's
    vector being the mean of all its members' vectors) until the requested number is left.
S3 centripetal training (:mod:`.centripetal`, :mod:`.epsilon`)
    :class:`CentripetalTransform` rewrites the gradients of every filter ``F_j`` of a
    cluster ``H(j)`` so that one SGD step performs::

        F_j <- F_j - tau * ( mean_{k in H(j)} dL/dF_k + eta * F_j
                             + eps * (F_j - mean_{k in H(j)} F_k) )

    (tau: learning rate, eta: weight decay, eps: centripetal strength). All members get the
    same increment and are pulled to the cluster centre until they are identical;
    :func:`auto_epsilon` picks the smallest ``eps`` that converges on the planned schedule.
S4 merge (:mod:`.merge`)
    :func:`merge` keeps the lowest-numbered member of each cluster, adds the other members'
    input slices to its slice in every consumer, ``K[:, k] <- sum_{m in H(k)} K[:, m]``, and
    deletes the rest (through the engine's :class:`~prunekit.engine.GroupPlan` ``merge``).
    Exact once the members are identical: no fine-tuning.

:func:`run` (:mod:`.method`) is the method behind ``prunekit.prune(..., method="csgd")``.
Decisions taken where the paper is silent are listed in ``docs/csgd.md``.

References
----------
Ding, X., Ding, G., Guo, Y. and Han, J. (2019). Centripetal SGD for pruning very deep
convolutional networks with complicated structure. CVPR, 4943-4953.
"""

from ...train.bn import recalibrate_bn
from .centripetal import CentripetalTransform, centripetal_gradient, centripetal_step, max_intra_distance
from .clustering import CLUSTERING_METHODS, Clusters, cluster, group_clusters, merge_tree, similarity
from .epsilon import _simulate_difference, auto_epsilon
from .merge import merge, merge_plan
from .method import DEFAULTS, GRADIENTS, CsgdOptions, run
from .survey import STATISTICS, _following_bn, survey

__all__ = [
    "CLUSTERING_METHODS", "DEFAULTS", "GRADIENTS", "STATISTICS", "CentripetalTransform", "Clusters",
    "CsgdOptions", "_following_bn", "_simulate_difference", "auto_epsilon", "centripetal_gradient",
    "centripetal_step", "cluster", "group_clusters", "max_intra_distance", "merge", "merge_plan",
    "merge_tree", "recalibrate_bn", "run", "similarity", "survey",
]
