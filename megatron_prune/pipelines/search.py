"""`megatron-prune search`: every shape within a budget, ranked zero-shot, the best re-ranked after distillation.

Minitron §2.3: rankings right after pruning are a poor predictor; a short distillation of each of the top
candidates (same data, schedule and seed for all) decides. Everything lands under ``out``:

    out/search.json                       the budget, the space and the candidate list (written first)
    out/zero_shot/<candidate>.json        held-out LM loss of the candidate pruned in memory
    out/candidates/<candidate>/pruned     the pruned checkpoint (top K only)
    out/candidates/<candidate>/distill    the distillation run (step_* checkpoints, TensorBoard)
    out/candidates/<candidate>/result.json   held-out LM loss after distillation
    out/report.md, report.csv, report.png

Each file is written atomically and skipped when present, so a search resumes after an interruption and
candidates can run as separate jobs (``stage="distill", candidate=i``, e.g. one Slurm array task each)
whose results ``stage="report"`` collects.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

from megatron_prune import inputs
from megatron_prune.checkpoint.outputs import check_output_path, write_json_atomic
from megatron_prune.prune.search_space import (
    Budget,
    SearchSpace,
    candidate_name,
    candidates,
    default_space,
    reachable,
    target_spec,
)
from megatron_prune.runtime.stop import StopRequested, stop_on_signals

STAGES = ("all", "zero-shot", "distill", "report")


@dataclasses.dataclass
class DistillSettings:
    """The short distillation every top candidate gets (identical for all, so losses compare)."""

    data: list
    steps: int = 400
    seq_len: int = 512
    micro_batch_size: int = 1
    global_batch_size: int = 8
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 10
    seed: int = 1234


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


_MEASURES = (("params", "--params", "parameters"), ("non_embedding_params", "--non-embedding-params",
                                                      "non-embedding parameters"),
             ("memory_bytes", "--memory-gib", "GiB of weights and KV cache"),
             ("active_params", "--active-params", "parameters used per token"))


def _no_fit_message(source, space: SearchSpace, budget: Budget, tp: int, pp: int) -> str:
    """Why no shape fits: the range each constraint spans over the reachable shapes of the space."""
    shapes = reachable(source, space, tp, pp)
    if not shapes:
        return (f"no shape of the search space can be pruned from the source ({source.describe()}) and sharded at "
                f"TP={tp} PP={pp}; give --hidden/--ffn/--heads/--query-groups/--layers values at most the source's "
                f"that divide by TP and PP")
    parts = []
    for key, flag, unit in _MEASURES:
        target = getattr(budget, key)
        if target is not None:
            values = [budget.measures(a)[key] for a in shapes]
            show = (lambda v: f"{v / 1024 ** 3:.3g}") if key == "memory_bytes" else (lambda v: f"{v:,.0f}")  # noqa: E731
            parts.append(f"{flag} {show(target)} (the {len(shapes)} shapes have {show(min(values))} to "
                         f"{show(max(values))} {unit}; the source {show(budget.measures(source)[key])})")
    return (f"no shape of the search space fits the budget within {budget.tolerance:.0%}: {'; '.join(parts)}. "
            f"Choose a budget inside that range, widen the space (--hidden/--ffn/--heads/--layers) or raise "
            f"--tolerance")


def check_search(ckpt, scores, out, budget: Budget, valid_data, distill: Optional[DistillSettings],
                 space: Optional[SearchSpace], top_k: int, depth_metric: str, tp: int, pp: int, eval_seq_len: int,
                 eval_windows: int, micro_batch_size: int, stage: str, candidate: Optional[int], max_candidates: int):
    """Every input of `search`, before any process group or weight; returns (source arch, space, candidates)."""
    from megatron_prune.prune.plan import DEPTH_METRICS

    check_output_path(out, {"source checkpoint": ckpt, "score file": scores,
                            "validation data": f"{valid_data}.bin" if valid_data else None})
    if stage not in STAGES:
        raise inputs.InputError(f"unknown --stage {stage!r}; choose one of {', '.join(STAGES)}")
    inputs.layout(tp, pp)
    for name, value in (("--top-k", top_k), ("--seq-len", eval_seq_len), ("--eval-windows", eval_windows),
                        ("--max-candidates", max_candidates), ("micro_batch_size", micro_batch_size)):
        inputs.positive(name, value)
    if depth_metric not in DEPTH_METRICS:
        raise inputs.InputError(f"--depth-metric {depth_metric!r} is unknown; choose one of {', '.join(DEPTH_METRICS)}")
    if stage in ("all", "distill") and distill is None:
        raise inputs.InputError("distilling the top candidates needs --data (the distillation data); "
                                "use --stage zero-shot for the zero-shot ranking alone")
    if candidate is not None and (stage != "distill" or not 0 <= candidate < top_k):
        raise inputs.InputError(f"--candidate takes a zero-shot rank 0..{top_k - 1} (< --top-k) with --stage distill")
    if distill is not None:
        for name, value in (("--distill-steps", distill.steps), ("--seq-len", distill.seq_len),
                            ("--micro-batch-size", distill.micro_batch_size),
                            ("--global-batch-size", distill.global_batch_size)):
            inputs.positive(name, value)
        inputs.positive("--lr", distill.lr, allow_zero=True)
        if distill.global_batch_size % distill.micro_batch_size:
            raise inputs.InputError(f"--global-batch-size {distill.global_batch_size} must be a multiple of "
                                    f"--micro-batch-size {distill.micro_batch_size}")
    source = inputs.checkpoint(ckpt).arch
    inputs.arch_fits(source, tp, pp)
    inputs.enough_windows(inputs.indexed_data(valid_data, "--valid-data"), eval_seq_len, 1, "--valid-data",
                          "lower --seq-len or use more data")
    if distill is not None:
        from megatron_prune.data.blend import parse_blend

        items = [str(d) for d in distill.data]
        for item in items:
            try:
                float(item)
            except ValueError:
                inputs.indexed_data(item, "--data")
        try:
            parse_blend(items)
        except ValueError as e:
            raise inputs.InputError(f"--data {' '.join(items)}: {e}") from e
    space = space or default_space(source, tp, pp)
    found = candidates(source, space, budget, tp, pp)
    if not found:
        raise inputs.InputError(_no_fit_message(source, space, budget, tp, pp))
    if len(found) > max_candidates:
        raise inputs.InputError(f"{len(found)} candidates fit the budget, more than --max-candidates "
                                f"{max_candidates}; tighten --tolerance or the space, or raise --max-candidates")
    inputs.score_file(scores)
    return source, space, found


def search(ckpt: str, scores: str, out: str, budget: Budget, valid_data: str, distill: Optional[DistillSettings],
           space: Optional[SearchSpace] = None, top_k: int = 3, depth_metric: str = "angular", tp: int = 1,
           pp: int = 1, eval_seq_len: int = 512, eval_windows: int = 64, micro_batch_size: int = 4,
           stage: str = "all", candidate: Optional[int] = None, max_candidates: int = 64) -> dict:
    """Run the search stages (``stage``: all, zero-shot, distill, report); returns the collected results."""
    from megatron_prune.runtime import barrier, is_rank0, log0

    source, space, found = check_search(ckpt, scores, out, budget, valid_data, distill, space, top_k, depth_metric,
                                        tp, pp, eval_seq_len, eval_windows, micro_batch_size, stage, candidate,
                                        max_candidates)
    out_dir = Path(out)
    names = [candidate_name(a) for a in found]
    header = {"checkpoint": str(ckpt), "scores": str(scores), "budget": dataclasses.asdict(budget),
              "space": dataclasses.asdict(space), "depth_metric": depth_metric, "top_k": top_k,
              "candidates": [{"name": n, "target": target_spec(source, a, depth_metric), "params": a.param_count(),
                              **budget.measures(a), "arch": a.to_dict()} for n, a in zip(names, found, strict=True)]}
    if is_rank0():
        write_json_atomic(out_dir / "search.json", header)
    barrier()
    log0(f"{len(found)} candidates of {source.describe()} within the budget:\n" +
         "\n".join(f"  {n}: {a.param_count() / 1e6:.1f}M params" for n, a in zip(names, found, strict=True)))

    if stage in ("all", "zero-shot"):
        _zero_shot(ckpt, scores, out_dir, source, found, names, depth_metric, valid_data, eval_seq_len, eval_windows,
                   micro_batch_size, tp, pp)
    if stage in ("all", "distill"):
        ranked = _ranked(out_dir, names)
        chosen = ranked[:top_k] if candidate is None else [ranked[candidate]]
        for name in chosen:
            _distill_one(ckpt, scores, out_dir, source, found[names.index(name)], name, depth_metric, valid_data,
                         distill, eval_seq_len, eval_windows, micro_batch_size, tp, pp)
    results = collect(out_dir)
    if stage in ("all", "report") and is_rank0():
        write_report(results, out_dir)
        log0(f"report: {out_dir / 'report.md'}")
    barrier()
    return results


def _ranked(out_dir: Path, names: list[str]) -> list[str]:
    losses = {n: _read_json(out_dir / "zero_shot" / f"{n}.json") for n in names}
    missing = [n for n, r in losses.items() if r is None]
    if missing:
        raise FileNotFoundError(f"no zero-shot result yet for {', '.join(missing)}; run the zero-shot stage first")
    return sorted(names, key=lambda n: losses[n]["lm_loss"])


def _zero_shot(ckpt, scores_file, out_dir, source, found, names, depth_metric, valid_data, seq_len, windows_n,
               mbs, tp, pp) -> None:
    """Every candidate pruned in memory from the one loaded source model and evaluated on held-out data."""
    from megatron_prune.checkpoint import load_model
    from megatron_prune.data import fixed_length_windows
    from megatron_prune.evaluation.lm_loss import lm_loss
    from megatron_prune.importance import ImportanceScores
    from megatron_prune.prune import PruneTarget, apply_plan, make_plan
    from megatron_prune.runtime import init_distributed, is_rank0, log0

    todo = [(n, a) for n, a in zip(names, found, strict=True) if not (out_dir / "zero_shot" / f"{n}.json").is_file()]
    if not todo:
        return
    done = 0
    try:
        with stop_on_signals(immediate=True):  # a stop ends the candidate in flight; the finished ones stay
            init_distributed(tp, pp)
            scores = ImportanceScores.load(scores_file)
            model, _ = load_model(ckpt, use_te=False)
            windows = fixed_length_windows(valid_data, seq_len, max_windows=windows_n)
            for name, arch in todo:
                plan = make_plan(scores, source, PruneTarget.parse(target_spec(source, arch, depth_metric)))
                pruned = apply_plan(model, plan)
                result = lm_loss(pruned, arch, windows, mbs, desc=f"zero-shot {name}").to_dict()
                result.update(name=name, params=arch.param_count(), kept_layers=plan.kept_layers)
                if is_rank0():
                    write_json_atomic(out_dir / "zero_shot" / f"{name}.json", result)
                done += 1
                log0(f"zero-shot {name}: LM loss {result['lm_loss']:.4f}")
                del pruned
    except StopRequested as e:
        raise StopRequested(e.reason, saved=out_dir / "zero_shot" if done else None,
                            at=f"after {done} of {len(todo)} zero-shot candidates") from None


def _distill_one(ckpt, scores_file, out_dir, source, arch, name, depth_metric, valid_data, d: DistillSettings,
                 seq_len, windows_n, mbs, tp, pp) -> None:
    from megatron_prune.checkpoint import load_model
    from megatron_prune.data import fixed_length_windows
    from megatron_prune.evaluation.lm_loss import lm_loss
    from megatron_prune.pipelines.prune import prune
    from megatron_prune.runtime import init_distributed, is_rank0, log0
    from megatron_prune.training.config import TrainConfig
    from megatron_prune.training.trainer import latest_step_dir, train

    cand = out_dir / "candidates" / name
    if (cand / "result.json").is_file():
        return
    pruned = cand / "pruned"
    if not pruned.exists():
        prune(ckpt, pruned, scores=scores_file, target=target_spec(source, arch, depth_metric), tp=tp, pp=pp)
    run = cand / "distill"
    train(TrainConfig(teacher=str(ckpt), student=str(pruned), data=list(d.data), out=str(run), tp=tp, pp=pp,
                      seq_len=d.seq_len, micro_batch_size=d.micro_batch_size, global_batch_size=d.global_batch_size,
                      steps=d.steps, lr=d.lr, min_lr=d.min_lr, warmup_steps=min(d.warmup_steps, d.steps),
                      seed=d.seed, save_every=d.steps, keep_last=1, log_every=max(1, d.steps // 10)))
    final = latest_step_dir(run)
    try:
        with stop_on_signals(immediate=True):  # the distillation is saved: a rerun only measures it
            init_distributed(tp, pp)
            model, _ = load_model(final)
            windows = fixed_length_windows(valid_data, seq_len, max_windows=windows_n)
            result = lm_loss(model, arch, windows, mbs, desc=f"after distillation {name}").to_dict()
            result.update(name=name, params=arch.param_count(), steps=d.steps, checkpoint=str(final))
            if is_rank0():
                write_json_atomic(cand / "result.json", result)
    except StopRequested as e:
        raise StopRequested(e.reason, saved=final, at=f"while measuring {name} after its distillation") from None
    log0(f"after {d.steps} distillation steps {name}: LM loss {result['lm_loss']:.4f}")


def collect(out_dir: Path) -> dict:
    """Everything on disk so far: candidates with their zero-shot and distilled losses and both ranks."""
    header = _read_json(Path(out_dir) / "search.json")
    if header is None:
        raise FileNotFoundError(f"{out_dir} holds no search.json: run `megatron-prune search` into it first")
    rows = []
    for c in header["candidates"]:
        zs = _read_json(Path(out_dir) / "zero_shot" / f"{c['name']}.json")
        ds = _read_json(Path(out_dir) / "candidates" / c["name"] / "result.json")
        rows.append({"name": c["name"], "target": c["target"], "params": c["params"],
                     "non_embedding_params": c["non_embedding_params"], "memory_bytes": c["memory_bytes"],
                     "active_params": c.get("active_params"),
                     "zero_shot_loss": zs["lm_loss"] if zs else None, "distilled_loss": ds["lm_loss"] if ds else None})
    for key in ("zero_shot_loss", "distilled_loss"):
        order = sorted((r for r in rows if r[key] is not None), key=lambda r: r[key])
        for rank, r in enumerate(order, start=1):
            r[key.replace("loss", "rank")] = rank
    done = [r for r in rows if r["distilled_loss"] is not None]
    winner = min(done, key=lambda r: r["distilled_loss"])["name"] if done else None
    return {"header": header, "rows": rows, "winner": winner}


def write_report(results: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    cols = ["name", "target", "params", "non_embedding_params", "memory_bytes", "zero_shot_loss", "zero_shot_rank",
            "distilled_loss", "distilled_rank"]
    tmp = out_dir / ".report.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, out_dir / "report.csv")

    def cell(loss, rank):
        return "" if loss is None else f"{loss:.4f} ({rank})"

    def count(key, v):
        if key == "memory_bytes":
            return f"{v / 2**30:.2f} GiB"
        return f"{v / 1e9:.2f}B" if v >= 1e9 else f"{v / 1e6:.1f}M"

    lines = ["| candidate | prune target | params | zero-shot loss (rank) | after distillation (rank) |",
             "|---|---|---|---|---|"]
    by_zero_shot = sorted(rows, key=lambda r: r.get("zero_shot_rank", len(rows) + 1))
    for r in by_zero_shot:
        lines.append(f"| {r['name']}{' **winner**' if r['name'] == results['winner'] else ''} | `{r['target']}` | "
                     f"{r['params'] / 1e6:.1f}M | {cell(r['zero_shot_loss'], r.get('zero_shot_rank'))} | "
                     f"{cell(r['distilled_loss'], r.get('distilled_rank'))} |")
    b = results["header"]["budget"]
    text = (f"# Architecture search\n\nSource: {results['header']['checkpoint']}; budget: "
            + ", ".join(f"{k.replace('_bytes', '')}={count(k, v)}" for k, v in b.items()
                        if k in ("params", "non_embedding_params", "memory_bytes", "active_params") and v)
            + f" (+-{b['tolerance']:.0%}); {len(rows)} candidates, ordered by zero-shot rank.\n\n"
            + "\n".join(lines) + "\n")
    (out_dir / "report.md").write_text(text)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        if r["zero_shot_loss"] is not None:
            ax1.scatter(r["params"] / 1e6, r["zero_shot_loss"], color="C0")
        if r["distilled_loss"] is not None:
            ax1.scatter(r["params"] / 1e6, r["distilled_loss"], color="C1")
            ax1.plot([r["params"] / 1e6] * 2, [r["zero_shot_loss"], r["distilled_loss"]], color="gray", lw=0.5)
            ax2.plot([0, 1], [r["zero_shot_rank"], r["distilled_rank"]], marker="o")
            ax2.annotate(r["name"], (1, r["distilled_rank"]), fontsize=6, xytext=(4, 0), textcoords="offset points")
    ax1.scatter([], [], color="C0", label="zero-shot")
    ax1.scatter([], [], color="C1", label="after distillation")
    ax1.set_xlabel("parameters (M)")
    ax1.set_ylabel("held-out LM loss")
    ax1.legend(fontsize=8)
    ax2.set_xticks([0, 1], ["zero-shot rank", "rank after distillation"])
    ax2.invert_yaxis()
    ax2.set_title("rank changes")
    fig.tight_layout()
    fig.savefig(out_dir / "report.png", dpi=120)
    plt.close(fig)
