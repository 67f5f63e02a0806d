"""SFT data (chat template, answer-only loss mask, batches) and `megatron-prune sft` (one step = naive masked CE)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from distributed_utils import run_ranks


@pytest.fixture(scope="module")
def tok(smol_tokenizer_dir):
    from megatron_prune.data.sft import load_tokenizer

    return load_tokenizer(smol_tokenizer_dir)


# ------------------------------------------------------------------------------------------------ records
def test_record_forms_and_errors():
    from megatron_prune.data.sft import to_messages

    assert to_messages({"instruction": "Add.", "input": "2 and 3", "output": "5"}) == [
        {"role": "user", "content": "Add.\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert to_messages({"messages": chat}) == chat
    with pytest.raises(ValueError, match="either 'messages'"):
        to_messages({"prompt": "x", "completion": "y"})
    with pytest.raises(ValueError, match="last message must be the assistant"):
        to_messages({"messages": chat[:2]})
    with pytest.raises(ValueError, match="role system/user/assistant"):
        to_messages({"messages": [{"role": "bot", "content": "a"}]})


def test_read_sft_jsonl_names_the_bad_line(tmp_path):
    from megatron_prune.data.sft import read_sft_jsonl

    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"d.jsonl:2: not valid JSON"):
        read_sft_jsonl(p)
    with pytest.raises(FileNotFoundError, match="corpus sft"):
        read_sft_jsonl(tmp_path / "missing.jsonl")


# ------------------------------------------------------------------------------------------------ the mask
def test_mask_covers_exactly_the_answers(tok):
    from megatron_prune.data.sft import tokenize_chat

    msgs = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "2 + 3 = 5\n#### 5"},
            {"role": "user", "content": "And times 4?"}, {"role": "assistant", "content": "5 x 4 = 20\n#### 20"}]
    ids, mask = tokenize_chat(tok, msgs)
    assert len(ids) == len(mask)
    full_text = tok.apply_chat_template(msgs, tokenize=False)
    assert tok.decode(ids) == full_text  # nothing lost or added by cutting at the turn boundaries
    answer = tok.decode([i for i, m in zip(ids, mask) if m])
    assert answer == "2 + 3 = 5\n#### 5<|im_end|>\n5 x 4 = 20\n#### 20<|im_end|>\n"  # answers + end of turn
    prompt = tok.decode([i for i, m in zip(ids, mask) if not m])
    assert "What is 2+3?" in prompt and "And times 4?" in prompt and "#### 5" not in prompt and "#### 20" not in prompt
    assert prompt.count("<|im_start|>assistant\n") == 2  # the generation prompt is a prompt token


def test_dataset_labels_and_mask_line_up(tok):
    from megatron_prune.data.sft import SFTDataset, tokenize_chat

    examples = [tokenize_chat(tok, [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}])
                for w in ("alpha", "beta", "gamma")]
    seq = max(len(i) for i, _ in examples) * 2  # room for two examples per packed window
    for pack in (True, False):
        ds = SFTDataset(examples, seq_len=seq, pad_id=tok.pad_token_id, seed=3, pack=pack)
        assert len(ds) == (2 if pack else 3)
        answers = []
        for i in range(len(ds)):
            item = ds[i]
            assert torch.equal(item["tokens"][1:], item["labels"][:-1])  # labels are the next tokens
            answers.append(tok.decode(item["labels"][item["loss_mask"] > 0]))
        decoded = "".join(answers)
        for w in ("alpha", "beta", "gamma"):
            assert decoded.count(f"{w}<|im_end|>\n") == 1
        assert "Say" not in decoded and "<|im_start|>" not in decoded
        # a second epoch is a reshuffle of the same samples
        epoch2 = sorted(tuple(ds[len(ds) + i]["tokens"].tolist()) for i in range(len(ds)))
        assert epoch2 == sorted(tuple(ds[i]["tokens"].tolist()) for i in range(len(ds)))


# ------------------------------------------------------------------------------------------------ offline set
def test_arithmetic_problems_are_exact_and_deterministic():
    from megatron_prune.data.sft import arithmetic_problems, final_answer

    probs = arithmetic_problems(300, seed=5)
    assert probs == arithmetic_problems(300, seed=5) and probs != arithmetic_problems(300, seed=6)
    for p in probs:
        assert p["output"].splitlines()[-1] == f"#### {p['answer']}"
        assert final_answer(p["output"]) == p["answer"]
        for a, op, b, c in re.findall(r"(\d+) ([-+x/]) (\d+) = (\d+)", p["output"]):  # every worked step is right
            a, b, c = int(a), int(b), int(c)
            assert (a + b if op == "+" else a - b if op == "-" else a * b if op == "x" else a / b) == c, p["output"]
        assert p["answer"] >= 0
    assert len({p["instruction"] for p in probs}) > 280


def test_final_answer():
    from megatron_prune.data.sft import final_answer

    assert final_answer("so 3 + 4 = 7\n#### 7") == 7
    assert final_answer("#### 1,234 apples") == 1234
    assert final_answer("The answer is -12.") == -12
    assert final_answer("first 3 then 9") == 9
    assert final_answer("#### 5\n#### 6") == 6
    assert final_answer("no number") is None


def test_sft_corpus_splits(tmp_path):
    from megatron_prune.data.sft import read_sft_jsonl
    from megatron_prune.pipelines.data import prepare_data

    paths = prepare_data("sft", out_dir=tmp_path, max_docs=100)
    train, held = read_sft_jsonl(paths["train"]), read_sft_jsonl(paths["heldout"])
    arith = [r for r in train + held if r["task"] == "arithmetic"]
    he = [r for r in train + held if r["task"] == "humaneval"]
    assert len(arith) == 100 and len(he) == 164
    assert sum(r["task"] == "arithmetic" for r in held) == 25 and sum(r["task"] == "humaneval" for r in held) == 41
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in held}
    assert all(r["output"].startswith("```python\n") and "def " in r["output"] for r in he)


# ------------------------------------------------------------------------------------------------ sft step
@pytest.fixture(scope="module")
def sft_setup(tiny_chat_ckpt, tmp_path_factory):
    """The tiny chat checkpoint (conftest) and an SFT JSONL of arithmetic problems."""
    from megatron_prune.data.sft import arithmetic_problems, write_jsonl

    root = tmp_path_factory.mktemp("sft")
    (root / "ckpt").symlink_to(tiny_chat_ckpt)
    (root / "hf").symlink_to(tiny_chat_ckpt.parent / "hf")
    write_jsonl(arithmetic_problems(6, seed=1), root / "train.jsonl")
    return root


def _export(ckpt, out):
    from megatron_prune.pipelines.convert import megatron_to_hf

    megatron_to_hf(ckpt, out)


SEQ, GBS = 96, 2


def _sft_step(root, out, tp, pp):
    from megatron_prune.pipelines.sft import sft

    return sft(student=str(root / "ckpt"), data=[str(root / "train.jsonl")], out=str(out), tp=tp, pp=pp,
               seq_len=SEQ, micro_batch_size=GBS, global_batch_size=GBS, steps=1, optimizer="sgd", lr=1.0, min_lr=1.0,
               warmup_steps=0, weight_decay=0.0, clip_grad=1e9, save_every=1, seed=7)[-1]


def _naive_step(root):
    """The reference: transformers' model, mean cross entropy over the answer tokens, one SGD step of lr 1."""
    import transformers

    from megatron_prune.data.sft import build_sft_dataset

    ds = build_sft_dataset([root / "train.jsonl"], root / "hf", SEQ, seed=7)
    items = [ds[i] for i in range(GBS)]
    tokens, labels = torch.stack([it["tokens"] for it in items]), torch.stack([it["labels"] for it in items])
    mask = torch.stack([it["loss_mask"] for it in items])
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "hf", dtype=torch.float32,
                                                              attn_implementation="eager")
    logits = model(tokens).logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
    loss = (ce * mask.reshape(-1)).sum() / mask.sum()
    loss.backward()
    prompt_grad = mask.sum() < mask.numel()
    return loss.item(), {k: (p - p.grad).detach() for k, p in model.named_parameters()}, bool(prompt_grad)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1)])
