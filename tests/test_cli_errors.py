"""Bad inputs to every verb end in one line naming the input and the fix (exit 2), before anything is loaded;
every option of every subcommand has help text and shows its default."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_prune import cli


class _Loaded(Exception):
    """Raised if a bad input got as far as a process group or a model: the validation came too late."""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return make_inputs(tmp_path_factory.mktemp("bad_inputs"))


def make_inputs(root: Path) -> Path:
    """A checkpoint directory with valid metadata (no weights: nothing may load them), a tiny indexed dataset,
    a tokenizer-less directory, a Hugging Face config directory, a score file that is not one, a broken plan."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_prune.arch import ModelArch
    from megatron_prune.checkpoint.megatron import FORMAT_VERSION, METADATA_FILE

    hf_config = dict(model_type="llama", vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                     num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5)
    arch = ModelArch.from_hf_config(hf_config)
    for name, a in (("ckpt", arch), ("mha", arch.replace(num_query_groups=8)),  # mha: 8 heads in 8 groups
                    ("ckpt_chat", arch), ("vocab2k", arch.replace(vocab_size=2000))):
        (root / name).mkdir()
        (root / name / METADATA_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, "arch": a.to_dict()}))
        (root / name / "metadata.json").write_text("{}")
        (root / name / ".metadata").write_text("")
    (root / "ckpt_chat" / "tokenizer").mkdir()  # a tokenizer with a chat template (files only: never loaded)
    (root / "ckpt_chat" / "tokenizer" / "tokenizer.json").write_text("{}")
    (root / "ckpt_chat" / "tokenizer" / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ x }}"}))
    (root / "empty.jsonl").write_text("\n")
    (root / "prompts.jsonl").write_text('{"tokens": [1, 2, 3]}\n\n{"tokens": [4, 5]}\n')
    (root / "text_prompts.txt").write_text("Once upon a time\n")
    (root / "broken.jsonl").write_text('{"tokens": [1, 2]}\n\n{"tokens": [3,\n')  # line 3 is cut off
    (root / "nokeys.jsonl").write_text('{"text": "hi"}\n')
    (root / "big_token.jsonl").write_text('{"tokens": [1, 2]}\n{"tokens": [5, 1000]}\n')  # vocab is 1000
    (root / "sft.jsonl").write_text(json.dumps({"instruction": "2+2?", "output": "4"}) + "\n")
    (root / "bad_sft.jsonl").write_text(json.dumps({"instruction": "2+2?", "output": "4"}) + "\n" +
                                        json.dumps({"instruction": "no answer"}) + "\n")
    hf = root / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(hf_config))
    data = root / "tokens"
    builder = IndexedDatasetBuilder(f"{data}.bin", dtype=DType.optimal_dtype(1000))
    import torch

    for doc in range(4):  # 4 documents of 600 tokens: 4 windows at the default --seq-len 512
        builder.add_document(torch.arange(doc, doc + 600) % 1000, [600])
    builder.finalize(f"{data}.idx")
    (root / "empty_dir").mkdir()
    (root / "not_scores.safetensors").write_text("not a safetensors file")
    (root / "plan.json").write_text("{ not json")
    (root / "bad.yaml").write_text("steps: [1, 2\n")
    (root / "a_file").write_text("x")
    (root / "tok").mkdir()
    (root / "tok" / "tokenizer.json").write_text("{}")  # enough for the checks, which never load it
    (root / "junk.bin").write_text("not tokens")
    (root / "junk.idx").write_text("not an index")
    return root


