"""Rules every written output follows: it never overlaps an input, and its files follow the user's umask."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Mapping, Optional


class OutputPathError(ValueError):
    """An output path that would overwrite, contain, or sit inside an input."""


def check_output_path(out: str | os.PathLike, inputs: Mapping[str, Optional[str | os.PathLike]],
                      flag: str = "--out") -> None:
    """Refuse ``out`` when it is, contains, or lies inside one of ``inputs`` ({description: path}).

    ``--overwrite`` replaces the output directory: if that directory were (or held) an input, the input
    would be destroyed; an output inside an input would modify it. Symlinks are resolved first.
    """
    o = Path(out).resolve()
    for what, path in inputs.items():
        if path is None or str(path) == "":
            continue
        i = Path(path).resolve()
        if o == i:
            relation = "is"
        elif i.is_relative_to(o):
            relation = "contains"
        elif o.is_relative_to(i):
            relation = "is inside"
        else:
            continue
        raise OutputPathError(f"{flag} {out} {relation} the {what} {path}: writing it would modify or delete an "
                              f"input. Choose an output path outside the inputs (e.g. a sibling directory)")


def _umask() -> int:
    """The process umask, read without changing it where Linux exposes it (changing it races other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file the mode an ordinary ``open()`` would (0666 minus the umask).

    The safetensors writer creates its files 0600, which teammates on a shared file system cannot read.
    """
    os.chmod(path, 0o666 & ~_umask())


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as JSON next to ``path`` and rename it into place: readers never see half a file."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
        os.replace(tmp, path)
    except BaseException:  # a full disk or a stop signal: no temporary file stays behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def replace_dir(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; an existing ``out`` (``--overwrite``) is moved aside first and only
    deleted once the new one is in place, so neither is lost whenever a crash or a stop signal comes."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old"
    if old.exists():
        shutil.rmtree(old)
    try:
        out.rename(old)
        tmp.rename(out)
    except BaseException:  # a stop signal between the two renames: the previous output goes back
        if old.exists() and not out.exists():
            old.rename(out)
        raise
    shutil.rmtree(old)
