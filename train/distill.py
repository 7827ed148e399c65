"""Knowledge distillation from the original model: KL between temperature-scaled distributions.

Hinton et al. 2015: the KL term is multiplied by T^2 so its gradients keep their size as T changes. The teacher
runs under no_grad in eval mode, replicated or sharded over the processes as `teacher.py` places it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per token, averaged over tokens, computed in fp32."""
    vocab = student_logits.size(-1)
    student = F.log_softmax(student_logits.float().view(-1, vocab) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().view(-1, vocab) / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


@torch.no_grad()
def teacher_logits(teacher: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return teacher(input_ids=input_ids).logits


def mix(lm_loss: torch.Tensor, kd_loss: torch.Tensor, weight: float) -> torch.Tensor:
    """(1 - weight) x language-model loss + weight x distillation loss."""
    return (1.0 - weight) * lm_loss + weight * kd_loss