def _cases(r: Path):
    """(argv, fragments the message must contain). ``r``: the fixture directory."""
    ck, data, hf, nope = str(r / "ckpt"), str(r / "tokens"), str(r / "hf"), str(r / "nope")
    out = str(r / "new_out")
    tr = ["--student", ck, "--data", data, "--out", out]
    pr, gen, chat, sd = str(r / "prompts.jsonl"), str(r / "gen.jsonl"), str(r / "ckpt_chat"), str(r / "sd.jsonl")
    sft = ["--student", ck, "--data", str(r / "sft.jsonl")]
    se = ["--scores", str(r / "not_scores.safetensors"), "--out", out, "--valid-data", data, "--stage", "zero-shot"]
    return [
        # convert
        (["convert", nope, out], ["SRC", "does not exist"]),
        (["convert", str(r / "empty_dir"), out], ["SRC", "cannot tell what"]),
        (["convert", ck, out, "--tp", "3"], ["--tp/--pp", "export", "torchrun --nproc-per-node N"]),
        (["convert", ck, out, "--to", "megatron"], ["SRC", "already a Megatron checkpoint", "drop --to"]),
        (["convert", hf, out, "--to", "hf"], ["already a Hugging Face directory"]),
        (["convert", hf, str(r / "ckpt")], ["OUT", "already exists", "--overwrite"]),
        (["convert", hf, out, "--tp", "0"], ["--tp", "positive"]),
        (["convert", hf, out, "--tp", "3"], ["SRC", "num_query_groups=4 is not divisible by TP=3"]),
        # data
        (["data", "--tokenizer", nope, "--out", out], ["--tokenizer", "does not exist"]),
        (["data", "--tokenizer", str(r / "empty_dir"), "--out", out], ["--tokenizer", "no tokenizer files"]),
        (["data", "--tokenizer", ck, "--out", out], ["--tokenizer", "carries no tokenizer"]),
        (["data", "--tokenizer", str(r / "tok"), "--out", out, "--corpus", "wiki"], ["--corpus 'wiki'", "shakespeare"]),
        (["data", "--tokenizer", str(r / "tok"), "--out", out, "--jsonl", nope], ["--jsonl", "does not exist"]),
        (["data", "--tokenizer", str(r / "tok"), "--out", out, "--valid-fraction", "1.5"], ["--valid-fraction",
                                                                                            "[0, 1)"]),
        (["data", "--tokenizer", str(r / "tok"), "--out", out, "--max-docs", "0"], ["--max-docs", "positive"]),
        (["data", "--tokenizer", str(r / "tok"), "--out", str(r / "a_file")], ["--out", "is a file"]),
        # eval
        (["eval", hf, "--data", data], ["CKPT", "Hugging Face model", f"megatron-prune convert {hf} CKPT_DIR"]),
        (["eval", nope, "--data", data], ["CKPT", "does not exist"]),
        (["eval", ck, "--data", nope], ["--data", "no indexed dataset", "megatron-prune data"]),
        (["eval", ck, "--data", data + ".bin"], ["--data", "without .bin"]),
        (["eval", ck, "--data", str(r / "junk")], ["--data", "cannot be read as a Megatron indexed dataset"]),
        (["eval", ck, "--data", data, "--seq-len", "0"], ["--seq-len", "positive"]),
        (["eval", ck, "--data", data, "--micro-batch-size", "-1"], ["--micro-batch-size", "positive"]),
        (["eval", ck, "--data", data, "--seq-len", "5000"], ["--data", "0 windows of 5001 tokens", "--seq-len"]),
        (["eval", ck, "--data", data, "--tp", "3"], ["CKPT", "--tp 3", "not divisible by TP=3"]),
        (["eval", ck, "--data", data, "--out", str(r / "no_dir" / "x.json")], ["--out", "does not exist"]),
        (["eval", ck, "--data", data, "--seq-len", "abc"], ["--seq-len", "invalid int value"]),
        # importance
        (["importance", ck, "--data", nope, "--out", str(r / "s")], ["--data", "no indexed dataset"]),
        (["importance", ck, "--data", data, "--out", str(r / "s"), "--samples", "0"], ["--samples", "positive"]),
        (["importance", ck, "--data", data, "--out", str(r / "s"), "--samples", "100"],
         ["--data", "fewer than the 100", "--samples"]),
        (["importance", ck, "--data", data, "--out", str(r / "s"), "--samples", "2", "--lm-loss-drop", "4"],
         ["--lm-loss-drop", "[1, 3]"]),
        (["importance", ck, "--data", data, "--out", str(r / "empty_dir"), "--samples", "2"], ["--out",
                                                                                               "is a directory"]),
        # prune
        (["prune", ck, "--target", "hidden=32"], ["--plan", "--scores"]),
        (["prune", ck, "--scores", nope, "--target", "hidden=32"], ["--scores", "does not exist",
                                                                     "megatron-prune importance"]),
        (["prune", ck, "--scores", str(r / "not_scores.safetensors"), "--target", "hidden=32"],
         ["--scores", "not a megatron-prune score file"]),
        (["prune", ck, "--plan", str(r / "plan.json")], ["--plan", "not a valid plan file"]),
        (["prune", ck, "--plan", nope], ["--plan", "does not exist"]),
        (["prune", ck, "--plan", str(r / "plan.json"), "--out", str(r / "empty_dir")], ["--out", "already exists"]),
        (["prune", ck, "--plan", str(r / "plan.json"), "--out", ck, "--overwrite"], ["--out",
                                                                                     "is the input checkpoint"]),
        # target parsing happens before the score file is read: these fail on the spec alone
        (["prune", ck, "--scores", nope, "--target", "hidden="], ["hidden=''", "whole number"]),
        (["prune", ck, "--scores", nope, "--target", "hidden=abc"], ["hidden='abc'", "whole number"]),
        (["prune", ck, "--scores", nope, "--target", "ffn=1024,ffn=512"], ["'ffn'", "given twice"]),
        (["prune", ck, "--scores", nope, "--target", "hidden=0"], ["hidden=0", "positive"]),
        (["prune", ck, "--scores", nope, "--target", "width=3"], ["unknown target axis 'width'"]),
        (["prune", ck, "--scores", nope, "--target", "drop_layers=a:b"], ["drop_layers", "colons"]),
        # distill / train
        (["train", *tr, "--steps", "0"], ["steps (--steps)", ">= 1", "got 0"]),
        (["train", *tr, "--steps", "-1"], ["steps (--steps)", "got -1"]),
        (["train", *tr], ["exactly one of steps or tokens", "--steps / --tokens"]),
        (["train", *tr, "--steps", "1", "--lr", "-1"], ["lr (--lr)", ">= 0"]),
        (["train", *tr, "--steps", "1", "--global-batch-size", "3", "--micro-batch-size", "2"],
         ["--global-batch-size", "multiple", "--micro-batch-size"]),
        (["train", "--student", ck, "--out", out, "--steps", "1"], ["missing training option", "data"]),
        (["train", "--student", ck, "--data", nope, "--out", out, "--steps", "1"], ["--data", "no indexed dataset"]),
        (["train", "--student", ck, "--data", "0.5", data, "0.5", "--out", out, "--steps", "1"],
         ["--data", "WEIGHT PREFIX pairs"]),
        (["train", *tr, "--steps", "1", "--valid-data", nope], ["--valid-data", "no indexed dataset"]),
        (["train", "--student", hf, "--data", data, "--out", out, "--steps", "1"], ["--student", "Hugging Face model"]),
        (["train", *tr, "--steps", "1", "--config", nope], ["--config", "does not exist"]),
        (["train", *tr, "--steps", "1", "--config", str(r / "bad.yaml")], ["--config", "not valid YAML"]),
        (["train", *tr, "--steps", "1", "--out", str(r / "a_file")], ["--out", "is a file"]),
        (["distill", *tr, "--steps", "1"], ["distill", "--teacher"]),
        (["distill", *tr, "--steps", "1", "--teacher", nope], ["--teacher", "does not exist"]),
        (["distill", *tr, "--steps", "1", "--teacher", ck, "--kd-loss", "topk"], ["kd_top_k", "--kd-top-k"]),
        (["distill", *tr, "--steps", "1", "--teacher", ck, "--kd-tau", "0"], ["kd_tau (--kd-tau)", "> 0"]),
        (["distill", *tr, "--steps", "1", "--teacher", ck, "--tp", "3"], ["--student", "not divisible by TP=3"]),
        (["distill", *tr, "--steps", "1", "--teacher", ck, "--tp", "2", "--seq-len", "15"],
         ["--seq-len 15", "sequence parallel", "divisible by 2"]),
        # generate
        (["generate", ck, "--prompts", pr, "--out", gen, "--temperature", "-1"], ["--temperature", ">= 0"]),
        (["generate", ck, "--prompts", pr, "--out", gen, "--top-p", "0"], ["--top-p", "(0, 1]"]),
        (["generate", ck, "--prompts", pr, "--out", gen, "--top-p", "1.5"], ["--top-p", "(0, 1]"]),
        (["generate", ck, "--prompts", pr, "--out", gen, "--top-k", "-1"], ["--top-k", ">= 0"]),
        (["generate", ck, "--prompts", pr, "--out", gen, "--max-new-tokens", "0"], ["--max-new-tokens", ">= 1"]),
        (["generate", ck, "--prompts", pr, "--out", gen, "--batch-size", "0"], ["--batch-size", "positive"]),
        (["generate", ck, "--prompts", pr, "--out", gen, "--tp", "3"], ["CKPT", "not divisible by TP=3"]),
        (["generate", hf, "--prompts", pr, "--out", gen], ["CKPT", "Hugging Face model", "megatron-prune convert"]),
        (["generate", str(r / "empty_dir"), "--prompts", pr, "--out", gen], ["CKPT", "megatron_prune.json is missing"]),
        (["generate", ck, "--prompts", nope, "--out", gen], ["--prompts", "does not exist"]),
        (["generate", ck, "--prompts", str(r / "empty.jsonl"), "--out", gen], ["--prompts", "holds no prompts"]),
        (["generate", ck, "--prompts", str(r / "broken.jsonl"), "--out", gen], ["--prompts", "broken.jsonl:3:",
                                                                               "not valid JSON"]),
        (["generate", ck, "--prompts", str(r / "nokeys.jsonl"), "--out", gen], ["nokeys.jsonl:1:", "none of the keys"]),
        (["generate", ck, "--prompts", str(r / "big_token.jsonl"), "--out", gen],
         ["big_token.jsonl:2:", "token id 1000", "vocabulary of 1000"]),
        (["generate", ck, "--prompts", str(r / "text_prompts.txt"), "--out", gen],
         ["--prompts", "carries no tokenizer", '{"tokens": [...]}']),
        (["generate", ck, "--prompts", pr, "--out", str(r / "a_file")], ["--out", "already exists"]),
        (["generate", ck, "--prompts", pr, "--out", pr], ["--out", "is the prompts file"]),
        (["generate", ck, "--prompts", pr, "--out", str(r / "no_dir" / "g.jsonl")], ["--out", "does not exist"]),
        # specdec
        (["specdec", "--target", ck, "--draft", str(r / "vocab2k"), "--prompts", pr],
         ["--draft", "vocabulary of 2000", "1000", "same tokenizer"]),
        (["specdec", "--target", ck, "--draft", ck, "--prompts", pr, "--k", "0,2"], ["--k 0,2", ">= 1"]),
        (["specdec", "--target", ck, "--draft", ck, "--prompts", pr, "--k", "a"], ["--k 'a'", "comma-separated"]),
        (["specdec", "--target", ck, "--draft", ck, "--prompts", pr, "--limit", "0"], ["--limit", "positive"]),
        (["specdec", "--target", ck, "--draft", nope, "--prompts", pr], ["--draft", "does not exist"]),
        (["specdec", "--target", hf, "--draft", ck, "--prompts", pr], ["--target", "Hugging Face model"]),
        (["specdec", "--target", ck, "--draft", ck, "--prompts", pr, "--temperature", "-0.5"], ["--temperature"]),
        (["specdec", "--target", ck, "--draft", ck, "--prompts", pr, "--tp", "3"], ["--target", "TP=3"]),
        (["specdec", "--target", ck, "--draft", ck, "--prompts", str(r / "broken.jsonl")], ["broken.jsonl:3:"]),
        (["specdec", "--target", ck, "--draft", ck, "--prompts", pr, "--out", ck], ["--out",
                                                                                    "is the target checkpoint"]),
        # merge
        (["merge", ck, "--out", out], ["slerp", "exactly two"]),
        (["merge", ck, "--out", out, "--method", "linear"], ["at least two checkpoints", "--base"]),
        (["merge", ck, str(r / "vocab2k"), "--out", out], ["CKPT 2", "another shape", "vocab_size: 1000 != 2000"]),
        (["merge", ck, ck, "--out", out, "--t", "1.5"], ["--t 1.5", "[0, 1]"]),
        (["merge", ck, ck, "--out", out, "--t", "x"], ["--t 'x'", "comma-separated numbers"]),
        (["merge", ck, ck, ck, "--out", out], ["slerp", "exactly two", "--method linear"]),
        (["merge", ck, ck, ck, "--out", out, "--method", "linear", "--weights", "0.5,0.5"],
         ["--weights has 2 values for 3 checkpoints"]),
        (["merge", ck, ck, "--out", out, "--weights", "0.5,0.5"], ["slerp", "--weights", "--method linear"]),
        (["merge", ck, hf, "--out", out], ["CKPT 2", "Hugging Face model"]),
        (["merge", ck, ck, "--out", out, "--method", "linear", "--base", nope], ["--base", "does not exist"]),
        (["merge", ck, ck, "--out", out, "--tp", "3"], ["CKPT", "not divisible by TP=3"]),
        (["merge", ck, ck, "--out", str(r / "empty_dir")], ["--out", "already exists", "--overwrite"]),
        (["merge", ck, str(r / "mha"), "--out", ck, "--overwrite"], ["--out", "is the input checkpoint 1"]),
        (["merge", str(r / "mha"), ck, "--out", str(r / "ckpt" / "merged")], ["--out",
                                                                              "is inside the input checkpoint 2"]),
        (["merge", ck, ck, "--out", out, "--method", "linear", "--base", str(r / "ckpt" / ".."), "--overwrite"],
         ["--out", "is inside the base checkpoint"]),
        # sft
        (["sft", *sft, "--out", ck, "--steps", "1"], ["--out", "is the student checkpoint"]),
        (["sft", *sft, "--out", str(r / "sft.jsonl"), "--steps", "1"], ["--out", "is the SFT data"]),
        (["sft", "--student", chat, "--data", str(r / "sft.jsonl"), "--out", str(r), "--steps", "1"],
         ["--out", "contains the student checkpoint"]),
        (["sft", *sft, "--out", out, "--steps", "0"], ["steps (--steps)", ">= 1"]),
        (["sft", "--student", chat, "--data", data, "--out", out, "--steps", "1"], ["--data", "SFT JSONL", "`train`"]),
        (["sft", "--student", chat, "--data", str(r / "nope.jsonl"), "--out", out, "--steps", "1"],
         ["--data", "does not exist"]),
        (["sft", "--student", chat, "--data", str(r / "bad_sft.jsonl"), "--out", out, "--steps", "1"],
         ["--data", "bad_sft.jsonl:2:", "'instruction' and 'output'"]),
        (["sft", "--student", chat, "--data", str(r / "empty.jsonl"), "--out", out, "--steps", "1"],
         ["--data", "no SFT records"]),
        (["sft", *sft, "--out", out, "--steps", "1"], ["--student", "carries no tokenizer"]),
        (["sft", "--student", hf, "--data", str(r / "sft.jsonl"), "--out", out, "--steps", "1"],
         ["--student", "Hugging Face model"]),
        (["sft", "--student", chat, "--data", str(r / "sft.jsonl"), "--out", out, "--steps", "1", "--tp", "3"],
         ["--student", "TP=3"]),
        (["sft", "--student", chat, "--data", str(r / "sft.jsonl"), "--out", out, "--steps", "1", "--valid-data",
          nope], ["--valid-data", "no indexed dataset"]),
        (["sft", "--student", chat, "--data", str(r / "sft.jsonl"), "--out", str(r / "a_file"), "--steps", "1"],
         ["--out", "is a file"]),
        # selfdistill
        (["selfdistill", "--teacher", chat, "--data", str(r / "sft.jsonl"), "--out", str(r / "sft.jsonl"),
          "--overwrite"], ["--out", "is the SFT data"]),
        (["selfdistill", "--teacher", chat, "--data", str(r / "sft.jsonl"), "--out", str(r / "ckpt_chat" / "x.jsonl")],
         ["--out", "is inside the teacher checkpoint"]),
        (["selfdistill", "--teacher", chat, "--data", str(r / "sft.parts" / "a.jsonl"), "--out", str(r / "sft")],
         ["--out (its chunk directory)", "contains the SFT data"]),
        (["selfdistill", "--teacher", ck, "--data", str(r / "sft.jsonl"), "--out", sd], ["--teacher",
                                                                                         "carries no tokenizer"]),
        (["selfdistill", "--teacher", chat, "--data", str(r / "bad_sft.jsonl"), "--out", sd], ["bad_sft.jsonl:2:"]),
        (["selfdistill", "--teacher", chat, "--data", nope, "--out", sd], ["--data", "does not exist"]),
        (["selfdistill", "--teacher", chat, "--data", str(r / "sft.jsonl"), "--out", sd, "--batch-size", "0"],
         ["--batch-size", "positive"]),
        (["selfdistill", "--teacher", chat, "--data", str(r / "sft.jsonl"), "--out", sd, "--chunk-size", "0"],
         ["--chunk-size", "positive"]),
        (["selfdistill", "--teacher", chat, "--data", str(r / "sft.jsonl"), "--out", sd, "--top-p", "2"],
         ["--top-p", "(0, 1]"]),
        (["selfdistill", "--teacher", chat, "--data", str(r / "sft.jsonl"), "--out", sd, "--max-new-tokens", "0"],
         ["--max-new-tokens"]),
        (["selfdistill", "--teacher", chat, "--data", str(r / "sft.jsonl"), "--out", str(r / "a_file")],
         ["--out", "already exists", "--overwrite"]),
        (["selfdistill", "--teacher", hf, "--data", str(r / "sft.jsonl"), "--out", sd], ["--teacher", "Hugging Face"]),
        # search
        (["search", ck, *se, "--params", "1M"], ["--params 1,000,000", "shapes have", "within 5%"]),
        (["search", ck, *se, "--params", "lots"], ["'lots'", "--params", "90M"]),
        (["search", ck, *se, "--params=-5M"], ["--params must be positive"]),
        (["search", ck, *se, "--params", "100K"], ["--params 100,000", "210,496 to 251,456 parameters"]),
        (["search", ck, *se, "--memory-gib", "0"], ["--memory-gib", "positive"]),
        (["search", ck, *se, "--params", "230K", "--tolerance", "0"], ["--tolerance", "(0, 1)"]),
        (["search", ck, *se], ["at least one constraint", "--params"]),
        (["search", ck, *se, "--params", "230K", "--hidden", "64,abc"], ["--hidden", "comma-separated integers"]),
        (["search", ck, *se, "--params", "230K", "--top-k", "0"], ["--top-k", "positive"]),
        (["search", ck, *se, "--params", "230K", "--depth-metric", "cosine"], ["--depth-metric 'cosine'", "angular"]),
        (["search", ck, *se, "--params", "230K", "--stage", "all"], ["needs --data", "--stage zero-shot"]),
        (["search", ck, *se, "--params", "230K", "--stage", "distill", "--data", data, "--candidate", "5"],
         ["--candidate", "0..2"]),
        (["search", ck, *se, "--params", "230K", "--data", data, "--global-batch-size", "3", "--micro-batch-size", "2"],
         ["--global-batch-size 3", "multiple"]),
        (["search", ck, *se, "--params", "230K", "--data", nope], ["--data", "no indexed dataset"]),
        (["search", hf, *se, "--params", "230K"], ["CKPT", "Hugging Face model"]),
        (["search", ck, "--scores", nope, "--out", out, "--valid-data", data, "--params", "230K", "--stage",
          "zero-shot"],
         ["--scores", "does not exist", "megatron-prune importance"]),
        (["search", ck, "--scores", str(r / "not_scores.safetensors"), "--out", out, "--valid-data", data, "--params",
          "230K", "--stage", "zero-shot"], ["--scores", "not a megatron-prune score file"]),
        (["search", ck, *se, "--params", "230K", "--valid-data", nope], ["--valid-data", "no indexed dataset"]),
        (["search", ck, "--scores", nope, "--out", ck, "--valid-data", data, "--params", "230K"],
         ["--out", "is the source checkpoint"]),
        (["search", ck, *se, "--params", "230K", "--tp", "3"], ["CKPT", "TP=3"]),
        # plan
        (["plan", nope], ["not found", "layers=32"]),
        (["plan", str(r / "empty_dir")], ["neither a megatron-prune checkpoint nor a Hugging Face directory"]),
        (["plan", "layers=2,hidden=64"], ["lacks", "ffn"]),
        (["plan", "layers=2,hidden=x,ffn=96,heads=8,vocab=100"], ["'hidden'", "integer"]),
        (["plan", "layers=2,layers=3,hidden=64,ffn=96,heads=8,vocab=100"], ["'layers'", "twice"]),
        (["plan", ck, "--teacher", str(r / "vocab2k")], ["vocab", "same tokenizer"]),
        (["plan", ck, "--tp", "0"], ["--tp", ">= 1"]),
        (["plan", ck, "--tp", "3"], ["STUDENT", "TP=3"]),
        (["plan", ck, "--pp", "5"], ["STUDENT", "PP=5 is more than num_layers=4"]),
        (["plan", ck, "--micro-batch-size", "2", "--global-batch-size", "3"], ["--global-batch-size 3", "multiple"]),
        (["plan", ck, "--gpu-memory-gib", "0"], ["--gpu-memory-gib", "positive"]),
        (["plan", ck, "--gpus-per-node", "0"], ["--gpus-per-node", ">= 1"]),
        (["plan", ck, "--global-batch-size", "0"], ["--global-batch-size", ">= 1"]),
        (["plan", ck, "--vpp", "2"], ["--vpp 2 needs --pp >= 2"]),
        # demo
        (["demo", "--workdir", str(r / "a_file")], ["--workdir", "is a file"]),
        (["demo", "--workdir", out, "--set", "search.top_k"], ["--set", "STAGE.KEY=VALUE"]),
        (["demo", "--workdir", out, "--set", "nostage.steps=3"], ["--set", "no stage 'nostage'"]),
        (["demo", "--workdir", out, "--stages", "teacher,bogus"], ["unknown stage", "bogus"]),
        (["run", nope, "--workdir", out], ["recipe", "not found"]),
    ]


