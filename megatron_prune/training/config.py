"""TrainConfig: every knob of a distillation (or plain CE) run, from YAML plus command-line overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml


@dataclass
class TrainConfig:
    student: str  # checkpoint to train (usually the pruned one)
    data: list  # Megatron blend: prefixes, or WEIGHT PREFIX pairs; or SFT JSONL files (answer-only loss)
    out: str  # run directory: step_XXXXXXX checkpoints, tensorboard/, log
    teacher: Optional[str] = None  # None: plain CE training (also used for teacher correction)
    teacher_logits: Optional[str] = None  # instead of teacher: its top-K log-probs from `teacher-logits` (offline KD)
    valid_data: Optional[str] = None  # indexed prefix for the periodic validation LM loss
    tp: int = 1
    pp: int = 1
    vpp: int = 1  # virtual pipeline stages per rank (megatron's interleaved 1F1B schedule; needs pp > 1)
    ep: int = 1  # expert-parallel size of a Mixture-of-Experts student/teacher (their experts over DP ranks)
    # batch and schedule
    seq_len: int = 512
    micro_batch_size: int = 1
    global_batch_size: int = 8
    steps: Optional[int] = None
    tokens: Optional[int] = None  # alternative to steps: stop after this many training tokens
    optimizer: str = "adam"  # adam (AdamW-style decoupled weight decay) | sgd
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 10
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    seed: int = 1234
    # losses (Minitron: forward KL on logits alone, tau = 1)
    kd_loss: str = "forward"  # forward | reverse | topk
    kd_tau: float = 1.0
    kd_top_k: Optional[int] = None
    ce_weight: float = 0.0  # add the LM loss on labels (0: KD only)
    intermediate_layers: list = field(default_factory=list)  # [[student_layer, teacher_layer], ...] outputs
    intermediate_loss: str = "cosine"  # cosine | mse
    embedding_loss: bool = False  # also match the embedding outputs
    # teacher correction (Minitron follow-up): fine-tune the teacher on the distillation data first
    teacher_correction_steps: int = 0
    teacher_correction_lr: float = 1e-5
    # precision (GPU): bf16 training; FP8 with Transformer Engine
    bf16: Optional[bool] = None  # None: on with a GPU, off on CPU
    fp8_teacher: bool = False
    fp8_student: bool = False
    use_distributed_optimizer: Optional[bool] = None  # None: on with NCCL (gloo has no reduce-scatter)
    # bookkeeping
    log_every: int = 1
    eval_every: int = 0
    eval_samples: int = 16
    save_every: int = 500  # also saved: the last step, and on a stop signal (0: only those)
    keep_last: int = 2
    dataset_cache: Optional[str] = None
    sft_pack: bool = True  # SFT JSONL data: pack whole examples into seq_len windows (False: one per sample, padded)

    @classmethod
    def from_yaml(cls, path: Optional[str | Path] = None, **overrides) -> "TrainConfig":
        values = {}
        if path is not None:
            if not Path(path).is_file():
                raise ValueError(f"--config {path} does not exist; give a YAML file of TrainConfig fields "
                                 f"(see examples/)")
            try:
                values = yaml.safe_load(Path(path).read_text()) or {}
            except yaml.YAMLError as e:
                raise ValueError(f"--config {path} is not valid YAML: {' '.join(str(e).split())}") from None
            if not isinstance(values, dict):
                raise ValueError(f"--config {path}: a training config is a YAML mapping of TrainConfig fields")
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; valid ones: {sorted(known)}")
        missing = [k for k in ("student", "data", "out") if not values.get(k)]
        if missing:
            raise ValueError(f"missing training option(s) {missing} (in the YAML or on the command line)")
        if isinstance(values["data"], str):
            values["data"] = values["data"].split()
        cfg = cls(**values)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """Check every field before anything is loaded; messages name the field and its flag."""
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one of steps or tokens "
                             "(--steps / --tokens, or steps: / tokens: in the YAML)")
        at_least = {"steps": 1, "tokens": 1, "tp": 1, "pp": 1, "vpp": 1, "ep": 1, "seq_len": 1, "micro_batch_size": 1,
                    "global_batch_size": 1, "log_every": 1, "eval_samples": 1, "keep_last": 1, "warmup_steps": 0,
                    "eval_every": 0, "save_every": 0, "teacher_correction_steps": 0, "lr": 0, "min_lr": 0,
                    "weight_decay": 0, "clip_grad": 0, "ce_weight": 0, "teacher_correction_lr": 0}
        for name, low in at_least.items():
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value < low):
                hint = " (YAML reads 1e-4 as text: write 1.0e-4)" if isinstance(value, str) else ""
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be a number >= {low}, got {value!r}{hint}")
        from megatron_prune.runtime.stages import check_virtual_stages

        check_virtual_stages(self.pp, self.vpp, "pp (--pp)", "vpp (--vpp)")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr (--min-lr) {self.min_lr} is above lr (--lr) {self.lr}; the schedule decays "
                             f"from lr to min_lr")
        if not self.kd_tau > 0:
            raise ValueError(f"kd_tau (--kd-tau) must be > 0, got {self.kd_tau}")
        if self.kd_top_k is not None and self.kd_top_k < 1:
            raise ValueError(f"kd_top_k (--kd-top-k) must be >= 1, got {self.kd_top_k}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"global_batch_size (--global-batch-size) {self.global_batch_size} must be a multiple "
                             f"of micro_batch_size (--micro-batch-size) {self.micro_batch_size}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be adam or sgd, got {self.optimizer!r}")
        if self.kd_loss not in ("forward", "reverse", "topk"):
            raise ValueError(f"kd_loss must be forward, reverse or topk, got {self.kd_loss!r}")
        if self.kd_loss == "topk" and not self.kd_top_k and not self.teacher_logits:
            raise ValueError("kd_loss=topk needs kd_top_k (--kd-top-k K)")
        if self.teacher_logits:
            if self.teacher:
                raise ValueError("give --teacher (online KD) or --teacher-logits (offline KD from its file), not both")
            if self.kd_loss != "topk":
                raise ValueError("--teacher-logits holds the teacher's top-K only: pass --kd-loss topk (and "
                                 "--kd-top-k K up to the file's K; default: the file's K)")
            if self.intermediate_layers or self.embedding_loss or self.fp8_teacher or self.teacher_correction_steps:
                raise ValueError("intermediate/embedding losses, fp8_teacher and teacher correction run the teacher: "
                                 "use --teacher instead of --teacher-logits")
        if self.intermediate_loss not in ("cosine", "mse"):
            raise ValueError(f"intermediate_loss must be cosine or mse, got {self.intermediate_loss!r}")
        if self.teacher is None and (self.intermediate_layers or self.embedding_loss or self.fp8_teacher):
            raise ValueError("intermediate/embedding losses and fp8_teacher need a teacher")

    def train_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        return max(1, self.tokens // (self.global_batch_size * self.seq_len))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
