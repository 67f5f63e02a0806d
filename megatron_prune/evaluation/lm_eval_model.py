"""A megatron-prune checkpoint as an lm-evaluation-harness model ("megatron-prune"), at any TP/PP (and DP).

lm-eval sees one model per data-parallel replica: ``rank``/``world_size`` are the DP rank and size, so its
evaluator splits the documents over replicas, and every rank of a replica (its TP/PP ranks) gets the same
requests and runs the same forwards. Results exist on the last pipeline stage and are broadcast to every
stage, so all ranks return the same answers (lm-eval keeps rank 0's).

- ``loglikelihood``: requests sorted by length and batched (right padding: a causal model never attends to
  the pads after a row's last real token); the continuation's log-probs come from megatron's vocab-parallel
  cross entropy and ``is_greedy`` from a vocab-parallel argmax, so the vocab is never gathered.
- ``loglikelihood_rolling``: lm-eval's own rolling windows of ``max_length`` tokens, scored as above.
- ``generate_until``: the KV-cached generation engine (greedy or sampled), stopping at the EOS token or as
  soon as a stop string appears in the decoded text; the text is cut before the first stop string.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from megatron_prune.forward import broadcast_from_last_stage, run_forward, token_losses, vocab_parallel_argmax

MODEL_NAME = "megatron-prune"


def _dp_group():
    """The data-parallel group, or None outside a process group."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized() or not ps.model_parallel_is_initialized():
        return None
    return ps.get_data_parallel_group()


