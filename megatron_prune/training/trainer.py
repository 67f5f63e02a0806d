"""The distillation trainer: a frozen teacher and a trained student on the same TP/PP groups.

megatron-core does the heavy lifting: its DDP (gradient buffers, all-reduce or reduce-scatter), its optimizer
(fp32 main weights under bf16, the distributed optimizer with NCCL), its LR schedule, its pipeline schedules
and its distributed checkpoints. This module wires them together, adds the KD losses, and keeps the run
resumable: every ``save_every`` steps, at the last step, and when a stop signal arrives (SIGTERM/SIGINT/SIGUSR1,
see runtime/stop.py), the student, the optimizer and the trainer state go to ``out/step_XXXXXXX``
atomically; a restarted run continues from the newest complete one.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_prune.runtime.device import on_gpu as _on_gpu
from megatron_prune.runtime.stop import StopRequested, stop_on_signals
from megatron_prune.training.config import TrainConfig

STEP_PREFIX = "step_"


def latest_step_dir(out: Path) -> Optional[Path]:
    """The newest complete step checkpoint in a run directory (unfinished writes are hidden .tmp dirs)."""
    from megatron_prune.checkpoint.megatron import METADATA_FILE

    steps = sorted(p for p in out.glob(f"{STEP_PREFIX}*") if (p / METADATA_FILE).is_file())
    return steps[-1] if steps else None


def _check_fp8(cfg: TrainConfig) -> None:
    from megatron_prune.model import transformer_engine_available

    if (cfg.fp8_teacher or cfg.fp8_student) and not transformer_engine_available():
        raise ValueError("FP8 needs an NVIDIA GPU (Hopper or newer) with Transformer Engine installed "
                         "(pip install -e .[gpu]); drop fp8_teacher/fp8_student to train without it")


def _fp8_overrides(enabled: bool, keep_weights_in_fp8: bool = False) -> dict:
    if not enabled:
        return {}
    return {"fp8": "hybrid", "fp8_recipe": "delayed", "fp8_param": keep_weights_in_fp8}


def _check_layout(cfg: TrainConfig, student, teacher) -> None:
    """Student and teacher split over TP x PP (x VPP), and the paired layers exist: before any weight is read
    (the Trainer is also built directly, without the pipelines' checks)."""
    from megatron_prune import inputs

    inputs.training_models(student, teacher, cfg.tp, cfg.pp, cfg.vpp, cfg.ep, cfg.seq_len)
    for pair in cfg.intermediate_layers:
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair)):
            raise ValueError(f"intermediate_layers entries are [student_layer, teacher_layer] pairs of layer "
                             f"indices, got {pair!r}")
        s_layer, t_layer = pair
        if not (0 <= s_layer < student.num_layers and 0 <= t_layer < teacher.num_layers):
            raise ValueError(f"intermediate_layers pair {list(pair)}: the student has layers "
                             f"0..{student.num_layers - 1} and the teacher 0..{teacher.num_layers - 1}; "
                             "use indices in range")