def run_in_process(argv) -> tuple[int, str]:
    """``cli.main(argv)`` with process groups, model and tokenizer loads forbidden; (exit code, stderr)."""
    import contextlib
    import io
    from unittest import mock

    import torch.distributed as dist
    import transformers

    import megatron_prune.checkpoint as ckpt_pkg

    def loaded(*a, **k):
        raise _Loaded("a bad input reached a process group or a model/tokenizer load")

    err = io.StringIO()
    with mock.patch.object(dist, "init_process_group", loaded), mock.patch.object(ckpt_pkg, "load_model", loaded), \
            mock.patch.object(transformers.AutoTokenizer, "from_pretrained", loaded), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse's own errors (wrong type, missing required argument)
            code = e.code
    return code, err.getvalue()


def _case_ids():
    return [f"{i:02d}-{' '.join(a[:1] + [x for x in a[1:] if x.startswith('--')])}"
            for i, (a, _) in enumerate(_cases(Path("r")))]


@pytest.mark.parametrize("index", range(len(_case_ids())), ids=_case_ids())
def test_bad_input_is_one_line_naming_it(index, inputs):
    """In-process (cheap): exit code 2, the fragments in the message, no traceback, and no process group or
    model load was reached."""
    argv, fragments = _cases(inputs)[index]
    code, err = run_in_process(argv)
    assert code == 2, (argv, err)
    assert "Traceback" not in err
    lines = err.strip().splitlines()  # one line; argparse's own errors come after the usage block
    assert lines[-1].startswith(f"megatron-prune {argv[0]}: error: "), err
    assert len(lines) == 1 or lines[0].startswith("usage:"), err
    for fragment in fragments:
        assert fragment in err, (argv, fragment, err)
    for written in ("new_out", "gen.jsonl", "sd.jsonl", "sd.parts", "sft.parts"):  # nothing was written
        assert not (inputs / written).exists(), written