@register_model(MODEL_NAME)
class MegatronLM(TemplateLM):
    """lm-eval model over a megatron-core GPTModel: pass ``ckpt`` (loaded here at ``tp`` x ``pp``), or an already
    loaded ``model``/``arch`` with a Hugging Face ``tokenizer``."""

    def __init__(self, ckpt: Optional[str] = None, *, model=None, arch=None, tokenizer=None, tp: int = 1,
                 pp: int = 1, dtype: Optional[str] = None, batch_size: int | str = 8,
                 max_length: Optional[int] = None, max_gen_toks: int = 256, add_bos_token: bool = False,
                 **_unused) -> None:
        super().__init__()
        if model is None:
            if ckpt is None:
                raise ValueError(f"{MODEL_NAME}: give a checkpoint (ckpt=PATH) or a loaded model")
            model, arch, tokenizer = load_for_lm_eval(ckpt, int(tp), int(pp), dtype)
        if tokenizer is None:
            raise ValueError(f"{MODEL_NAME}: a tokenizer is needed (the checkpoint has no tokenizer/ folder)")
        if str(batch_size) == "auto" or int(batch_size) < 1:
            raise ValueError(f"{MODEL_NAME}: batch_size must be a positive integer, got {batch_size!r}")
        self.model, self.arch, self.tokenizer = model, arch, tokenizer
        self.model.eval()
        self.ckpt = None if ckpt is None else str(ckpt)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or arch.max_position_embeddings)
        if not 1 < self.max_length <= arch.max_position_embeddings:
            raise ValueError(f"{MODEL_NAME}: max_length {self.max_length} must be in [2, "
                             f"{arch.max_position_embeddings}] (the model's positions)")
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = str(add_bos_token).lower() in ("1", "true", "yes")
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{MODEL_NAME}: the tokenizer has no EOS token; lm-eval needs one (end of text)")
        self._device = next(model.parameters()).device
        group = _dp_group()
        self._group = group
        self._rank = dist.get_rank(group) if group is not None else 0
        self._world_size = dist.get_world_size(group) if group is not None else 1

    # ---- tokens -------------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on (as lm-eval's HF model): BOS when there is one, else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # ---- data parallelism, as lm-eval's evaluator asks for it ----------------------------------------------
    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self._group)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self._world_size == 1:
            return [obj]
        out = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, out, dst=dist.get_global_rank(self._group, dst), group=self._group)
        return out

    def barrier(self) -> None:
        if self._world_size > 1:
            dist.barrier(group=self._group)

    def get_model_info(self) -> dict:
        return {"checkpoint": self.ckpt, "arch": self.arch.describe(), "max_length": self.max_length}

    # ---- scoring ------------------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        from megatron_prune.runtime import is_rank0

        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not is_rank0())

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probs, whether greedy decoding gives the continuation) per request of
        ``((context, continuation), context_ids, continuation_ids)``; a context longer than ``max_length`` is
        cut from the left, as lm-eval's HF model does."""
        from megatron_prune.runtime.progress import progress

        rows = []
        for _, ctx, cont in requests:
            if len(cont) > self.max_length:
                raise ValueError(f"a continuation of {len(cont)} tokens exceeds max_length {self.max_length}")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            rows.append((whole[:-1], whole[1:], len(cont)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # batches of similar length
        results: list = [None] * len(rows)
        bar = progress(len(rows), "loglikelihood", unit="req") if not disable_tqdm else None
        for k in range(0, len(order), self.batch_size):
            idx = order[k: k + self.batch_size]
            for i, r in zip(idx, self._score_batch([rows[i] for i in idx])):
                results[i] = r
            if bar:
                bar.update(len(idx))
        if bar:
            bar.close()
        return results

    def _score_batch(self, rows: list[tuple[list[int], list[int], int]]) -> list[tuple[float, bool]]:
        """One forward of right-padded rows (inputs, labels, continuation length) through all stages."""
        b, length = len(rows), max(len(r[0]) for r in rows)
        tokens = torch.zeros(b, length, dtype=torch.long)
        labels = torch.zeros(b, length, dtype=torch.long)
        scored = torch.zeros(b, length, dtype=torch.bool)
        for i, (inp, lab, n_cont) in enumerate(rows):
            tokens[i, : len(inp)] = torch.tensor(inp)
            labels[i, : len(lab)] = torch.tensor(lab)
            scored[i, len(inp) - n_cont: len(inp)] = True
        batch = {"tokens": tokens.to(self._device), "labels": labels.to(self._device), "scored": scored}

        def on_output(logits, batch):
            logp = -token_losses(logits, batch["labels"], self.arch).double().cpu()
            hit = (vocab_parallel_argmax(logits, self.arch) == batch["labels"]).cpu()
            return [(float(logp[i][m].sum()), bool(hit[i][m].all())) for i, m in enumerate(batch["scored"])]

        out = run_forward(self.model, [batch], 1, length, b, on_output)
        return broadcast_from_last_stage(out[0] if out else None)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each document, over lm-eval's rolling windows of ``max_length`` tokens (each
        window scores the tokens the previous ones did not, with the rest of the window as context)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logp, _) in zip(owner, scores):
            totals[i] += logp
        return totals

    # ---- generation ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generated text per ``(context, gen_kwargs)`` request, cut before the first stop string (``until``,
        plus the EOS token); greedy unless ``do_sample`` (then temperature/top_p/top_k, seeded per request)."""
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        from megatron_prune.generation import SamplingParams
        from megatron_prune.generation.engine import check_model_for_generation, generate_batch
        from megatron_prune.runtime.progress import progress

        check_model_for_generation(self.model)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        results: list = [None] * len(requests)
        bar = progress(len(requests), "generate_until", unit="req") if not disable_tqdm else None
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        for members in groups.values():
            kwargs = normalize_gen_kwargs(dict(requests[members[0]].args[1]), self.max_gen_toks)
            until = [s for s in handle_stop_sequences(kwargs.pop("until", None), eos=eos_text) if s]
            max_new = int(kwargs.pop("max_gen_toks"))
            if max_new >= self.max_length:
                raise ValueError(f"max_gen_toks {max_new} leaves no room for a prompt in max_length {self.max_length}")
            temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
            params = SamplingParams(temperature=temperature, top_p=float(kwargs.get("top_p") or 1.0),
                                    top_k=int(kwargs.get("top_k") or 0), seed=int(kwargs.get("seed") or 0),
                                    max_new_tokens=max_new)
            prompts = {}
            for i in members:
                ids = self.tok_encode(requests[i].args[0])[-(self.max_length - max_new):]
                prompts[i] = ids or [self.prefix_token_id]
            tail = 4 * max((len(s) for s in until), default=1) + 2  # tokens that can hold a stop string

            def stop_when(new: list[int], tail: int = tail, until: list[str] = until) -> bool:
                text = self.tok_decode(new[-tail:], skip_special_tokens=False)
                return any(s in text for s in until)

            order = sorted(members, key=lambda i: -len(prompts[i]))
            for k in range(0, len(order), self.batch_size):
                idx = order[k: k + self.batch_size]
                outs = generate_batch(self.model, self.arch, [prompts[i] for i in idx], idx, params,
                                      stop_token_ids=[self.eot_token_id], pad_token_id=pad, stop_when=stop_when)
                for i, new in zip(idx, outs):
                    if new and new[-1] == self.eot_token_id:
                        new = new[:-1]
                    results[i] = cut_at_stop(self.tok_decode(new), until)
                if bar:
                    bar.update(len(idx))
        if bar:
            bar.close()
        return results


def cut_at_stop(text: str, until: list[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    for s in until:
        text = text.split(s)[0]
    return text


def load_for_lm_eval(ckpt: str | Path, tp: int = 1, pp: int = 1, dtype: Optional[str] = None):
    """(model, arch, tokenizer) of a checkpoint at ``tp`` x ``pp``; megatron's local attention (generation needs
    its explicit padding mask)."""
    import transformers

    from megatron_prune.checkpoint import load_model, tokenizer_dir
    from megatron_prune.runtime import init_distributed

    tok_dir = tokenizer_dir(ckpt)
    if tok_dir is None:
        raise ValueError(f"{ckpt} carries no tokenizer/ folder; lm-eval tasks are text and need the checkpoint's "
                         "tokenizer (convert from a Hugging Face directory or GGUF that has one)")
    init_distributed(tp, pp)
    model, meta = load_model(ckpt, dtype=getattr(torch, dtype) if dtype else None, use_te=False)
    return model, meta.arch, transformers.AutoTokenizer.from_pretrained(str(tok_dir))
