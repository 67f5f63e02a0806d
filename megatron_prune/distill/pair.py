"""Teacher and student on the same pipeline stage, passing both activations between stages.

megatron's pipeline schedules send one tensor [s, b, hidden] between stages. DistillationPair concatenates
the student's and the (detached) teacher's activations along the hidden axis and tells the schedule that
hidden = h_student + h_teacher, so each stage holds its slice of both models and both travel together.
On the last stage it returns both logit shards. The teacher is frozen and in eval mode.
"""

from __future__ import annotations

import copy

import torch
from megatron.core.transformer.module import MegatronModule


class DistillationPair(MegatronModule):
    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, student_hidden: int, teacher_hidden: int):
        config = copy.copy(student.config)
        config.hidden_size = student_hidden + teacher_hidden  # what the schedule uses for p2p tensor shapes
        super().__init__(config=config)
        self.student = student
        self.teacher = teacher
        self.split = (student_hidden, teacher_hidden)
        self.model_type = _unwrap(student).model_type  # megatron's schedules look this up
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.teacher.eval()

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # never in training mode
        return self

    def set_input_tensor(self, input_tensor) -> None:
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        student, teacher = _unwrap(self.student), _unwrap(self.teacher)
        if input_tensor is None:
            student.set_input_tensor(None)
            teacher.set_input_tensor(None)
            return
        s, t = input_tensor.split(self.split, dim=-1)
        student.set_input_tensor(s)
        teacher.set_input_tensor(t.detach())

    def forward(self, tokens, position_ids, attention_mask):
        with torch.no_grad():
            t_out = self.teacher(tokens, position_ids, attention_mask)
        s_out = self.student(tokens, position_ids, attention_mask)
        if _unwrap(self.student).post_process:
            return s_out, t_out  # logit shards [b, s, V/tp]
        return torch.cat([s_out, t_out.detach()], dim=-1)


def _unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module
