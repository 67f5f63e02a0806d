"""Recipes: a model-family build as named stages in one YAML file.

    workdir: runs/family            # every stage output (`out`) lives here
    tp: 1                           # default layout of every stage (a stage may set its own tp/pp)
    pp: 1
    stages:
      teacher: {verb: convert, src: smollm2, out: teacher}
      data:    {verb: data, corpus: shakespeare, tokenizer: teacher, out: data}
      scores:  {verb: importance, ckpt: teacher, data: data/shakespeare_train, out: teacher.scores}
      mid-pruned: {verb: prune, ckpt: teacher, scores: scores, target: "hidden=512,ffn=1280", out: mid-pruned}
      mid:     {verb: distill, teacher: teacher, student: mid-pruned, data: [data/shakespeare_train], steps: 400}
      eval:    {verb: eval, models: [teacher, mid], data: data/shakespeare_valid}

A value that names an earlier stage stands for that stage's output (a checkpoint, a score file, ...), so
chains read naturally (teacher -> mid -> small, the last one distilled from ``teacher``). Stages run in the
order written. This module only parses and resolves; pipelines/run.py executes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

VERBS = ("convert", "data", "importance", "prune", "distill", "train", "search", "selfdistill", "sft", "merge",
         "generate", "specdec", "eval")
TRAINING_VERBS = ("distill", "train", "sft")  # their `out` is a run directory; the checkpoint is its last step
# the option of each verb that names its output; the default when a stage leaves it out
OUTPUT_KEY = {verb: "out" for verb in VERBS}
DEFAULT_OUT = {**{verb: "{name}-run" for verb in TRAINING_VERBS}, "convert": "{name}", "prune": "{name}",
               "merge": "{name}", "eval": "{name}.json", "specdec": "{name}.json", "selfdistill": "{name}.jsonl",
               "generate": "{name}.jsonl", "search": "{name}"}


class RecipeError(ValueError):
    """A recipe that cannot run (the message names the stage and the key)."""


@dataclass
class Stage:
    name: str
    verb: str
    options: dict
    tp: int = 1
    pp: int = 1


@dataclass
class Recipe:
    path: Path
    workdir: Path
    stages: list[Stage] = field(default_factory=list)

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)


def apply_overrides(doc: dict, overrides: list[str], path: Path) -> None:
    """``STAGE.KEY=VALUE`` (VALUE read as YAML; ``STAGE.KEY.SUB=VALUE`` for nested options) or ``KEY=VALUE`` for
    a top-level key: the recipe as written, changed from the command line (``run --set``)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"--set {item!r}: use STAGE.KEY=VALUE (e.g. mid.steps=10) or KEY=VALUE (e.g. tp=2)")
        value = yaml.safe_load(raw) if raw else ""
        parts = key.split(".")
        if len(parts) == 1:
            doc[key] = value
            continue
        if parts[0] not in doc["stages"]:
            raise RecipeError(f"--set {item!r}: {path} has no stage {parts[0]!r}; stages: {', '.join(doc['stages'])}")
        node = doc["stages"][parts[0]]
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"--set {item!r}: {part!r} of stage {parts[0]!r} is not a mapping")
        node[parts[-1]] = value


def load_recipe(path: str | Path, workdir: str | Path | None = None, overrides: Optional[list[str]] = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} not found (see examples/*.yaml)")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("stages"), dict) or not doc["stages"]:
        raise RecipeError(f"{path}: a recipe is a mapping with `stages:` (name -> {{verb: ..., options}})")
    apply_overrides(doc, overrides or [], path)
    unknown = sorted(set(doc) - {"workdir", "tp", "pp", "stages", "description"})
    if unknown:
        raise RecipeError(f"{path}: unknown top-level key(s) {unknown}; use workdir, tp, pp, stages, description")
    work = Path(workdir or doc.get("workdir") or Path("runs") / path.stem)
    recipe = Recipe(path=path, workdir=work)
    for name, spec in doc["stages"].items():
        if not isinstance(spec, dict) or spec.get("verb") not in VERBS:
            raise RecipeError(f"{path}: stage {name!r} needs `verb:` one of {', '.join(VERBS)}")
        options = {k: v for k, v in spec.items() if k not in ("verb", "tp", "pp")}
        verb = spec["verb"]
        if OUTPUT_KEY[verb] not in options and verb in DEFAULT_OUT:
            options[OUTPUT_KEY[verb]] = DEFAULT_OUT[verb].format(name=name)
        if OUTPUT_KEY[verb] not in options:
            raise RecipeError(f"{path}: stage {name!r} ({verb}) needs `{OUTPUT_KEY[verb]}:`")
        recipe.stages.append(Stage(name, verb, options, int(spec.get("tp", doc.get("tp", 1))),
                                   int(spec.get("pp", doc.get("pp", 1)))))
    names = [s.name for s in recipe.stages]
    for s in recipe.stages:  # references only to earlier stages (a stage's own output path is not one)
        inputs = {k: v for k, v in s.options.items() if k != OUTPUT_KEY[s.verb]}
        for ref in references(inputs, names):
            if names.index(ref) >= names.index(s.name):
                raise RecipeError(f"{path}: stage {s.name!r} uses {ref!r}, which runs later; order the stages")
    return recipe


def references(value: Any, names: list[str]) -> list[str]:
    """Stage names used as values inside ``value`` (strings equal to a stage name, or its prefix 'stage/...')."""
    if isinstance(value, dict):
        return [r for v in value.values() for r in references(v, names)]
    if isinstance(value, list):
        return [r for v in value for r in references(v, names)]
    if isinstance(value, str):
        head = value.split("/", 1)[0]
        return [head] if head in names else []
    return []
