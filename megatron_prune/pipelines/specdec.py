"""`megatron-prune specdec`: a (pruned) draft speeds up a target; acceptance and speed-up per k."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from megatron_prune import inputs
from megatron_prune.runtime.stop import stop_on_signals


def check_specdec(target_ckpt, draft_ckpt, prompts_file, ks: Sequence[int], tp: int, pp: int, chat: bool = True,
                  out=None, limit: Optional[int] = None) -> None:
    """Every input of `specdec`, before any process group, tokenizer or weight: both models shard at tp x pp
    and share one vocabulary (the target verifies the draft's token ids)."""
    from megatron_prune.checkpoint import tokenizer_dir
    from megatron_prune.checkpoint.outputs import check_output_path

    inputs.layout(tp, pp)
    bad = [k for k in ks if k < 1]
    if not ks or bad:
        raise inputs.InputError(f"--k {','.join(map(str, ks))}: every draft length must be >= 1 (tokens the draft "
                                f"proposes per target step), e.g. --k 1,2,4")
    inputs.positive("--limit", limit)
    target = inputs.checkpoint(target_ckpt, "--target")
    draft = inputs.checkpoint(draft_ckpt, "--draft")
    inputs.checkpoint_fits(target, tp, pp, "--target")
    inputs.checkpoint_fits(draft, tp, pp, "--draft", main=False)
    if draft.arch.vocab_size != target.arch.vocab_size:
        raise inputs.InputError(f"--draft {draft_ckpt} has a vocabulary of {draft.arch.vocab_size} tokens, --target "
                                f"{target_ckpt} one of {target.arch.vocab_size}: the target verifies the draft's "
                                f"token ids, so both need the same tokenizer (e.g. a draft pruned from the target)")
    inputs.prompts(prompts_file, "--prompts", target.arch.vocab_size, tokenizer_dir(target_ckpt), chat)
    if out is not None:
        check_output_path(out, {"target checkpoint": target_ckpt, "draft checkpoint": draft_ckpt,
                                "prompts file": prompts_file})
        inputs.output(out, "--out", overwrite=None, kind="file")


@stop_on_signals(immediate=True)  # a measurement has nothing to resume: a stop ends it, nothing is written
def specdec(target_ckpt, draft_ckpt, prompts_file, ks: Sequence[int] = (1, 2, 4), params=None, tp: int = 1,
            pp: int = 1, chat: bool = True, out: Optional[str] = None, limit: Optional[int] = None) -> dict:
    """Run the target alone, then speculative decoding for each k, on the same prompts (the first ``limit``);
    report per k."""
    from megatron_prune.checkpoint import load_model
    from megatron_prune.generation import SamplingParams
    from megatron_prune.generation.prompts import stop_token_ids
    from megatron_prune.generation.speculative import SpecStats, speculative_generate, target_alone
    from megatron_prune.pipelines.generate import encode_file, load_tokenizer
    from megatron_prune.runtime import init_distributed, is_rank0, log0
    from megatron_prune.runtime.progress import progress
    check_specdec(target_ckpt, draft_ckpt, prompts_file, ks, tp, pp, chat, out, limit)
    params = params or SamplingParams()
    tokenizer = load_tokenizer(target_ckpt)
    _, prompts = encode_file(prompts_file, tokenizer, chat)
    prompts = prompts[:limit]
    stops = stop_token_ids(tokenizer)
    init_distributed(tp, pp)
    target, tmeta = load_model(target_ckpt, use_te=False)
    draft, dmeta = load_model(draft_ckpt, use_te=False)
    log0(f"target {tmeta.arch.describe()}\ndraft  {dmeta.arch.describe()}")
    baseline_s, baseline_tokens, reference = 0.0, 0, []
    bar = progress(len(prompts) * (1 + len(ks)), "specdec", unit="prompt")
    for i, p in enumerate(prompts):
        o, s = target_alone(target, tmeta.arch, p, params, stops, index=i)
        reference.append(o)
        baseline_s += s
        baseline_tokens += len(o)
        bar.update()
    report = {"target_alone": {"new_tokens": baseline_tokens, "seconds": baseline_s,
                               "tokens_per_s": baseline_tokens / max(baseline_s, 1e-9)}, "k": {}}
    for k in ks:
        total, same = SpecStats(k=k), 0
        for i, p in enumerate(prompts):
            o, st = speculative_generate(target, tmeta.arch, draft, dmeta.arch, p, k, params, stops, index=i)
            total.add(st)
            same += o == reference[i]
            bar.update()
        row = total.summary()
        row["speedup"] = (total.new_tokens / max(total.seconds, 1e-9)) / report["target_alone"]["tokens_per_s"]
        if params.greedy:
            row["equals_target_greedy"] = same == len(prompts)
        report["k"][k] = row
        log0(f"k={k}: acceptance {row['acceptance_rate']:.3f}, mean accepted length {row['mean_accepted_length']:.2f}, "
             f"speed-up {row['speedup']:.2f}x")
    bar.close()
    if out and is_rank0():
        from megatron_prune.checkpoint.outputs import write_json_atomic

        write_json_atomic(Path(out), report)
    return report
