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

from megatron_prune.pipelines.recipe import OUTPUT_KEY, Recipe, RecipeError, Stage, load_recipe, references
from megatron_prune.pipelines.verbs import RECIPE, VERBS, evaluate, sft_tasks

DEMO_RECIPE = Path(__file__).parents[1] / "recipes" / "smollm2_family.yaml"  # examples/ links to it


# ------------------------------------------------------------------------------------------ outputs
def stage_options(stage: Stage) -> dict:
    """The stage's options over its verb's defaults (as written: stage names are not resolved)."""
    return {**VERBS[stage.verb].defaults(RECIPE), **stage.options}


def output_path(recipe: Recipe, stage: Stage) -> Path:
    return recipe.workdir / stage.options[OUTPUT_KEY]


def product(recipe: Recipe, stage: Stage) -> Path:
    """What later stages get when they name this stage: the checkpoint, score file, data directory, ..."""
    verb = VERBS[stage.verb]
    out = output_path(recipe, stage)
    return verb.product(out, stage_options(stage)) if verb.product else out


def is_complete(recipe: Recipe, stage: Stage) -> bool:
    return VERBS[stage.verb].complete(output_path(recipe, stage), stage_options(stage))


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
    """Run the stage's verb with its options (checked against the verb when the recipe was loaded; stage names
    resolved to the paths of their products), its output and its layout."""
    verb = VERBS[stage.verb]
    names = [s.name for s in recipe.stages]
    options = {**verb.defaults(RECIPE), **resolve(stage.options, recipe, names),
               OUTPUT_KEY: str(output_path(recipe, stage)), "tp": stage.tp, "pp": stage.pp}
    if verb.run_stage is not None:
        verb.run_stage(recipe, stage, options)
    else:
        verb.run(options)


def evaluate_family(recipe: Recipe, stage: Stage, o: dict) -> None:
    """An eval stage: every model of ``models`` measured by the eval options, saved as one JSON, plus the family
    report.

    Each model's row is appended to ``<out>.partial.jsonl`` as soon as it is measured, so a stop signal or a
    crash costs at most the model in flight: the next run keeps the rows whose checkpoint and options are
    unchanged and evaluates the rest.
    """
    from megatron_prune.runtime import is_rank0, log0
    from megatron_prune.runtime.stop import StopRequested, stop_on_signals

    if o["tasks"] and sft_tasks(o):
        raise RecipeError(f"{recipe.path}: stage {stage.name!r}: lm-eval `tasks` and the SFT task options "
                          f"({', '.join(sft_tasks(o))}) go in two eval stages")
    out = o[OUTPUT_KEY]
    models = list(zip(stage.options["models"], o["models"], strict=True))  # (name as written, checkpoint)
    measured_by = {k: v for k, v in o.items() if k not in ("models", OUTPUT_KEY, "tp", "pp")}
    partial = Path(out).with_name(Path(out).stem + ".partial.jsonl")
    done = _measured_rows(partial)
    rows = []
    with stop_on_signals(immediate=True):  # a stop ends the model in flight; the rows measured so far stay
        try:
            for i, (name, ckpt) in enumerate(models, start=1):
                key = _row_key(name, ckpt, measured_by)
                if key in done:
                    log0(f"eval {i}/{len(models)} {name}: measured before, kept from {partial.name}")
                    r = done[key]
                else:
                    log0(f"eval {i}/{len(models)} {name}: {ckpt}")
                    r = _evaluate_one(ckpt, o)
                    if is_rank0():
                        with open(partial, "a") as f:
                            f.write(json.dumps({"key": key, "row": r}) + "\n")
                rows.append({"model": name, **r, "checkpoint": ckpt, **_lineage(recipe, name)})
        except StopRequested as e:
            # count what the file holds: the signal may land between writing a row and appending it to `rows`
            measured = _measured_rows(partial)
            kept = sum(_row_key(name, ckpt, measured_by) in measured for name, ckpt in models)
            raise StopRequested(e.reason, saved=partial if kept else None,
                                at=f"after {kept} of {len(models)} models") from None
    if is_rank0():
        from megatron_prune.checkpoint.outputs import write_json_atomic

        write_json_atomic(Path(out), {"data": str(o["data"]), "rows": rows})
        write_family_report(recipe, rows)
        partial.unlink(missing_ok=True)


def _evaluate_one(ckpt: str, o: dict) -> dict:
    r = evaluate(ckpt, o) or {}
    if not o["tasks"]:
        return r
    # lm-evaluation-harness tasks: one column per task and metric, e.g. arc_easy/acc
    return {**{k: v for k, v in r.items() if k != "tasks"},
            **{f"{t}/{m}": v for t, ms in r.get("tasks", {}).items() for m, v in ms.items()}}


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
        cost = VERBS[s.verb].train_tokens
        tokens += cost(stage_options(s)) if cost else 0
        inputs = {k: v for k, v in s.options.items() if k not in (OUTPUT_KEY, "teacher")}
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
        ax.annotate(r["model"], (r["params"] / 1e6, r["lm_loss"]), textcoords="offset points", xytext=(5, 5),
                    fontsize=8)
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
        head = (f"[{i}/{len(names)}] {stage.name}: {stage.verb} at TP={stage.tp} PP={stage.pp} -> "
                f"{output_path(recipe, stage)}")
        if is_complete(recipe, stage):
            log0(f"{head} (complete, skipping)")
            if not dry_run:
                _log_event(recipe.workdir, stage=stage.name, event="skipped")
            status.append((stage.name, "skipped"))
            continue
        if dry_run:
            opts = {**resolve(stage.options, recipe, names), OUTPUT_KEY: str(output_path(recipe, stage))}
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