def test_messages_from_real_processes(inputs):
    """The same through `python -m megatron_prune.cli` (one bad input per verb, run side by side)."""
    firsts = {}
    for argv, fragments in _cases(inputs):
        firsts.setdefault(argv[0], (argv, fragments))
    assert len(firsts) == 16
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    procs = {}
    for verb, (argv, fragments) in firsts.items():
        if len(procs) >= 4:  # at most 4 at once on a small machine
            next(p for p, _ in procs.values() if p.returncode is None).wait(timeout=900)
        procs[verb] = (subprocess.Popen([sys.executable, "-m", "megatron_prune.cli", *argv], stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, env=env), fragments)
    for verb, (p, fragments) in procs.items():
        _, err = p.communicate(timeout=900)  # a hang guard only
        assert p.returncode == 2, (verb, err)
        assert "Traceback" not in err and "Warning" not in err, (verb, err)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"megatron-prune {verb}: error: "), (verb, err)
        for fragment in fragments:
            assert fragment in err, (verb, fragment, err)


def test_mha_heads_target_suggests_query_groups(inputs):
    """Multi-head attention (one head per group): heads=4 cannot keep 8 groups; say query_groups=4 instead."""
    from megatron_prune.checkpoint import read_meta
    from megatron_prune.prune import PlanError, PruneTarget
    from megatron_prune.prune.plan import target_arch

    source = read_meta(inputs / "mha").arch
    with pytest.raises(PlanError, match="query_groups=4"):
        target_arch(source, PruneTarget.parse("heads=4"))
    assert target_arch(source, PruneTarget.parse("query_groups=4")).num_attention_heads == 4


