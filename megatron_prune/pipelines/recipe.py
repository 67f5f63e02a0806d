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
order written. A stage takes exactly the options of its verb (pipelines/verbs.py), under the same names; a
misspelt one fails here, before anything runs. This module only parses, checks and resolves; pipelines/run.py
executes.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from megatron_prune.pipelines.verbs import RECIPE_VERBS, VERBS

OUTPUT_KEY = "out"  # the option of every recipe verb that names its output (default: the verb's stage_out)


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
        if not isinstance(spec, dict) or spec.get("verb") not in RECIPE_VERBS:
            raise RecipeError(f"{path}: stage {name!r} needs `verb:` one of {', '.join(RECIPE_VERBS)}")
        options = {k: v for k, v in spec.items() if k not in ("verb", "tp", "pp")}
        verb = spec["verb"]
        check_options(path, name, verb, options)
        options.setdefault(OUTPUT_KEY, VERBS[verb].stage_out.format(name=name))
        recipe.stages.append(Stage(name, verb, options, int(spec.get("tp", doc.get("tp", 1))),
                                   int(spec.get("pp", doc.get("pp", 1)))))
    names = [s.name for s in recipe.stages]
    for s in recipe.stages:  # references only to earlier stages (a stage's own output path is not one)
        inputs = {k: v for k, v in s.options.items() if k != OUTPUT_KEY}
        for ref in references(inputs, names):
            if names.index(ref) >= names.index(s.name):
                raise RecipeError(f"{path}: stage {s.name!r} uses {ref!r}, which runs later; order the stages")
    return recipe


def check_options(path: Path, name: str, verb: str, options: dict) -> None:
    """The stage sets only options of its verb (a misspelling names the closest one) and every required one."""
    known = VERBS[verb].recipe_options()
    for key, value in options.items():
        where = f"{path}: stage {name!r} ({verb})"
        if key not in known:
            raise RecipeError(f"{where}: unknown option {key!r}; {_closest(key, list(known) + ['tp', 'pp'])}")
        if known[key].keys is not None and isinstance(value, dict):
            subkeys = known[key].keys()
            for sub in value:
                if sub not in subkeys:
                    raise RecipeError(f"{where}: unknown option {key}.{sub}; {_closest(sub, subkeys)}")
    for option in known.values():
        needed = option.required or (option.positional and option.nargs not in ("?", "*"))
        if needed and option.name != OUTPUT_KEY and option.name not in options:
            raise RecipeError(f"{path}: stage {name!r} ({verb}) needs `{option.name}:`")


def _closest(key: str, valid: list) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    return f"did you mean {close[0]!r}?" if close else f"the options of this verb are {', '.join(sorted(valid))}"


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
