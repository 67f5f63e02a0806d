"""Peak memory and time of the vocab-parallel forward-KL loss vs the naive gathered-logits version (issue 4).

    python bench/bench_kd_loss.py                       # 2048 tokens, V = 49152 (SmolLM2), TP2
    python bench/bench_kd_loss.py --vocab 128256 --tp 2 # Llama-3 vocabulary (~14 GB RAM for the naive side)
    python bench/bench_kd_loss.py --quick               # small shape, a few seconds

Both sides compute the per-token forward KL(p_teacher || p_student) with tau = 1, a masked token mean, and the
backward to the student's vocab shard ``[b, s, V/tp]`` (float32 on CPU), on spawned gloo ranks:

* ours:  ``megatron_prune.distill.forward_kl`` (all-reduces per-token statistics; saves ``p_s - p_t`` only);
* naive: megatron's ``gather_from_tensor_model_parallel_region`` of both shards to ``[b, s, V]``, then
  ``log_softmax`` + ``F.kl_div`` (the textbook code; autograd saves the full-vocabulary softmax tensors).

Memory: the kernel's peak resident set (VmHWM from /proc/self/status, reset before each measured step with
``echo 5 > /proc/self/clear_refs``), minus the resident set just before the step (the inputs already exist).
torch's CPU allocations bypass tracemalloc (they are C++ ``malloc``/``mmap``), and torch.profiler's CPU
memory view only attributes allocations to ops; the kernel's high-water mark sees every byte, including
short-lived temporaries a sampling thread could miss. Tensors this large are ``mmap``-ed by glibc and go back
to the kernel when freed, so the figure is the step's own peak. Where ``clear_refs`` is not allowed, a thread
sampling ``/proc/self/statm`` every millisecond is used instead (and reported as such). The gradient of the
student shard (needed by both) is included. Figures are per rank; the max over ranks is printed.
Repetitions alternate (ours, naive, naive, ours, ...) after a warm-up of each; medians are printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import median, peak_rss_bytes, reset_peak_rss, rss_bytes, run_ranks, synced_time  # noqa: E402


class _Sampler:
    """Fallback peak-RSS meter: a thread reading /proc/self/statm every millisecond."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self):
        return int(Path("/proc/self/statm").read_text().split()[1]) * self.page

    def __enter__(self):
        self.peak = self._rss()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._rss())


def _worker(tp: int, cfg: dict) -> dict:
    import torch
    import torch.nn.functional as F
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from megatron_prune.distill import forward_kl, masked_token_mean
    from megatron_prune.runtime import init_distributed

    layout = init_distributed(tp=tp, pp=1, seed=0)
    b, s, vocab = cfg["batch"], cfg["seq_len"], cfg["vocab"]
    shard = vocab // tp
    g = torch.Generator().manual_seed(layout.tp_rank)
    student = (torch.randn(b, s, shard, generator=g) * 2).requires_grad_()
    teacher = torch.randn(b, s, shard, generator=g) * 2
    mask = torch.ones(b, s)
    mask[:, -s // 8:] = 0  # some padding tokens

    def ours():
        loss = masked_token_mean(forward_kl(student, teacher, 1.0, vocab_size=vocab), mask)
        loss.backward()
        return float(loss)

    def naive():
        full_s = gather_from_tensor_model_parallel_region(student)[..., :vocab]
        full_t = gather_from_tensor_model_parallel_region(teacher)[..., :vocab]
        per_token = F.kl_div(torch.log_softmax(full_s, -1), torch.log_softmax(full_t, -1),
                             reduction="none", log_target=True).sum(-1)
        loss = masked_token_mean(per_token, mask)
        loss.backward()
        return float(loss)

    use_hwm = reset_peak_rss()
    fns = {"ours": ours, "naive": naive}

    def measure(name):
        student.grad = None
        base = rss_bytes()
        if use_hwm:
            reset_peak_rss()
            dt, loss = synced_time(fns[name])
            peak = peak_rss_bytes()
        else:
            with _Sampler() as sm:
                dt, loss = synced_time(fns[name])
            peak = sm.peak
        return dt, peak - base, loss

    for name in fns:  # warm-up
        measure(name)
    res = {name: {"time": [], "mem": [], "loss": None} for name in fns}
    order = ["ours", "naive", "naive", "ours"] * ((cfg["reps"] + 1) // 2)
    for name in order:
        dt, mem, loss = measure(name)
        res[name]["time"].append(dt)
        res[name]["mem"].append(mem)
        res[name]["loss"] = loss
    shard_bytes = student.numel() * student.element_size()
    return dict(res=res, meter="VmHWM (clear_refs)" if use_hwm else "statm sampling thread (1 ms)",
                shard_bytes=shard_bytes, threads=torch.get_num_threads())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--quick", action="store_true", help="256 tokens, V = 8192")
    args = ap.parse_args()
    cfg = dict(vocab=args.vocab, batch=args.batch, seq_len=args.seq_len, reps=args.reps)
    if args.quick:
        cfg.update(vocab=8192, batch=2, seq_len=128, reps=2)
    if cfg["vocab"] % args.tp:
        ap.error("--vocab must be divisible by --tp")

    ranks = run_ranks(_worker, args.tp, args.tp, cfg)
    r0 = ranks[0]
    tokens = cfg["batch"] * cfg["seq_len"]
    print(f"forward KL, forward + backward: {tokens} tokens x V={cfg['vocab']} (fp32), TP{args.tp} "
          f"({args.tp} gloo ranks, {r0['threads']} thread(s) each)")
    print(f"student shard [b, s, V/tp] = {r0['shard_bytes'] / 2**20:.1f} MiB per rank; memory meter: {r0['meter']}")
    print(f"{'':8}{'peak extra MiB (max rank)':>28}{'x shard':>9}{'time s (median)':>18}{'loss':>12}")
    figs = {}
    for name in ("ours", "naive"):
        mem = max(median(r["res"][name]["mem"]) for r in ranks)
        t = median(r0["res"][name]["time"])
        figs[name] = (mem, t)
        print(f"{name:8}{mem / 2**20:>28.1f}{mem / r0['shard_bytes']:>9.2f}{t:>18.3f}{r0['res'][name]['loss']:>12.6f}")
    (m_o, t_o), (m_n, t_n) = figs["ours"], figs["naive"]
    print(f"naive / ours: peak memory {m_n / max(m_o, 1):.2f}x, time {t_n / t_o:.2f}x")
    if abs(r0["res"]["ours"]["loss"] - r0["res"]["naive"]["loss"]) > 1e-4:
        print("WARNING: the two losses differ")


if __name__ == "__main__":
    main()
