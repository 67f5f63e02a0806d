"""lm-evaluation-harness adapter: loglikelihoods, rolling loglikelihoods and greedy generations equal
transformers' on the same Hugging Face model (fp32) at TP1 (DP2), TP2 and PP2; `eval --tasks` end to end on
local offline tasks gives the accuracy computed from transformers; bad task inputs fail clearly.

Everything is offline: the tasks are JSON files written here, and HF_*_OFFLINE forbid any download.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_utils import run_ranks

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
ROLL_LEN = 24  # a small context window, so the rolling documents need several windows
GEN_TOKS = 10


@pytest.fixture(scope="module", autouse=True)
def offline(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        for k, v in OFFLINE.items():
            mp.setenv(k, v)
        mp.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("hf_datasets")))
        yield


# ---- local tasks ------------------------------------------------------------------------------------------

def _mc_docs():
    words = ["apple", "river", "stone", "cloud", "violin", "garden", "tiger", "copper", "winter", "lantern"]
    docs = []
    for i in range(20):
        a, b = i % 7 + 1, (3 * i) % 5 + 2
        choices = [str(a + b), str(a + b + 1), words[i % 10], f"{words[(i + 3) % 10]} {words[(i + 5) % 10]}"]
        docs.append({"question": f"What is {a} plus {b}?", "choices": choices, "answer": i % 4})
    return docs


def _arith_docs():
    return [{"question": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(2, 3), (7, 1), (4, 4), (9, 6), (1, 1),
                                                                       (5, 8)]]


def _roll_docs():
    return [{"text": " ".join(["The quick brown fox jumps over the lazy dog."] * 6)},
            {"text": "Megatron shards a model over tensor and pipeline ranks; pruning keeps the important parts."},
            {"text": "short"}]


def _write_task(folder: Path, name: str, docs: list[dict], body: str) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        + body)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    _write_task(d, "mp_mc", _mc_docs(), 'output_type: multiple_choice\n'
                'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
                'metric_list:\n  - metric: acc\n  - metric: acc_norm\n')
    _write_task(d, "mp_arith", _arith_docs(), 'output_type: generate_until\ndoc_to_text: "{{question}}"\n'
                f'doc_to_target: answer\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: {GEN_TOKS}\n'
                '  do_sample: false\nmetric_list:\n  - metric: exact_match\n')
    _write_task(d, "mp_rolling", _roll_docs(), 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
                'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'
                '  - metric: bits_per_byte\n')
    return d


# ---- references from transformers -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf(tiny_chat_ckpt):
    import transformers

    hf_dir = tiny_chat_ckpt.parent / "hf"
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(hf_dir)


def _prefix(tok) -> int:
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id


@torch.no_grad()
def _hf_token_logprobs(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(ids[t] | ids[:t]) for t >= 1, and whether ids[t] is the argmax, naively from the full softmax."""
    logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    target = torch.tensor(ids[1:])
    return logp[:-1].gather(-1, target[:, None])[:, 0], logp[:-1].argmax(-1) == target


def _hf_loglikelihood(model, tok, context: str, continuation: str) -> tuple[float, bool, int]:
    """lm-eval's convention: the continuation's tokens are those of context+continuation after the context's."""
    ctx = tok.encode(context, add_special_tokens=False)
    whole = tok.encode(context + continuation, add_special_tokens=False)
    lp, greedy = _hf_token_logprobs(model, whole)
    n = len(whole) - len(ctx)
    return float(lp[-n:].double().sum()), bool(greedy[-n:].all()), n


def _hf_rolling(model, tok, text: str, window: int) -> float:
    """Total log-likelihood of a document scored in disjoint chunks of ``window`` tokens, each conditioned on the
    ``window`` tokens before its end (the first on the prefix token): written here without lm-eval's utilities."""
    full = [_prefix(tok)] + tok.encode(text, add_special_tokens=False)
    total = 0.0
    for a in range(0, len(full) - 1, window):  # predict full[a+1 : b+1]
        b = min(a + window, len(full) - 1)
        lp, _ = _hf_token_logprobs(model, full[max(0, b - window): b + 1])  # at most `window` tokens of input
        total += float(lp[-(b - a):].double().sum())
    return total


