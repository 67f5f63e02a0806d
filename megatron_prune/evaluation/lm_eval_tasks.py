"""lm-eval tasks by name (built-in, or local YAML files under --include-path), checked and loaded before any
model is, and run through lm-eval's public ``simple_evaluate`` with our model object.

Indexing lm-eval's ~15k built-in task files takes seconds; when every requested task is found under the
include path, only that path is indexed.
"""

from __future__ import annotations

import difflib
import json
import logging
from pathlib import Path
from typing import Optional, Sequence

from megatron_prune.inputs import InputError

_GLOB = set("*?[")


class TaskError(InputError):
    """A task that cannot be run: unknown name, bad include path, or data that cannot be loaded."""


def parse_task_names(tasks: str | Sequence[str]) -> list[str]:
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise TaskError("--tasks is empty; give comma-separated lm-eval task names (e.g. --tasks hellaswag,arc_easy)")
    return names


def check_include_path(include_path) -> Optional[Path]:
    if include_path is None:
        return None
    p = Path(include_path)
    if not p.exists():
        raise TaskError(f"--include-path {include_path} does not exist; give the folder that holds your task YAMLs")
    if p.is_dir() and not any(p.rglob("*.yaml")):
        raise TaskError(f"--include-path {include_path} holds no .yaml task files")
    return p


def task_manager(names: Sequence[str], include_path=None):
    """A TaskManager that knows every name in ``names`` (globs and YAML file paths allowed), or a TaskError
    naming the unknown ones and their closest matches."""
    from lm_eval.tasks import TaskManager

    path = check_include_path(include_path)
    wanted = [n for n in names if not _is_file_spec(n)]
    if path is not None:
        local = TaskManager(include_path=str(path), include_defaults=False)
        if all(_known(local, n) for n in wanted):
            return local
    tm = TaskManager(include_path=str(path) if path is not None else None)
    unknown = [n for n in wanted if not _known(tm, n)]
    if unknown:
        lines = []
        for n in unknown:
            close = difflib.get_close_matches(n, tm.all_tasks, n=5, cutoff=0.6)
            lines.append(f"  {n}: " + (f"did you mean {', '.join(close)}?" if close else "no similar task name"))
        where = f"lm-eval {_version()}'s built-in tasks" + (f" or {include_path}" if path is not None else "")
        raise TaskError(f"unknown lm-eval task(s), not in {where}:\n" + "\n".join(lines) +
                        "\nlocal tasks: put their YAML files in a folder and pass it with --include-path")
    return tm


def _is_file_spec(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


def _known(tm, name: str) -> bool:
    return bool(tm.match_tasks([name])) if _GLOB & set(name) else name in tm.all_tasks


def _version() -> str:
    import lm_eval

    return getattr(lm_eval, "__version__", "?")


def load_tasks(tm, names: Sequence[str]) -> list:
    """Build every task (which loads its data set) before the model is loaded: a task whose data needs a
    download that cannot happen fails here, by name."""
    objs: list = []
    for name in names:
        specs = tm.match_tasks([name]) if _GLOB & set(name) else [name]
        for spec in specs:
            try:
                loaded = tm.load([spec])
            except Exception as e:
                if _is_network_error(e):
                    raise TaskError(
                        f"task {spec}: its data set could not be loaded: {type(e).__name__}: {e}\n"
                        "Built-in lm-eval tasks download their data from the Hugging Face Hub: this needs the "
                        "network (once; the datasets cache keeps it) or a local copy: a task YAML with "
                        "`dataset_path: json` and `dataset_kwargs: {data_files: {test: /abs/path/data.jsonl}}` in a "
                        "folder given with --include-path (see docs/lm_eval.md)") from e
                raise TaskError(f"task {spec} could not be built: {type(e).__name__}: {e}") from e
            objs.extend(_top_level(loaded, spec))
    return objs


def _is_network_error(e: BaseException) -> bool:
    """A failed download or a missing data file: OSError (ConnectionError, FileNotFoundError, the Hub's offline
    and not-found errors) or an HTTP client's error, anywhere in the exception's chain."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) or type(e).__module__.split(".")[0] in _HTTP_MODULES:
            return True
        e = e.__cause__ or e.__context__
    return False


_HTTP_MODULES = {"httpx", "httpx2", "requests", "urllib3", "aiohttp", "huggingface_hub"}


def _top_level(loaded: dict, spec: str) -> list:
    """The objects a name stands for: its group when it is one, else its task(s) (a tag stands for several)."""
    groups = loaded.get("groups", {})
    children = {c for g in groups.values() for c in g.child_names}
    tops = [g for name, g in groups.items() if name not in children]
    return tops if tops else list(loaded["tasks"].values())


def run_tasks(lm, tasks: list, tm, num_fewshot: Optional[int] = None, limit: Optional[float] = None,
              apply_chat_template: bool = False, bootstrap_iters: int = 1000) -> Optional[dict]:
    """lm-eval's results (JSON-safe) on global rank 0; None on the other ranks (which still do their share)."""
    from lm_eval import simple_evaluate
    from lm_eval.utils import handle_non_serializable

    from megatron_prune.runtime import is_rank0

    if not is_rank0():
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    results = simple_evaluate(model=lm, tasks=tasks, task_manager=tm, num_fewshot=num_fewshot, limit=limit,
                              apply_chat_template=apply_chat_template, log_samples=False,
                              bootstrap_iters=bootstrap_iters)
    if results is None or not is_rank0():
        return None
    return json.loads(json.dumps(results, default=handle_non_serializable))


def summary(results: dict) -> dict:
    """{task or group: {metric: value}} without the stderr and alias entries."""
    out = {}
    for section in ("results", "groups"):
        for task, metrics in results.get(section, {}).items():
            out[task] = {k.split(",")[0]: v for k, v in metrics.items()
                         if k != "alias" and "_stderr" not in k and isinstance(v, (int, float))}
    return out


def table(results: dict) -> str:
    from lm_eval.utils import make_table

    text = make_table(results)
    if results.get("groups"):
        text += "\n" + make_table(results, "groups")
    return text
