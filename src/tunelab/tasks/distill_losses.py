"""Distillation losses: Hinton's soft targets with the hard labels, hidden-state and attention-map matching.

`kd_loss` is `alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(p_teacher^T || p_student^T)`; the
matching losses count real tokens only. `tunelab.tasks.distill` combines them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tunelab.contracts import IGNORE_INDEX


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`T^2 * KL(softmax(teacher/T) || softmax(student/T))`, averaged over the rows (one row per prediction)."""
    t = temperature
    return F.kl_div(F.log_softmax(student_logits.float() / t, dim=-1), F.log_softmax(teacher_logits.float() / t, dim=-1),
                    reduction="batchmean", log_target=True) * t * t


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor, alpha: float,
            temperature: float, label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """Hinton KD: `alpha * CE + (1 - alpha) * soft-target loss`; each part returned for logging.

    CE averages over the labelled rows only: rows labelled -100 (a transfer set, `data.unlabelled_file`)
    learn from the teacher alone. Summed then divided, so a batch without labels gives 0, not NaN.
    """
    labelled = (labels != IGNORE_INDEX).sum().clamp(min=1)
    ce = F.cross_entropy(student_logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum",
                         label_smoothing=label_smoothing) / labelled
    if teacher_logits is None or alpha >= 1:
        return {"loss": ce, "ce": ce}
    kd = soft_target_loss(student_logits, teacher_logits, temperature)
    return {"loss": alpha * ce + (1 - alpha) * kd, "ce": ce, "kd": kd}


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