@torch.no_grad()
def _hf_generate(model, tok, prompt: str, new: int, stop: list[str]) -> str:
    ids = tok.encode(prompt, add_special_tokens=False)
    out = model.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id)
    text = tok.decode(out[0, len(ids):], skip_special_tokens=True)
    cuts = [text.index(s) for s in stop if s in text]
    return text[: min(cuts)] if cuts else text


def _mc_requests():
    return [("Question: " + d["question"] + "\nAnswer:", " " + c) for d in _mc_docs() for c in d["choices"]]


GEN_PROMPTS = ["2+3=", "Once upon a time", "def add(a, b):", "The capital of France is"]


def _gen_requests(stops: list[str]) -> list[tuple[str, dict]]:
    """Every prompt twice: with a stop string that never occurs (one batch of all prompts), and with its own
    stop string (one group each)."""
    plain = [(p, {"until": ["@@never@@"], "max_gen_toks": GEN_TOKS, "do_sample": False}) for p in GEN_PROMPTS]
    own = [(p, {"until": [s], "max_gen_toks": GEN_TOKS, "do_sample": False}) for p, s in zip(GEN_PROMPTS, stops)]
    return plain + own


@pytest.fixture(scope="module")
def stops(hf):
    """For each prompt, a stop string taken from the middle of transformers' greedy text, so cutting happens."""
    model, tok = hf
    out = []
    for p in GEN_PROMPTS:
        text = _hf_generate(model, tok, p, GEN_TOKS, [])
        mid = len(text) // 2
        out.append(text[mid: mid + 2] or "@@never@@")
    return out


# ---- the adapter at three layouts on two ranks ------------------------------------------------------------

def _adapter_layouts(ckpt, mc, docs, gen, tasks_dir):
    from lm_eval.api.instance import Instance

    from megatron_prune.evaluation import lm_eval_tasks as lt
    from megatron_prune.evaluation.lm_eval_model import MegatronLM, load_for_lm_eval

    out = {}
    for tp, pp in [(1, 1), (2, 1), (1, 2)]:  # (1, 1) on two ranks: DP2
        model, arch, tok = load_for_lm_eval(ckpt, tp, pp)
        lm = MegatronLM(model=model, arch=arch, tokenizer=tok, batch_size=5)
        short = MegatronLM(model=model, arch=arch, tokenizer=tok, batch_size=3, max_length=ROLL_LEN)
        r = {
            "ll": lm.loglikelihood([Instance("loglikelihood", {}, a, i) for i, a in enumerate(mc)], disable_tqdm=True),
            "rolling": short.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), i)
                                                    for i, t in enumerate(docs)], disable_tqdm=True),
            "gen": lm.generate_until([Instance("generate_until", {}, a, i) for i, a in enumerate(gen)],
                                     disable_tqdm=True),
            "dp": lm.world_size,
        }
        if (tp, pp) in [(1, 1), (1, 2)]:  # through lm-eval's evaluator: split over 2 DP replicas, and PP2
            tm = lt.task_manager(["mp_mc"], tasks_dir)
            res = lt.run_tasks(lm, lt.load_tasks(tm, ["mp_mc"]), tm, bootstrap_iters=0)
            r["acc"] = None if res is None else res["results"]["mp_mc"]["acc,none"]
        out[(tp, pp)] = r
    return out


@pytest.fixture(scope="module")
def layouts(tiny_chat_ckpt, tasks_dir, stops):
    docs = [d["text"] for d in _roll_docs()]
    ranks = run_ranks(_adapter_layouts, 2, tiny_chat_ckpt, _mc_requests(), docs, _gen_requests(stops), tasks_dir)
    for key in ranks[0]:  # every rank returns the same answers (lm-eval keeps rank 0's)
        for what in ("ll", "rolling", "gen"):
            assert ranks[1][key][what] == ranks[0][key][what], (key, what)
    return ranks[0]


@pytest.fixture(scope="module")
def mc_reference(hf):
    model, tok = hf
    return [_hf_loglikelihood(model, tok, c, x) for c, x in _mc_requests()]


@pytest.fixture(scope="module")
def rolling_reference(hf):
    model, tok = hf
    docs = [d["text"] for d in _roll_docs()]
    whole = [_prefix(tok)] + tok.encode(docs[0], add_special_tokens=False)
    return ([_hf_rolling(model, tok, t, ROLL_LEN) for t in docs],
            [len(tok.encode(t, add_special_tokens=False)) for t in docs],
            float(_hf_token_logprobs(model, whole)[0].double().sum()))


