"""Loss functions used by the trainer."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      targets: torch.Tensor, alpha: float, temperature: float,
                      label_smoothing: float = 0.0) -> torch.Tensor:
    """Knowledge-distillation loss ``alpha*T^2*KL(p_t || p_s) + (1-alpha)*CE(s, y)``.

    ``p_t = softmax(teacher / T)`` and ``p_s = softmax(student / T)``; the KL divergence is
    averaged over the batch and multiplied by ``T^2`` so that its gradient keeps the scale
    of the cross-entropy's as ``T`` changes. Computed in float32.

    Parameters
    ----------
    student_logits, teacher_logits : Tensor [B, K]
        Raw scores; the teacher's carry no gradient (they are detached here).
    targets : Tensor [B]
        Class indices for the hard-label term.
    alpha : float
        Weight of the soft-target term, in [0, 1].
    temperature : float
        Softmax temperature ``T > 0``.
    label_smoothing : float
        Label smoothing of the cross-entropy term.

    Returns
    -------
    Tensor
        A scalar.

    References
    ----------
    G. Hinton, O. Vinyals, J. Dean. "Distilling the Knowledge in a Neural Network",
    arXiv:1503.02531, 2015. The CURL fine-tuning step (Luo and Wu, CVPR 2020) uses this form.
    """
    s = student_logits.float()
    t = teacher_logits.detach().float()
    kl = F.kl_div(F.log_softmax(s / temperature, dim=1), F.log_softmax(t / temperature, dim=1),
                  reduction="batchmean", log_target=True)
    ce = F.cross_entropy(s, targets, label_smoothing=label_smoothing)
    return alpha * temperature * temperature * kl + (1.0 - alpha) * ce
