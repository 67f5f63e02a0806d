"""`megatron-prune plan`'s memory estimate next to the peak memory a real distillation run reaches (issue 12).

    python bench/plan_vs_measured.py            # teacher 8 x 512 (vocab 16000), student 4 x 384, seq 512
    python bench/plan_vs_measured.py --quick    # smaller shapes, about a minute

For each layout (TP1, TP2, PP2, DP2 on spawned gloo ranks) every rank resets its peak resident set
(VmHWM) after the imports, builds the real trainer (``megatron_prune.training.trainer.Trainer``: teacher and
student loaded from their checkpoints, megatron's DDP grad buffers and Adam), runs a few steps, and reports
its peak RSS minus the RSS it started from. The estimate is ``megatron_prune.runtime.memory.estimate_memory`` for the
same shapes and layout on the CPU path (fp32, megatron's local spec, no sequence parallelism, no
distributed optimizer over gloo). What `plan` calls the overhead (on a GPU the CUDA context, NCCL and the
allocator; ``--overhead-gib``) is measured here by the same run on a model of a few thousand parameters:
the runtime's libraries, thread pools, gloo buffers and data indices. The table prints the most loaded
rank of each layout and the ratio measured / (estimate + runtime).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import peak_rss_bytes, reset_peak_rss, rss_bytes, run_ranks, save_random_models, write_token_dataset  # noqa: E402

MiB = 2**20


def shapes(quick, minimal: bool = False):
    from megatron_prune.arch import ModelArch

    if minimal:  # the runtime's own memory: libraries, thread pools, gloo, data indices; no tensors to speak of
        teacher = ModelArch(num_layers=4, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                            num_query_groups=2, vocab_size=256)
    elif quick:
        teacher = ModelArch(num_layers=4, hidden_size=256, ffn_hidden_size=768, num_attention_heads=8,
                            num_query_groups=4, vocab_size=8192)
    else:
        teacher = ModelArch(num_layers=8, hidden_size=512, ffn_hidden_size=1536, num_attention_heads=8,
                            num_query_groups=4, vocab_size=16000)
    student = teacher.replace(num_layers=teacher.num_layers // 2, hidden_size=teacher.hidden_size * 3 // 4,
                              ffn_hidden_size=teacher.ffn_hidden_size * 2 // 3)
    return teacher, student


def _make_checkpoints(root: str, quick: bool, minimal: bool = False) -> None:
    teacher, student = shapes(quick, minimal)
    save_random_models(root, {"teacher": teacher, "student": student})
    write_token_dataset(Path(root) / "data", num_docs=100, doc_len=600, vocab=teacher.vocab_size)


def _follow_live_tensors() -> None:
    """glibc keeps freed heap memory resident. With a fixed mmap threshold every block above 128 KiB is its own
    mapping, returned on free, so the resident set follows the live tensors (CUDA's allocated, not reserved)."""
    import ctypes

    M_MMAP_THRESHOLD = -3
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def _measure(root: str, tp: int, pp: int, seq_len: int, mbs: int, gbs: int, steps: int) -> int:
    """Peak resident bytes of this rank over building the trainer and ``steps`` steps, above where it started."""
    from megatron_prune.training.config import TrainConfig
    from megatron_prune.training.trainer import Trainer

    _follow_live_tensors()
    start = rss_bytes()
    reset_peak_rss()
    cfg = TrainConfig(student=f"{root}/student", teacher=f"{root}/teacher", data=[f"{root}/data"],
                      out=f"{root}/run_tp{tp}_pp{pp}", tp=tp, pp=pp, seq_len=seq_len, micro_batch_size=mbs,
                      global_batch_size=gbs, steps=steps, lr=1e-4, save_every=10**6, dataset_cache=f"{root}/cache")
    trainer = Trainer(cfg)
    for _ in range(steps):
        trainer.train_step()
    return peak_rss_bytes() - start


def estimate(quick: bool, tp: int, pp: int, dp: int, seq_len: int, mbs: int, gbs: int) -> int:
    from megatron_prune.runtime.memory import Layout, estimate_memory

    teacher, student = shapes(quick)
    layout = Layout(tp=tp, pp=pp, dp=dp, micro_batch_size=mbs, num_microbatches=gbs // (mbs * dp), seq_len=seq_len,
                    sequence_parallel=False, distributed_optimizer=False, implementation="local")
    return estimate_memory(student, layout, teacher=teacher, precision="fp32").total


LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2)]  # (tp, pp, dp)


def main(argv=None) -> list[tuple]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args(argv)
    seq_len, mbs, gbs = (256, 2, 4) if args.quick else (512, 4, 8)
    teacher, student = shapes(args.quick)
    print(f"teacher: {teacher.describe()}\nstudent: {student.describe()}\nseq {seq_len}, micro batch {mbs}, "
          f"global batch {gbs}, fp32 on the CPU, {args.steps} steps per layout")
    rows = []
    with tempfile.TemporaryDirectory() as root, tempfile.TemporaryDirectory() as tiny:
        run_ranks(_make_checkpoints, 1, root, args.quick)
        run_ranks(_make_checkpoints, 1, tiny, args.quick, True)
        print("| layout | estimate MiB | + runtime MiB | measured peak MiB | measured / (estimate + runtime) |\n"
              "|---|---|---|---|---|")
        for tp, pp, dp in LAYOUTS:
            world = tp * pp * dp
            runtime = max(run_ranks(_measure, world, tiny, tp, pp, seq_len, mbs, gbs, args.steps))
            measured = max(run_ranks(_measure, world, root, tp, pp, seq_len, mbs, gbs, args.steps))
            est = estimate(args.quick, tp, pp, dp, seq_len, mbs, gbs)
            rows.append((tp, pp, dp, est, runtime, measured))
            print(f"| TP{tp} PP{pp} DP{dp} | {est / MiB:.0f} | {runtime / MiB:.0f} | {measured / MiB:.0f} | "
                  f"{measured / (est + runtime):.2f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