@pytest.fixture(scope="module")
def gen_reference(hf, stops):
    model, tok = hf
    return [_hf_generate(model, tok, p, kw["max_gen_toks"], kw["until"]) for p, kw in _gen_requests(stops)]


def _accuracy(lls: list[float]) -> tuple[float, float]:
    """lm-eval's acc and acc_norm (log-likelihood per character of the choice) from per-choice loglikelihoods."""
    acc = norm = 0
    k = 0
    for d in _mc_docs():
        ll = lls[k: k + len(d["choices"])]
        k += len(d["choices"])
        acc += max(range(len(ll)), key=lambda j: (ll[j], -j)) == d["answer"]
        per_char = [x / len(c) for x, c in zip(ll, d["choices"])]
        norm += max(range(len(ll)), key=lambda j: (per_char[j], -j)) == d["answer"]
    return acc / len(_mc_docs()), norm / len(_mc_docs())


@pytest.mark.parametrize("layout", [(1, 1), (2, 1), (1, 2)], ids=["tp1_dp2", "tp2", "pp2"])
def test_loglikelihood_matches_transformers(layouts, mc_reference, layout):
    got = layouts[layout]["ll"]
    assert len(got) == len(mc_reference) == 80
    for (ll, greedy), (ref, ref_greedy, n) in zip(got, mc_reference):
        assert abs(ll - ref) <= 1e-4 * n, (ll, ref, n)
        assert greedy == ref_greedy
    assert any(n > 1 for *_, n in mc_reference)  # multi-token continuations are among them


@pytest.mark.parametrize("layout", [(1, 1), (2, 1), (1, 2)], ids=["tp1_dp2", "tp2", "pp2"])
def test_loglikelihood_rolling_matches_transformers(layouts, rolling_reference, layout):
    refs, lengths, unwindowed = rolling_reference
    assert max(lengths) > 2 * ROLL_LEN and min(lengths) < ROLL_LEN  # several windows, and a single one
    for got, ref, n in zip(layouts[layout]["rolling"], refs, lengths):
        assert abs(got - ref) <= 1e-4 * n, (got, ref, n)
    # the windows matter: the long document scored with its whole history has another log-likelihood
    assert abs(unwindowed - layouts[layout]["rolling"][0]) > 1e-2


@pytest.mark.parametrize("layout", [(1, 1), (2, 1), (1, 2)], ids=["tp1_dp2", "tp2", "pp2"])
def test_generate_until_matches_transformers_greedy(layouts, gen_reference, layout):
    expected = gen_reference
    assert layouts[layout]["gen"] == expected
    n = len(GEN_PROMPTS)
    assert sum(len(expected[n + i]) < len(expected[i]) for i in range(n)) >= n // 2  # stop strings did cut


def test_evaluator_splits_over_data_parallel_replicas(layouts, mc_reference):
    assert layouts[(1, 1)]["dp"] == 2 and layouts[(2, 1)]["dp"] == 1
    acc, _ = _accuracy([r[0] for r in mc_reference])
    assert layouts[(1, 1)]["acc"] == pytest.approx(acc)
    assert layouts[(1, 2)]["acc"] == pytest.approx(acc)


# ---- the CLI ----------------------------------------------------------------------------------------------