class Trainer:
    def __init__(self, cfg: TrainConfig):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from megatron_prune.checkpoint import load_into, read_meta, tokenizer_dir
        from megatron_prune.model import build_chunks
        from megatron_prune.runtime import init_distributed

        cfg.validate()
        _check_fp8(cfg)
        self.cfg = cfg
        self.layout = init_distributed(cfg.tp, cfg.pp, seed=cfg.seed, vpp=cfg.vpp, ep=cfg.ep)
        self.out = Path(cfg.out)
        on_gpu = _on_gpu()
        self.bf16 = cfg.bf16 if cfg.bf16 is not None else on_gpu
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        distributed_optimizer = cfg.use_distributed_optimizer if cfg.use_distributed_optimizer is not None else on_gpu
        self.dp = self.layout.dp
        per_dp = cfg.global_batch_size // self.dp
        if cfg.global_batch_size % (self.dp * cfg.micro_batch_size):
            raise ValueError(f"global_batch_size {cfg.global_batch_size} must be a multiple of micro_batch_size "
                             f"{cfg.micro_batch_size} x data-parallel size {self.dp}")
        self.num_microbatches = per_dp // cfg.micro_batch_size
        if cfg.vpp > 1 and self.num_microbatches % cfg.pp:
            raise ValueError(
                f"the interleaved schedule (--vpp {cfg.vpp}) needs the micro-batches per step and data-parallel rank "
                f"(global_batch_size / (micro_batch_size x DP) = {cfg.global_batch_size} / ({cfg.micro_batch_size} x "
                f"{self.dp}) = {self.num_microbatches}) to be a multiple of PP={cfg.pp}; set --global-batch-size to a "
                f"multiple of {cfg.micro_batch_size * self.dp * cfg.pp}")

        self.student_meta = read_meta(cfg.student)
        self.arch = self.student_meta.arch
        t_meta = read_meta(cfg.teacher) if cfg.teacher else None
        _check_layout(cfg, self.arch, t_meta.arch if t_meta else None)  # before any weight is loaded
        self.resume_from = latest_step_dir(self.out)
        # lists of model chunks: one per virtual pipeline stage (one without --vpp)
        from megatron_prune.inputs import sequence_parallel

        sp = sequence_parallel(cfg.tp)  # at TP > 1; the teacher follows
        self.student = build_chunks(self.arch, dtype=dtype, perform_initialization=False, sequence_parallel=sp,
                                    **_fp8_overrides(cfg.fp8_student))
        load_into(self.student, self.resume_from or cfg.student, self.arch)
        self.teacher = None
        if cfg.teacher:
            self.teacher_arch = t_meta.arch
            self.teacher = build_chunks(t_meta.arch, dtype=dtype, perform_initialization=False, sequence_parallel=sp,
                                        **_fp8_overrides(cfg.fp8_teacher, keep_weights_in_fp8=cfg.fp8_teacher))
            load_into(self.teacher, cfg.teacher, t_meta.arch)
        self.teacher_file = None  # offline KD: the teacher's top-K log-probs from a file (distill/offline.py)
        if cfg.teacher_logits:
            from megatron_prune.distill.offline import open_for_run

            self.teacher_file = open_for_run(cfg, self.arch.vocab_size)

        ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                   use_distributed_optimizer=distributed_optimizer)
        self.ddp = [DistributedDataParallel(chunk.config, ddp_config, chunk, disable_bucketing=i > 0)  # megatron's way
                    for i, chunk in enumerate(self.student)]
        self.proj = None
        if cfg.intermediate_layers or cfg.embedding_loss:
            from megatron_prune.distill.losses import hidden_projection

            self.proj = hidden_projection(self.arch.hidden_size, self.teacher_arch.hidden_size,
                                          device=self.layout.device, dtype=torch.float32)
            self.proj_opt = torch.optim.AdamW(self.proj.parameters(), lr=cfg.lr, weight_decay=0.0)
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(optimizer=cfg.optimizer, lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
                            adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, clip_grad=cfg.clip_grad,
                            bf16=self.bf16, params_dtype=dtype, use_distributed_optimizer=distributed_optimizer),
            self.ddp,
        )
        self.steps = cfg.train_steps()
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr,
            # megatron: warmup < decay
            lr_warmup_steps=min(cfg.warmup_steps, self.steps - 1), lr_decay_steps=self.steps,
            lr_decay_style=cfg.lr_decay_style, start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
            wd_incr_steps=self.steps, wd_incr_style="constant")
        self.step = 0
        self.history: list[dict] = []
        if self.resume_from is not None:
            self._load_training_state(self.resume_from)

        if self.teacher is not None:
            from megatron_prune.distill.pair import EMBEDDING, DistillationPair

            pairs = (([(EMBEDDING, EMBEDDING)] if cfg.embedding_loss else [])
                     + [tuple(p) for p in cfg.intermediate_layers])
            self.model = [DistillationPair(s, t, self.arch.hidden_size, self.teacher_arch.hidden_size, pairs)
                          for s, t in zip(self.ddp, self.teacher)]
        else:
            self.model = list(self.ddp)
        config = self.model[0].config  # the one the schedules read
        config.no_sync_func = self.ddp[0].no_sync if len(self.ddp) == 1 else [d.no_sync for d in self.ddp]
        config.grad_scale_func = self.optimizer.scale_loss
        from megatron.core.distributed import finalize_model_grads

        config.finalize_model_grads_func = lambda _models, *a, **k: finalize_model_grads(self.ddp, *a, **k)

        self.dataset = self._build_dataset(tokenizer_dir(cfg.student))
        if self.teacher_file is not None:
            self.teacher_file.check_dataset(self.dataset, self.steps * cfg.global_batch_size)
        self.valid_windows = None
        if cfg.valid_data and cfg.eval_every:
            from megatron_prune.data import fixed_length_windows

            self.valid_windows = fixed_length_windows(cfg.valid_data, cfg.seq_len, max_windows=cfg.eval_samples)
        self.writer = None
        self._ps = ps

    def _build_dataset(self, tok_dir):
        """SFT JSONL files (answer-only loss mask, chat template) or a blend of Megatron indexed datasets."""
        from megatron_prune.data.sft import build_sft_dataset, is_sft_data

        cfg = self.cfg
        self.sft = is_sft_data(cfg.data)
        if self.sft:
            if tok_dir is None:
                raise ValueError(f"SFT data is rendered with the checkpoint's chat template, but {cfg.student} "
                                 f"carries no tokenizer")
            return build_sft_dataset(cfg.data, tok_dir, cfg.seq_len, seed=cfg.seed, pack=cfg.sft_pack)
        eod = 0
        if tok_dir is not None:
            import transformers

            eod = transformers.AutoTokenizer.from_pretrained(tok_dir).eos_token_id or 0
        from megatron_prune.data.blend import build_train_dataset

        num_samples = self.steps * cfg.global_batch_size
        if self.teacher_file is not None:  # the file's dataset, sample for sample
            num_samples = self.teacher_file.meta.num_samples
        return build_train_dataset(cfg.data, cfg.seq_len, num_samples, cfg.seed, eod,
                                   cache_dir=cfg.dataset_cache or (self.out / "dataset_cache"))

    # ---------------------------------------------------------------------------------------- state
    def _trainer_state(self) -> dict:
        return {"step": self.step, "scheduler": self.scheduler.state_dict(), "history": self.history,
                "config": self.cfg.to_dict()}

    def _load_training_state(self, ckpt: Path) -> None:
        from megatron.core import dist_checkpointing

        from megatron_prune.checkpoint.megatron import sharded_model_state
        from megatron_prune.checkpoint.writer import read_sharded

        state = {"optimizer": self.optimizer.sharded_state_dict(sharded_model_state(self.student), is_loading=True)}
        loaded = read_sharded(state, ckpt)
        self.optimizer.load_state_dict(loaded["optimizer"])
        common = dist_checkpointing.load_common_state_dict(str(ckpt))
        trainer = common["trainer"]
        self.step = trainer["step"]
        self.scheduler.load_state_dict(trainer["scheduler"])
        self.history = trainer["history"]
        if self.proj is not None and "proj" in common:
            self.proj.load_state_dict(common["proj"]["weights"])
            self.proj_opt.load_state_dict(common["proj"]["optimizer"])

    def save(self) -> Path:
        from megatron_prune.checkpoint import save_checkpoint, tokenizer_dir
        from megatron_prune.checkpoint.megatron import sharded_model_state
        from megatron_prune.runtime import is_rank0, log0

        extra = {"optimizer": self.optimizer.sharded_state_dict(sharded_model_state(self.student)),
                 "trainer": self._trainer_state()}
        if self.proj is not None:
            extra["proj"] = {"weights": self.proj.state_dict(), "optimizer": self.proj_opt.state_dict()}
        path = self.out / f"{STEP_PREFIX}{self.step:07d}"
        provenance = {"parent": str(Path(self.cfg.student).absolute()),
                      "teacher": self.cfg.teacher or self.cfg.teacher_logits,
                      "step": self.step, "tokens": self.step * self.cfg.global_batch_size * self.cfg.seq_len,
                      "mode": ("distill" if self.cfg.teacher or self.cfg.teacher_logits
                               else ("sft" if self.sft else "train"))}
        save_checkpoint(self.student, self.arch, path, tokenizer_src=tokenizer_dir(self.cfg.student),
                        provenance=provenance, extra_state=extra, overwrite=True)
        log0(f"saved step {self.step} to {path}")
        if is_rank0():  # keep the newest keep_last step checkpoints
            steps = sorted(self.out.glob(f"{STEP_PREFIX}*"))
            for old in steps[: max(0, len(steps) - self.cfg.keep_last)]:
                shutil.rmtree(old)
        return path

    # ---------------------------------------------------------------------------------------- step
    def _microbatches(self) -> list[dict]:
        from megatron_prune.data.blend import collate

        cfg = self.cfg
        per_dp = cfg.global_batch_size // self.dp
        start = self.step * cfg.global_batch_size + self.layout.dp_rank * per_dp
        items = [self.dataset[start + i] for i in range(per_dp)]
        device = self.layout.device
        batches = [{k: v.to(device) for k, v in collate(items[i: i + cfg.micro_batch_size]).items()}
                   for i in range(0, per_dp, cfg.micro_batch_size)]
        if self.teacher_file is not None and self.layout.is_last_stage:
            self.teacher_file.attach(batches, start, cfg.kd_top_k)
        return batches

    def _loss(self, output, batch: dict, hidden: dict):
        from megatron_prune.distill.losses import (
            combine_losses,
            intermediate_state_loss,
            kd_logits_loss,
            masked_token_mean,
        )
        from megatron_prune.forward import token_losses

        cfg, mask = self.cfg, batch["loss_mask"]
        if self.teacher is None and self.teacher_file is None:
            lm = masked_token_mean(token_losses(output, batch["labels"], self.arch), mask)
            return lm, {"loss": lm.detach().clone(), "lm": lm.detach().clone()}
        if self.teacher_file is not None:  # the stored top-K stands in for the teacher's logits
            from megatron_prune.distill.offline import offline_topk_kl

            s_logits = output
            kd = offline_topk_kl(s_logits, batch["teacher_logprobs"], batch["teacher_ids"], cfg.kd_tau)
        else:
            s_logits, t_logits = output
            kd = kd_logits_loss(s_logits, t_logits, cfg.kd_loss, cfg.kd_tau, top_k=cfg.kd_top_k,
                                vocab_size=self.arch.vocab_size)
        lm = masked_token_mean(token_losses(s_logits, batch["labels"], self.arch), mask)
        kd = masked_token_mean(kd, mask)
        is_loss = None
        if self.proj is not None:
            is_loss = intermediate_state_loss(hidden["student"], hidden["teacher"], self.proj, cfg.intermediate_loss,
                                              mask)
        total, alpha = combine_losses(kd, lm * cfg.ce_weight if cfg.ce_weight else None, is_loss)
        # clones: megatron's schedule divides the returned loss by the number of micro-batches in place
        logs = {"loss": total.detach().clone(), "kd": kd.detach().clone(), "lm": lm.detach().clone()}
        if is_loss is not None:
            logs["is"], logs["alpha"] = is_loss.detach().clone(), alpha.detach().clone()
        return total, logs

    def train_step(self) -> dict:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from megatron_prune.forward import broadcast_from_last_stage, position_ids_like

        cfg = self.cfg
        for chunk, ddp in zip(self.model, self.ddp):
            chunk.train()
            ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        if self.proj is not None:
            self.proj_opt.zero_grad()

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            hidden = {"student": [], "teacher": []}  # the paired states, filled by DistillationPair (last stage)
            kwargs = {"hidden": hidden} if self.proj is not None else {}
            out = model(batch["tokens"], position_ids_like(batch["tokens"]), None, **kwargs)
            return out, lambda output: self._loss(output, batch, hidden)

        microbatches = self._microbatches()
        # the interleaved schedule takes one iterator per model chunk; each chunk sees every micro-batch
        data = iter(microbatches) if len(self.model) == 1 else [iter(microbatches) for _ in self.model]
        logs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=data, model=self.model,
            num_microbatches=self.num_microbatches, seq_length=cfg.seq_len, micro_batch_size=cfg.micro_batch_size,
            forward_only=False)
        if self.proj is not None:
            # the projection is replicated on every rank and used on the last stage only: sum its gradient over
            # the pipeline (other stages add zeros), average it over data parallelism; every copy stays equal
            for p in self.proj.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                if self.layout.pp > 1:
                    dist.all_reduce(p.grad, group=self._ps.get_pipeline_model_parallel_group())
                if self.dp > 1:
                    dist.all_reduce(p.grad, group=self._ps.get_data_parallel_group())
                    p.grad /= self.dp
        moe_aux = self._moe_aux_loss()
        ok, grad_norm, _ = self.optimizer.step()
        if self.proj is not None:
            self.proj_opt.step()
        self.scheduler.step(increment=1)
        self.step += 1
        # mean over micro-batches (last stage), then over data-parallel ranks, then to every stage
        record = {}
        if self._ps.is_pipeline_last_stage():
            keys = logs[0].keys() if logs else []
            vec = (torch.stack([torch.stack([log[k].float() for log in logs]).mean() for k in keys]) if logs
                   else torch.zeros(0))
            if self.dp > 1:
                dist.all_reduce(vec, group=self._ps.get_data_parallel_group())
                vec /= self.dp
            record = {k: float(v) for k, v in zip(keys, vec)}
        record = broadcast_from_last_stage(record)
        if moe_aux is not None:
            record["moe_aux"] = moe_aux
        record.update(step=self.step, lr=self.optimizer.param_groups[0]["lr"],
                      grad_norm=float(grad_norm) if grad_norm is not None else float("nan"), skipped=not ok)
        return record

    def _moe_aux_loss(self) -> Optional[float]:
        """The student's router load-balancing loss of this step, logged apart from the KD loss: megatron adds its
        gradient inside the routers (coefficient ``moe_aux_loss_coeff``, scaled like the main loss) and records
        aux / coeff per layer; this is coeff x the sum over layers, the mean over micro-batches and data-parallel
        ranks. None for a dense student or a zero coefficient."""
        from megatron.core.transformer.moe import moe_utils

        coeff = self.arch.moe_aux_loss_coeff if self.arch.num_experts is not None else 0.0
        tracker = moe_utils.get_moe_layer_wise_logging_tracker()
        if not coeff or "load_balancing_loss" not in tracker:
            return None
        moe_utils.reduce_aux_losses_tracker_across_ranks(["load_balancing_loss"])
        value = float(tracker["load_balancing_loss"]["values"].sum()) * coeff / self.num_microbatches
        moe_utils.clear_aux_losses_tracker()
        return value

    def validate(self) -> float:
        from megatron_prune.evaluation.lm_loss import lm_loss

        return lm_loss(self.student, self.arch, self.valid_windows, self.cfg.micro_batch_size, desc=None).lm_loss

    # ---------------------------------------------------------------------------------------- loop
    def run(self) -> list[dict]:
        from megatron_prune.runtime import is_rank0, log0
        from megatron_prune.runtime.progress import progress

        cfg = self.cfg
        if is_rank0():
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(__import__("yaml").safe_dump(cfg.to_dict(), sort_keys=False))
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.out / "tensorboard"))
        what = (f"distilling {cfg.teacher or cfg.teacher_logits} -> {cfg.student}" if cfg.teacher or cfg.teacher_logits
                else f"{'SFT of' if self.sft else 'training'} {cfg.student}")
        log0(f"{what}: {self.steps} steps x {cfg.global_batch_size} x {cfg.seq_len} tokens, TP={cfg.tp} PP={cfg.pp} "
             + (f"VPP={cfg.vpp} " if cfg.vpp > 1 else "") + f"DP={self.dp}"
             + (f", resuming at step {self.step} from {self.resume_from}" if self.resume_from else ""))
        if self.valid_windows is not None and self.step == 0:
            self._log({"step": 0, "valid_lm": self.validate()})
        bar = progress(self.steps, "train", unit="step")
        bar.update(self.step)
        tokens_per_step = cfg.global_batch_size * cfg.seq_len
        saved = self.resume_from
        with stop_on_signals() as stop:
            while self.step < self.steps:
                t0 = time.time()
                record = self.train_step()
                record["tokens_per_s"] = tokens_per_step / max(time.time() - t0, 1e-9)
                if self.valid_windows is not None and (self.step % cfg.eval_every == 0 or self.step == self.steps):
                    record["valid_lm"] = self.validate()
                self._log(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                if self.step == self.steps or (cfg.save_every and self.step % cfg.save_every == 0):
                    saved = self.save()
                signal_name = stop.agreed()  # every rank, every step: they stop together
                if signal_name is not None:
                    if saved is None or saved.name != f"{STEP_PREFIX}{self.step:07d}":
                        saved = self.save()
                    bar.close()
                    raise StopRequested(signal_name, saved, self.step)
        bar.close()
        if self.writer is not None:
            self.writer.close()
        if saved is None or saved.name != f"{STEP_PREFIX}{self.step:07d}":  # a run finished before: say where
            saved = latest_step_dir(self.out)
        log0(f"final model (step {self.step}): {saved}")
        return self.history

    def _log(self, record: dict) -> None:
        from megatron_prune.runtime import is_rank0, log0

        self.history.append(record)
        if not is_rank0():
            return
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(k if k.startswith("valid") else f"train/{k}", v, record["step"])
        if record["step"] % max(self.cfg.log_every, 1) == 0 or "valid_lm" in record:
            log0(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()}))


