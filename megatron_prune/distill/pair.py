"""Teacher and student on the same pipeline stage, passing both activations between stages.

megatron's pipeline schedules send one tensor [s, b, hidden] between stages. DistillationPair concatenates
the student's and the (detached) teacher's activations along the hidden axis and tells the schedule that
hidden = h_student + h_teacher, so each stage holds its slice of both models and both travel together.
On the last stage it returns both logit shards. The teacher is frozen and in eval mode. With virtual pipeline
stages there is one pair per model chunk: student chunk i with teacher chunk i.

Intermediate-state losses: the paired states (student layer s with teacher layer t, and the embedding outputs)
travel with the activations. The sent tensor is ``[student | teacher | s_0 | t_0 | s_1 | t_1 | ...]``, one
student and one teacher slot per pair; the chunk that computes a paired layer writes its output into the slot
(zeros until then), later chunks pass the slots through, and the last chunk hands every state to the loss.
The student slots stay in the autograd graph, so megatron's backward p2p carries their gradient back to the
stage that produced them; teacher slots are detached. At PP=1 nothing is sent and every state is local.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from megatron.core.transformer.module import MegatronModule

EMBEDDING = "embedding"  # the "layer" of the embedding-output pair


class DistillationPair(MegatronModule):
    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module, student_hidden: int, teacher_hidden: int,
                 state_pairs: Sequence[tuple] = ()):
        """``state_pairs``: the (student layer, teacher layer) pairs whose outputs the intermediate-state loss
        compares, global layer indices or ``EMBEDDING``, in the order the loss takes them."""
        self.split = (student_hidden, teacher_hidden) + (student_hidden, teacher_hidden) * len(state_pairs)
        config = copy.copy(student.config)
        config.hidden_size = sum(self.split)  # what the schedule uses for p2p tensor shapes
        super().__init__(config=config)
        self.student = student
        self.teacher = teacher
        self.state_pairs = [tuple(p) for p in state_pairs]
        self.model_type = _unwrap(student).model_type  # megatron's schedules look this up
        self.vp_stage = getattr(_unwrap(student), "vp_stage", None)  # the interleaved schedule checks it
        self._slots: Optional[list] = None  # the states received from the previous stage
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
            self._slots = None
            return
        s, t, *slots = input_tensor.split(self.split, dim=-1)
        student.set_input_tensor(s)
        teacher.set_input_tensor(t.detach())
        self._slots = [x if i % 2 == 0 else x.detach() for i, x in enumerate(slots)]

    def forward(self, tokens, position_ids, attention_mask, hidden: Optional[dict] = None):
        """``hidden``: on the last stage, filled with the paired states ``{"student": [...], "teacher": [...]}``
        (one entry per state pair, in order) for the intermediate-state loss."""
        captured: dict = {}
        handles = [module.register_forward_hook(_keep(captured, key)) for key, module in self._state_modules()]
        try:
            with torch.no_grad():
                t_out = self.teacher(tokens, position_ids, attention_mask)
            s_out = self.student(tokens, position_ids, attention_mask)
        finally:
            for h in handles:
                h.remove()
        states = []  # [s_0, t_0, s_1, t_1, ...]: produced here, received, or not yet produced (None)
        for j, (s_layer, t_layer) in enumerate(self.state_pairs):
            for side, layer in ((0, s_layer), (1, t_layer)):
                state = captured.get((side, layer))
                if state is None and self._slots is not None:
                    state = self._slots[2 * j + side]
                states.append(state.detach() if side == 1 and state is not None else state)
        if _unwrap(self.student).post_process:
            if hidden is not None and self.state_pairs:
                missing = [self.state_pairs[i // 2] for i, x in enumerate(states) if x is None]
                if missing:
                    raise RuntimeError(f"state pairs {missing} were never computed (layer index out of range?)")
                if self.config.sequence_parallel:  # each TP rank holds a slice of the sequence: the loss sees all
                    states = [_gather_sequence(x) for x in states]
                hidden["student"].extend(states[0::2])
                hidden["teacher"].extend(states[1::2])
            return s_out, t_out  # logit shards [b, s, V/tp]
        zeros = lambda width: s_out.new_zeros(s_out.shape[:-1] + (width,))  # noqa: E731
        slots = [x if x is not None else zeros(self.split[2 + i]) for i, x in enumerate(states)]
        return torch.cat([s_out, t_out.detach()] + slots, dim=-1)

    def _state_modules(self):
        """((side, layer), module) for the paired states this chunk computes (side 0: student, 1: teacher)."""
        found = []
        for side, model in ((0, _unwrap(self.student)), (1, _unwrap(self.teacher))):
            wanted = {pair[side] for pair in self.state_pairs}
            if EMBEDDING in wanted and model.pre_process:
                found.append(((side, EMBEDDING), model.embedding))
            for layer in model.decoder.layers:
                if layer.layer_number - 1 in wanted:  # megatron's layer_number: global, 1-based
                    found.append(((side, layer.layer_number - 1), layer))
        return found


def _keep(captured: dict, key):
    def hook(_module, _inputs, output):
        captured[key] = output[0] if isinstance(output, tuple) else output
    return hook


def _gather_sequence(state: torch.Tensor) -> torch.Tensor:
    """A sequence-parallel state [s/tp, b, h] whole [s, b, h] on every TP rank. The loss on it is the same on every
    rank, so its gradient goes back as this rank's slice only (megatron's gather without the reduce-scatter)."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    return gather_from_sequence_parallel_region(state, tensor_parallel_output_grad=False)


def _unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module