def _cli(*args, timeout=600):
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(Path(__file__).parent.parent)}
    return subprocess.run([sys.executable, "-m", "megatron_prune.cli", "eval", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_cli_eval_tasks_end_to_end(tiny_chat_ckpt, tasks_dir, tmp_path, hf, mc_reference):
    model, tok = hf
    out = tmp_path / "results.json"
    done = _cli(tiny_chat_ckpt, "--tasks", "mp_mc,mp_arith,mp_rolling", "--include-path", tasks_dir, "--out", out,
                "--batch-size", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(out.read_text())
    acc, acc_norm = _accuracy([r[0] for r in mc_reference])
    assert res["tasks"]["mp_mc"]["acc"] == pytest.approx(acc)
    assert res["tasks"]["mp_mc"]["acc_norm"] == pytest.approx(acc_norm)
    answers = [_hf_generate(model, tok, d["question"], GEN_TOKS, ["\n", tok.eos_token]) for d in _arith_docs()]
    em = sum(a == d["answer"] for a, d in zip(answers, _arith_docs())) / len(answers)
    assert res["tasks"]["mp_arith"]["exact_match"] == pytest.approx(em)
    # word perplexity: exp(-total log-likelihood / words), each document fitting the model's 256 positions
    lls = [_hf_rolling(model, tok, d["text"], 256) for d in _roll_docs()]
    words = sum(len(re.split(r"\s+", d["text"])) for d in _roll_docs())
    assert res["tasks"]["mp_rolling"]["word_perplexity"] == pytest.approx(math.exp(-sum(lls) / words), rel=1e-4)
    assert res["lm_eval"]["results"]["mp_mc"]["acc,none"] == res["tasks"]["mp_mc"]["acc"]
    assert "|mp_mc" in done.stdout and "|acc_norm" in done.stdout  # the table


def test_cli_bad_include_path(tiny_chat_ckpt, tmp_path, capsys):
    from megatron_prune.cli import main

    assert main(["eval", str(tiny_chat_ckpt), "--tasks", "mp_mc", "--include-path", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "--include-path" in err and "does not exist" in err


def test_unknown_task_and_download_errors(tasks_dir, tmp_path):
    from megatron_prune.evaluation import lm_eval_tasks as lt

    with pytest.raises(lt.TaskError, match=r"(?s)mp_mcc: did you mean mp_mc.*hellaswg: did you mean hellaswag"):
        lt.task_manager(["mp_mcc", "hellaswg"], tasks_dir)  # builds lm-eval's full index once
    # a task whose data set lives on the Hub (here: one that does not exist, so the outcome is the same with or
    # without a network): named, with what to do
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "mp_remote.yaml").write_text("task: mp_remote\ndataset_path: megatron-prune-tests/no-such-dataset\n"
                                           "test_split: test\noutput_type: loglikelihood\ndoc_to_text: q\n"
                                           "doc_to_target: a\n")
    tm = lt.task_manager(["mp_remote"], remote)
    with pytest.raises(lt.TaskError, match=r"(?s)task mp_remote: its data set could not be loaded.*network"):
        lt.load_tasks(tm, ["mp_remote"])
    with pytest.raises(lt.TaskError, match="no .yaml task files"):
        lt.check_include_path(_empty(tmp_path))
    with pytest.raises(lt.TaskError, match="--tasks is empty"):
        lt.parse_task_names(" , ")


def _empty(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def test_recipe_eval_stage_reports_lm_eval_scores(tiny_chat_ckpt, tasks_dir, tmp_path, mc_reference):
    """A family recipe's eval stage with `tasks:`: one report column per task and metric."""
    import yaml

    recipe = tmp_path / "family.yaml"
    recipe.write_text(yaml.safe_dump({"stages": {"eval": {
        "verb": "eval", "models": [str(tiny_chat_ckpt)], "tasks": "mp_mc", "include_path": str(tasks_dir),
        "data": str(_valid_prefix(tmp_path)), "seq_len": 32, "max_sequences": 2, "batch_size": 4}}}))
    done = subprocess.run([sys.executable, "-m", "megatron_prune.cli", "run", str(recipe), "--workdir",
                           str(tmp_path / "work")], capture_output=True, text=True,
                          env={**os.environ, **OFFLINE, "PYTHONWARNINGS": "ignore"})
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads((tmp_path / "work" / "eval.json").read_text())["rows"]
    acc, acc_norm = _accuracy([r[0] for r in mc_reference])
    assert row["mp_mc/acc"] == pytest.approx(acc) and row["mp_mc/acc_norm"] == pytest.approx(acc_norm)
    assert "mp_mc/acc" in (tmp_path / "work" / "report.md").read_text()


def _valid_prefix(tmp_path: Path) -> Path:
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "valid.bin"), dtype=np.int32)
    for doc in np.random.default_rng(0).integers(0, 49152, size=(4, 40), dtype=np.int32):
        builder.add_document(torch.from_numpy(doc), [40])
    builder.finalize(str(tmp_path / "valid.idx"))
    return tmp_path / "valid"
