"""Time of one distillation step vs one student-only (LM-loss) training step, side by side (issue 4).

    python bench/bench_distill_step.py            # teacher 8 x 1024 (~150M), pruned student 6 x 768, seq 256
    python bench/bench_distill_step.py --quick    # tiny shapes, a few seconds per step
    python bench/bench_distill_step.py --tp 2     # on 2 spawned gloo ranks

Both runs use the real trainer (``megatron_prune.training.trainer.Trainer``) on the same student checkpoint,
data and batch; the distillation step adds the frozen teacher's forward and the vocab-parallel KL. Steps
alternate (distill, train, train, distill, ...) after one warm-up step each; medians are printed. The ratio is
what distillation costs over plain training; the teacher's forward is the expected bulk of it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import run_ranks, save_random_models, write_token_dataset  # noqa: E402


def _make_checkpoints(root: str, quick: bool) -> None:
    from megatron_prune.arch import ModelArch

    if quick:
        teacher = ModelArch(num_layers=4, hidden_size=256, ffn_hidden_size=704, num_attention_heads=8,
                            num_query_groups=4, vocab_size=8192)
    else:
        teacher = ModelArch(num_layers=8, hidden_size=1024, ffn_hidden_size=2816, num_attention_heads=16,
                            num_query_groups=4, vocab_size=32000)
    student = teacher.replace(num_layers=teacher.num_layers * 3 // 4, hidden_size=teacher.hidden_size * 3 // 4,
                              ffn_hidden_size=teacher.ffn_hidden_size // 2)
    save_random_models(root, {"teacher": teacher, "student": student})
    write_token_dataset(Path(root) / "data", num_docs=200, doc_len=1000, vocab=teacher.vocab_size)
    print(f"teacher: {teacher.describe()}\nstudent: {student.describe()}")


def _time_steps(root: str, teacher: bool, tp: int, steps: int, seq_len: int, gbs: int) -> list[float]:
    from megatron_prune.training.config import TrainConfig
    from megatron_prune.training.trainer import Trainer

    cfg = TrainConfig(student=f"{root}/student", teacher=f"{root}/teacher" if teacher else None,
                      data=[f"{root}/data"], out=f"{root}/run_{'kd' if teacher else 'ce'}_tp{tp}", tp=tp,
                      seq_len=seq_len, micro_batch_size=gbs // 2, global_batch_size=gbs, steps=steps + 1, lr=1e-4,
                      dataset_cache=f"{root}/cache")
    trainer = Trainer(cfg)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
    return times[1:]  # the first step warms up


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3, help="measured steps per run, per repetition")
    ap.add_argument("--reps", type=int, default=2, help="alternating repetitions of (distill, train)")
    args = ap.parse_args(argv)
    seq_len, gbs = (128, 4) if args.quick else (256, 4)
    with tempfile.TemporaryDirectory() as root:
        run_ranks(_make_checkpoints, 1, root, args.quick)
        kd, ce = [], []
        for rep in range(args.reps):
            order = (True, False) if rep % 2 == 0 else (False, True)
            for teacher in order:
                t = run_ranks(_time_steps, args.tp, root, teacher, args.tp, args.steps, seq_len, gbs)[0]
                (kd if teacher else ce).extend(t)
        tokens = gbs * seq_len
        mk, mc = statistics.median(kd), statistics.median(ce)
        print(f"\n{gbs} x {seq_len} tokens per step, TP={args.tp}, {len(kd)} measured steps each (median)")
        print("| step | s/step | tokens/s |\n|---|---|---|")
        print(f"| student-only (LM loss) | {mc:.2f} | {tokens / mc:.0f} |")
        print(f"| distillation (teacher forward + KL) | {mk:.2f} | {tokens / mk:.0f} |")
        print(f"ratio distillation / student-only: {mk / mc:.2f}")


if __name__ == "__main__":
    main()