def test_one_sft_step_equals_naive_masked_ce(sft_setup, tmp_path, tp, pp):
    import transformers

    rec = run_ranks(_sft_step, tp * pp, sft_setup, tmp_path / "run", tp, pp)[0]
    ref_loss, ref_weights, has_prompt = _naive_step(sft_setup)
    assert has_prompt  # the batch has prompt tokens, which the mask excludes
    assert rec["lm"] == pytest.approx(ref_loss, rel=1e-5)
    run_ranks(_export, 1, tmp_path / "run" / "step_0000001", tmp_path / "hf_after")
    after = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_after", dtype=torch.float32)
    got = dict(after.named_parameters())
    assert set(got) == set(ref_weights)
    for k, ref in ref_weights.items():
        torch.testing.assert_close(got[k], ref, rtol=1e-4, atol=2e-5, msg=k)


def test_sft_rejects_indexed_data_and_teacher(sft_setup, tmp_path):
    from megatron_prune.pipelines.sft import sft

    with pytest.raises(ValueError, match="takes SFT JSONL"):
        sft(student=str(sft_setup / "ckpt"), data=["some/prefix"], out=str(tmp_path / "r"), steps=1)
    with pytest.raises(ValueError, match="without a teacher"):
        sft(student=str(sft_setup / "ckpt"), teacher="x", data=[str(sft_setup / "train.jsonl")], out=str(tmp_path),
            steps=1)
