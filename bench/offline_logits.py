"""Offline logit distillation: file size per token next to full logits, and the teacher time it saves (issue 12).

    python bench/offline_logits.py            # teacher 8 x 512 (vocab 49152, SmolLM2's), student 4 x 256, seq 256
    python bench/offline_logits.py --quick    # smaller teacher and sequence, about a minute

Three tables:

1. bytes per token, analytically, for the SmolLM2 (49152) and Llama-3 (128256) vocabularies and K in 8/32/128:
   the stored arrays (K log-probs + K packed ids + the input token) against one fp16/bf16 logit row (2 x V).
2. the same, measured on disk (deflate-compressed .npz) for a random-weight teacher with vocab 49152, next to
   its full fp16 logits for the same samples saved the same way (np.savez_compressed).
3. seconds per training step: online top-K distillation (teacher forward in the step) against offline
   (`distill --teacher-logits`), same student, data and batch; the real trainer, medians over alternating runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import run_ranks, write_token_dataset  # noqa: E402

KS = (8, 32, 128)


def _archs(quick: bool):
    from megatron_prune.arch import ModelArch

    teacher = ModelArch(num_layers=4 if quick else 8, hidden_size=256 if quick else 512,
                        ffn_hidden_size=704 if quick else 1408, num_attention_heads=8, num_query_groups=4,
                        vocab_size=49152)
    student = teacher.replace(num_layers=teacher.num_layers // 2, hidden_size=teacher.hidden_size // 2,
                              ffn_hidden_size=teacher.ffn_hidden_size // 2)
    return teacher, student


def _make(root: str, quick: bool) -> None:
    from megatron_prune.checkpoint import save_checkpoint
    from megatron_prune.model import build_model
    from megatron_prune.runtime import init_distributed

    init_distributed(1, 1)
    teacher, student = _archs(quick)
    for name, arch in (("teacher", teacher), ("student", student)):
        save_checkpoint(build_model(arch), arch, Path(root) / name)
    write_token_dataset(Path(root) / "data", num_docs=100, doc_len=1000, vocab=teacher.vocab_size)
    print(f"teacher: {teacher.describe()}\nstudent: {student.describe()}")


def _write(root: str, out: str, k: int, samples: int, seq_len: int) -> float:
    from megatron_prune.pipelines.teacher_logits import teacher_logits

    t0 = time.perf_counter()
    teacher_logits(f"{root}/teacher", [f"{root}/data"], out, seq_len=seq_len, top_k=k, samples=samples,
                   dtype="float16", micro_batch_size=2)
    return time.perf_counter() - t0


def _full_logits_bytes(root: str, out: str, samples: int, seq_len: int) -> int:
    """The teacher's full fp16 logits for the same samples, saved the way the chunks are (np.savez_compressed)."""
    import numpy as np
    import torch

    from megatron_prune.checkpoint import load_model
    from megatron_prune.data.blend import build_train_dataset, collate
    from megatron_prune.forward import position_ids_like
    from megatron_prune.runtime import init_distributed

    init_distributed(1, 1)
    model, meta = load_model(f"{root}/teacher")
    ds = build_train_dataset([f"{root}/data"], seq_len, samples, 1234, 0, cache_dir=f"{root}/cache")
    tokens = collate([ds[i] for i in range(samples)])["tokens"]
    with torch.no_grad():
        logits = torch.cat([model(t, position_ids_like(t), None) for t in tokens.split(2)])
    np.savez_compressed(out, logits=logits[..., : meta.arch.vocab_size].half().numpy())
    return Path(out).stat().st_size


def _time_steps(root: str, logits_dir, k: int, steps: int, seq_len: int, gbs: int) -> list[float]:
    from megatron_prune.training.config import TrainConfig
    from megatron_prune.training.trainer import Trainer

    cfg = TrainConfig(student=f"{root}/student", teacher=None if logits_dir else f"{root}/teacher",
                      teacher_logits=logits_dir, data=[f"{root}/data"], kd_loss="topk", kd_top_k=k,
                      out=f"{root}/run_{'offline' if logits_dir else 'online'}_{time.time_ns()}", seq_len=seq_len,
                      micro_batch_size=gbs // 2, global_batch_size=gbs, steps=steps + 1, lr=1e-4,
                      dataset_cache=f"{root}/cache")
    trainer = Trainer(cfg)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
    return times[1:]  # the first step warms up


def _analytic_table() -> None:
    from megatron_prune.distill.offline import index_bytes, index_kind

    print("\n1. bytes per token (uncompressed): top-K file (fp16 log-probs + packed ids + input token) vs full "
          "fp16/bf16 logits")
    print("| vocab | ids | full logits | " + " | ".join(f"K={k}" for k in KS) + " |")
    print("|---|---|---|" + "---|" * len(KS))
    for name, vocab in (("SmolLM2", 49152), ("Llama-3", 128256)):
        kind = index_kind(vocab)
        full = 2 * vocab
        cells = []
        for k in KS:
            b = k * (2 + index_bytes(kind)) + index_bytes(kind)
            cells.append(f"{b} B ({full / b:.0f}x smaller)")
        print(f"| {name} {vocab} | {kind} | {full} B | " + " | ".join(cells) + " |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=3, help="measured steps per run, per repetition")
    ap.add_argument("--reps", type=int, default=2, help="alternating repetitions of (online, offline)")
    args = ap.parse_args(argv)
    seq_len, gbs = (128, 4) if args.quick else (256, 4)
    _analytic_table()
    with tempfile.TemporaryDirectory() as root:
        run_ranks(_make, 1, root, args.quick)
        samples = gbs * (args.steps + 1)
        tokens = samples * seq_len
        print(f"\n2. measured on disk, {samples} x {seq_len} tokens of a random-weight teacher (vocab 49152), "
              f"deflate (np.savez_compressed)")
        (full,) = run_ranks(_full_logits_bytes, 1, root, f"{root}/full.npz", samples, seq_len)
        print("| stored | bytes/token | vs full fp16 logits | write time (s) |\n|---|---|---|---|")
        print(f"| full fp16 logits | {full / tokens:.0f} | 1x | |")
        for k in KS:
            (secs,) = run_ranks(_write, 1, root, f"{root}/top{k}", k, samples, seq_len)
            size = sum(f.stat().st_size for f in Path(f"{root}/top{k}").glob("chunk_*.npz"))
            print(f"| top-{k} fp16 + uint16 ids | {size / tokens:.1f} | {full / size:.0f}x smaller | {secs:.1f} |")
        k = 32
        online, offline = [], []
        for rep in range(args.reps):
            for use_file in ((False, True) if rep % 2 == 0 else (True, False)):
                t = run_ranks(_time_steps, 1, root, f"{root}/top{k}" if use_file else None, k, args.steps, seq_len,
                              gbs)[0]
                (offline if use_file else online).extend(t)
        on, off = statistics.median(online), statistics.median(offline)
        step_tokens = gbs * seq_len
        print(f"\n3. training step, top-{k} KD, {gbs} x {seq_len} tokens, TP1, {len(online)} measured steps each "
              f"(median)")
        print("| step | s/step | tokens/s |\n|---|---|---|")
        print(f"| online (teacher forward in the step) | {on:.3f} | {step_tokens / on:.0f} |")
        print(f"| offline (--teacher-logits) | {off:.3f} | {step_tokens / off:.0f} |")
        print(f"ratio online / offline: {on / off:.2f} (teacher time saved per step: {on - off:.3f} s, "
              f"{(on - off) / on:.0%})")


if __name__ == "__main__":
    main()
