"""Write fiddle's JSON serialization of a small config graph, without fiddle or NeMo installed.

NeMo 2 rebuilds a model from ``context/io.json``: fiddle's serialization (``fiddle._src.experimental.
serialization``, format version 0.0.1) of a ``fdl.Config`` tree whose callables are NeMo classes. We write the
same format for a tree of :class:`Call` (a ``fdl.Config(fn, **arguments)``), :class:`PyRef` (an importable
object such as ``torch.bfloat16``), dicts and JSON leaves. Checked by NeMo's own ``io.load_context`` and
``llm.export_ckpt`` (launch/real_tools/nemo2_check.sh).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

_FDL_CONFIG = {"type": "pyref", "module": "fiddle._src.config", "name": "Config"}
_FDL_METADATA = {"type": "pyref", "module": "fiddle._src.config", "name": "BuildableTraverserMetadata"}
_TUPLE = {"type": "pyref", "module": "builtins", "name": "tuple"}
_DICT = {"type": "pyref", "module": "builtins", "name": "dict"}
_EMPTY_TUPLE = {"type": _TUPLE, "items": [], "metadata": None}


@dataclass(frozen=True)
class PyRef:
    """An importable object by module and name (``torch.bfloat16``, ``torch.nn.functional.silu``)."""

    module: str
    name: str


@dataclass
class Call:
    """``fdl.Config(module.name, **arguments)``: arguments in the order they were given."""

    module: str
    name: str
    arguments: dict = field(default_factory=dict)


class _Writer:
    def __init__(self):
        self.objects: dict[str, dict] = {}
        self.counts: dict[str, int] = {}

    def _key(self, stem: str) -> str:
        self.counts[stem] = self.counts.get(stem, 0) + 1
        return f"{stem}_{self.counts[stem]}"

    def _add(self, stem: str, obj: dict) -> dict:
        key = self._key(stem)
        self.objects[key] = obj
        return {"type": "ref", "key": key}

    def _empty_dict(self) -> dict:
        return self._add("dict", {"type": _DICT, "items": [], "metadata": _EMPTY_TUPLE})

    def value(self, v: Any, path: str) -> dict:
        if isinstance(v, Call):
            return self.call(v, path)
        if isinstance(v, PyRef):
            return {"type": "pyref", "module": v.module, "name": v.name}
        if isinstance(v, dict):
            items = [[f"Key(key={k!r})", self.value(x, f"{path}[{k!r}]")] for k, x in v.items()]
            keys = self._add("tuple", {"type": _TUPLE, "items": [[f"Index(index={i})", k] for i, k in enumerate(v)],
                                       "metadata": None}) if v else _EMPTY_TUPLE
            return self._add("dict", {"type": _DICT, "items": items, "metadata": keys, "paths": [path]})
        if v is None or isinstance(v, (bool, int, float, str)):
            return {"type": "leaf", "value": v, "paths": [path]}
        raise TypeError(f"cannot serialize {type(v).__name__} at {path}")

    def call(self, c: Call, path: str) -> dict:
        items = [[f"Attr(name={name!r})", self.value(v, f"{path}.{name}")] for name, v in c.arguments.items()]
        names = self._add("tuple", {"type": _TUPLE, "items": [[f"Index(index={i})", n] for i, n in
                                                              enumerate(c.arguments)], "metadata": None})
        tags, history = self._empty_dict(), self._empty_dict()
        metadata = self._add("buildable_traverser_metadata", {
            "type": _FDL_METADATA,
            "items": [["Attr(name='fn_or_cls')", {"type": "pyref", "module": c.module, "name": c.name}],
                      ["Attr(name='argument_names')", names], ["Attr(name='argument_tags')", tags],
                      ["Attr(name='argument_history')", history]],
            "metadata": _FDL_METADATA})
        stem = re.sub(r"(?<!^)(?=[A-Z])", "_", c.name).lower()  # LlamaModel -> llama_model, as fiddle names it
        return self._add(stem, {"type": _FDL_CONFIG, "items": items, "metadata": metadata, "paths": [path]})


def dumps(root: Call) -> str:
    """fiddle's JSON for the graph ``root`` (every object referenced once)."""
    w = _Writer()
    ref = w.call(root, "<root>")
    return json.dumps({"root": ref, "objects": w.objects, "refcounts": {k: 1 for k in w.objects},
                       "version": "0.0.1"})