def test_every_option_has_help_and_shows_its_default():
    from megatron_prune.training.config import TrainConfig

    train_defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subparsers.choices) >= {"convert", "data", "eval", "importance", "prune", "distill", "train", "demo"}
    for verb, sub in subparsers.choices.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            name = action.option_strings[-1] if action.option_strings else action.dest
            assert action.help and len(action.help) > 10, (verb, name)
            help_line = sub._get_formatter()._expand_help(action)
            field = action.dest
            if verb in ("distill", "train") and field in train_defaults and field not in ("student", "data", "out"):
                default = train_defaults[field]
                if default not in (None, False):  # None/False: off unless given, said in words
                    assert f"default {default}" in help_line, (verb, name, help_line)
            elif action.default not in (None, False, [], argparse.SUPPRESS):
                assert "default" in help_line and str(action.default) in help_line, (verb, name, help_line)


def markdown_table(root: Path) -> str:
    """One row per case of ``_cases``: verb | input | the error line printed (paths relative to the fixture)."""
    rows = ["| verb | input | message printed |", "|---|---|---|"]
    for argv, _ in _cases(root):
        try:
            code, err = run_in_process(argv)
        except Exception as e:  # noqa: BLE001 - the table shows a case that is not validated yet
            code, err = 1, f"NOT CHECKED: {type(e).__name__}: {e}"
        lines = [ln for ln in err.splitlines() if ln.strip()]
        line = next((ln for ln in lines if ln.startswith(f"megatron-prune {argv[0]}: ")), lines[-1] if lines else "")
        cell = lambda text: (text.replace(f"{root}/", "").replace(f"{Path.cwd()}/", "")  # noqa: E731
                             .replace(str(root), ".").replace("|", "\\|"))
        rows.append(f"| {argv[0]} | `{cell(' '.join(argv[1:]))}` | {cell(line)}" + ("" if code == 2 else
                                                                                 f" (exit {code})") + " |")
    return "\n".join(rows)


if __name__ == "__main__":  # python tests/test_cli_errors.py --table: the table of docs/errors.md
    import tempfile
    import warnings

    warnings.filterwarnings("ignore")  # megatron-core's import-time notes; the CLI silences them the same way
    if sys.argv[1:] != ["--table"]:
        sys.exit("usage: python tests/test_cli_errors.py --table")
    with tempfile.TemporaryDirectory() as tmp:
        print(markdown_table(make_inputs(Path(tmp))))
