"""ExCB loss with the reference view pairing (method.md §3).

Teacher view t in {0, 1} is matched with the student *projection* of the other global view and with the
student *predictor* output of every crop (both globals and all locals). Local-crop projection logits never
enter the loss, so the model never computes them. Each of the ``2 * (1 + V)`` pairs weighs the same.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pair_count(num_views: int) -> int:
    """Number of (teacher, student) pairs: 2 * (1 + V), V = 2 + local crops."""
    return 2 * (1 + num_views)


def excb_loss(teacher_probs: Tensor, proj_logits: Tensor, pred_logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Cross-entropy over the reference pairing.

    teacher_probs: [2, B, K] targets for the two global views (no grad).
    proj_logits:   [2, B, K] student projector logits of the two global views (cos / tau_s).
    pred_logits:   [V, B, K] student predictor logits of all V crops (globals first).

    Metrics are 0-d tensors (no host sync). The predictor terms share their target per teacher view, so the V
    log-softmaxes are summed once and dotted with each target: the same value as 2V separate cross-entropies, with
    less memory traffic.
    """
    if teacher_probs.shape[0] != 2 or proj_logits.shape[0] != 2:
        raise ValueError("teacher_probs and proj_logits need exactly two global views")
    num_views = pred_logits.shape[0]
    proj_logp = torch.log_softmax(proj_logits.float(), dim=-1)
    pred_logp_sum = torch.log_softmax(pred_logits.float(), dim=-1).sum(dim=0)  # [B, K]
    total = proj_logits.new_zeros((), dtype=torch.float32)
    for t in (0, 1):
        target = teacher_probs[t].float()
        total = total - (target * proj_logp[1 - t]).sum(-1).mean()
        total = total - (target * pred_logp_sum).sum(-1).mean()
    loss = total / pair_count(num_views)
    with torch.no_grad():
        t_lab = teacher_probs.argmax(-1)  # [2, B]
        hits = ((proj_logits[1].argmax(-1) == t_lab[0]).float().sum()
                + (proj_logits[0].argmax(-1) == t_lab[1]).float().sum())
        pred_lab = pred_logits.argmax(-1)  # [V, B]
        hits = hits + (pred_lab.unsqueeze(0) == t_lab.unsqueeze(1)).float().sum()
        acc = hits / (pair_count(num_views) * teacher_probs.shape[1])
    return loss, {"acc": acc}


def reference_loss(teacher_probs: Tensor, proj_logits: Tensor, pred_logits: Tensor) -> Tensor:
    """Literal pair-by-pair version, kept for tests that pin :func:`excb_loss` to the spec."""
    terms = []
    for t in (0, 1):
        target = teacher_probs[t]
        terms.append(-(target * torch.log_softmax(proj_logits[1 - t], -1)).sum(-1).mean())
        for v in range(pred_logits.shape[0]):
            terms.append(-(target * torch.log_softmax(pred_logits[v], -1)).sum(-1).mean())
    return torch.stack(terms).mean()