def correct_teacher(cfg: TrainConfig) -> Path:
    """Fine-tune the teacher with the LM loss on the distillation data for ``teacher_correction_steps``
    (into ``out/teacher-correction``; resumable, and skipped once done); returns the corrected checkpoint."""
    import dataclasses

    from megatron_prune.runtime import log0

    out = Path(cfg.out) / "teacher-correction"
    done = latest_step_dir(out)
    if done is None or int(done.name[len(STEP_PREFIX):]) < cfg.teacher_correction_steps:
        log0(f"teacher correction: {cfg.teacher_correction_steps} steps of LM-loss training of {cfg.teacher}")
        steps = cfg.teacher_correction_steps
        Trainer(dataclasses.replace(
            cfg, student=cfg.teacher, teacher=None, out=str(out), steps=steps, tokens=None,
            lr=cfg.teacher_correction_lr, min_lr=cfg.teacher_correction_lr / 10, warmup_steps=cfg.warmup_steps,
            save_every=steps, keep_last=1, eval_every=0, teacher_correction_steps=0, ce_weight=0.0,
            intermediate_layers=[], embedding_loss=False, fp8_teacher=False, fp8_student=False)).run()
        done = latest_step_dir(out)
    return done


def train(cfg: TrainConfig) -> list[dict]:
    """Run (or resume) a distillation / training run; returns the per-step records.

    With ``teacher_correction_steps``, the teacher is first fine-tuned on the same data and the student is
    distilled from the corrected teacher.
    """
    import dataclasses

    if cfg.teacher and cfg.teacher_correction_steps:
        cfg = dataclasses.replace(cfg, teacher=str(correct_teacher(cfg)))
    return Trainer(cfg).run()
