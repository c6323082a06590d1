"""Distillation losses: Hinton's soft targets with the hard labels, hidden-state and attention-map matching.

`kd_loss` is `alpha * hard loss + (1 - alpha) * soft loss`, the problem's (for classes `alpha * CE(student,
labels) + (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T)`); the matching losses count real tokens only. `tunelab.tasks.distill` combines them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.contracts import IGNORE_INDEX
from tunelab.problems import Problem
from tunelab.problems.classification import Classification


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor, alpha: float,
            temperature: float, problem: Problem | None = None) -> dict[str, torch.Tensor]:
    """Hinton KD: `alpha * hard loss + (1 - alpha) * soft loss`, both the problem's (classification: CE and
    `T^2 * KL`); each part returned for logging. The hard loss counts labelled rows only: unlabelled ones (a
    transfer set, `data.unlabelled_file`) learn from the teacher alone, and a batch without labels gives 0."""
    problem = problem or Classification()
    hard = problem.loss(student_logits, labels)
    if teacher_logits is None or alpha >= 1:
        return {"loss": hard, "ce": hard}
    kd = problem.soft_loss(student_logits, teacher_logits, temperature)
    return {"loss": alpha * hard + (1 - alpha) * kd, "ce": hard, "kd": kd}


def hidden_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, kind: str) -> torch.Tensor:
    """MSE or (1 - cosine) between matched hidden states, over real tokens only (mask: batch x length)."""
    student, teacher = student.float(), teacher.float()
    per_row = ((student - teacher) ** 2).mean(-1) if kind == "mse" else 1 - F.cosine_similarity(student, teacher, dim=-1)
    if mask is None or per_row.dim() == 1:
        return per_row.mean()
    mask = mask.to(per_row.dtype)
    return (per_row * mask).sum() / mask.sum().clamp(min=1)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """MSE between head-averaged attention maps (batch x heads x length x length), over real token pairs."""
    diff = (student.float().mean(1) - teacher.float().mean(1)) ** 2
    if mask is None:
        return diff.mean()
    pairs = (mask[:, :, None] * mask[:, None, :]).to(diff.dtype)
    return (diff * pairs).sum() / pairs.sum().clamp(min=1)


def masked_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor,
                   alpha: float, temperature: float) -> dict[str, torch.Tensor]:
    """`kd_loss` over the predicted (masked) positions only: rows whose target is -100 are padding."""
    keep = targets != IGNORE_INDEX
    teacher_rows = teacher_logits[keep] if teacher_logits is not None else None
    return kd_loss(student_logits[keep], teacher_rows, targets[keep], alpha, temperature)
