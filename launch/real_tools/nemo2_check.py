"""NeMo 2's own code against our NeMo 2 checkpoints, both ways (run by .ci/run, leg 3).

    bash launch/real_tools/install_nemo.sh                      # .venv-nemo: nemo-toolkit 2.7.3, megatron-core 0.15
    .venv/bin/python launch/real_tools/nemo2_check.py [--work DIR] [--nemo-python .venv-nemo/bin/python]

Ours -> NeMo: random-weight Hugging Face models of every family (Llama, Llama-3.1 RoPE scaling, Mistral, Qwen2,
Qwen3 with head_dim != hidden/heads) converted by `megatron-prune convert --to nemo`; NeMo rebuilds each from
our context/io.json (``io.load_context``), loads our weights with its strict dist-checkpoint loader
(``ModelConnector.nemo_load``) and runs its forward: the logits must equal transformers' on the source model.
Also the bfloat16 default, and a checkpoint written with megatron-core 0.19 (.venv312, when present).
NeMo -> ours: NeMo's ``llm.import_ckpt`` writes Llama and Qwen3 checkpoints (context, TE-less weights, its
megatron-core); `megatron-prune convert` reads them and exports to Hugging Face; transformers on that export
must give NeMo's own forward. NeMo runs on the CPU through launch/real_tools/nemo_cpu.py (see its docstring).
Exit status 0 only when every check passes; one line per check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
TOKENS = [[1, 5, 7, 9, 11, 13, 17, 19], [2, 4, 6, 8, 10, 12, 14, 16]]
TOL = 1e-4

NEMO_FORWARD = r"""
import json, sys
sys.path.insert(0, sys.argv[4])
import nemo_cpu  # noqa: F401
import torch
from megatron.core import tensor_parallel
from nemo.lightning import io
from nemo.lightning.io.connector import ModelConnector
path = sys.argv[1]
model = io.load_context(path + "/context", subpath="model")  # the model as io.json describes it
described = {"model": type(model).__name__, "config": type(model.config).__name__,
             "params_dtype": str(model.config.params_dtype), "num_layers": model.config.num_layers,
             "kv_channels": model.config.kv_channels, "qk_layernorm": bool(model.config.qk_layernorm)}
model, _ = ModelConnector().nemo_load(path, cpu=True)  # strict load of the weights
model.eval()
tensor_parallel.model_parallel_cuda_manual_seed(1)
tokens = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(tokens, torch.arange(tokens.shape[1])[None].expand_as(tokens), None)
torch.save({"logits": logits.float(), "described": described}, sys.argv[3])
"""

NEMO_IMPORT = r"""
import sys
sys.path.insert(0, sys.argv[4])
import nemo_cpu  # noqa: F401
from nemo.collections import llm
import json
kind, src, out = sys.argv[1], sys.argv[2], sys.argv[3]
hf = json.load(open(src + "/config.json"))  # the importer re-reads it; the placeholder config needs a valid shape
shape = dict(num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"], ffn_hidden_size=hf["intermediate_size"],
             num_attention_heads=hf["num_attention_heads"], num_query_groups=hf["num_key_value_heads"])
model = {"llama": lambda: llm.LlamaModel(llm.LlamaConfig(**shape)),
         "qwen3": lambda: llm.Qwen3Model(llm.Qwen3Config(**shape))}[kind]()
llm.import_ckpt(model=model, source="hf://" + src, output_path=out, overwrite=True)
"""


def _run(cmd: list[str], what: str, env: dict | None = None) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2",
                                                                  "HF_HUB_OFFLINE": "1", **(env or {})})
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"{what} failed (exit {r.returncode}):\n{tail}")


def _hf_logits(hf_dir: Path) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits


def _nemo_forward(nemo_py: str, ckpt: Path, out: Path) -> dict:
    _run([nemo_py, "-c", NEMO_FORWARD, str(ckpt), json.dumps(TOKENS), str(out), str(Path(__file__).parent)],
         f"NeMo loading {ckpt}")
    return torch.load(out)


def _source_model(root: Path, name: str, model_type: str, **overrides) -> Path:
    """A random-weight transformers model with a tokenizer NeMo's transformers (4.x) reads."""
    from conftest import make_hf_model
    from test_nemo import tiny_tokenizer

    d = make_hf_model(root / name, model_type, **overrides)
    tiny_tokenizer(d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # transformers 5's 'TokenizersBackend' is unknown to 4.x
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    return d


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nemo-python", default=str(REPO / ".venv-nemo/bin/python"))
    ap.add_argument("--work", default=None, help="scratch directory (default: a temporary one)")
    args = ap.parse_args()
    root = Path(args.work or tempfile.mkdtemp(prefix="nemo2_check_"))
    root.mkdir(parents=True, exist_ok=True)
    ours = [sys.executable, "-m", "megatron_prune.cli"]
    failures = 0

    def check(name: str, ok: bool, detail: str) -> None:
        nonlocal failures
        failures += not ok
        print(f"[{'ok' if ok else 'FAIL'}] {name}: {detail}", flush=True)

    # ---- ours -> NeMo ------------------------------------------------------------------------------
    cases = {
        "llama": ("llama", {}),
        "llama31": ("llama", {"max_position_embeddings": 16384,
                              "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                  "original_max_position_embeddings": 8192}}),
        "mistral": ("mistral", {"head_dim": 12, "sliding_window": None}),
        "qwen2": ("qwen2", {"tie_word_embeddings": True}),
        "qwen3": ("qwen3", {"head_dim": 12}),
    }
    want_class = {"llama": "LlamaConfig", "llama31": "Llama31Config", "mistral": "MistralConfig7B",
                  "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}
    for name, (model_type, overrides) in cases.items():
        try:
            src = _source_model(root, f"hf_{name}", model_type, **overrides)
            _run(ours + ["convert", str(src), str(root / f"ours_{name}"), "--to", "nemo", "--dtype", "float32"],
                 f"megatron-prune convert {name} --to nemo")
            got = _nemo_forward(args.nemo_python, root / f"ours_{name}", root / f"nemo_{name}.pt")
            diff = (got["logits"][..., :1000] - _hf_logits(src)).abs().max().item()
            d = got["described"]
            check(f"ours -> NeMo, {name}", diff <= TOL and d["config"] == want_class[name] and
                  d["qk_layernorm"] == (name == "qwen3"),
                  f"io.json builds {d['model']}({d['config']}, kv_channels={d['kv_channels']}); NeMo's strict load + "
                  f"forward vs transformers: max |diff| {diff:.2e} (tol {TOL})")
        except Exception as e:  # one failing family must not hide the others
            check(f"ours -> NeMo, {name}", False, str(e))
    try:  # the default dtype: bfloat16, as NeMo writes and trains
        _run(ours + ["convert", str(root / "hf_llama"), str(root / "ours_bf16"), "--to", "nemo"], "convert bf16")
        got = _nemo_forward(args.nemo_python, root / "ours_bf16", root / "nemo_bf16.pt")
        diff = (got["logits"][..., :1000] - _hf_logits(root / "hf_llama")).abs().max().item()
        check("ours -> NeMo, bfloat16 default", got["described"]["params_dtype"] == "torch.bfloat16" and diff < 0.1,
              f"params_dtype {got['described']['params_dtype']}; max |diff| to float32 transformers {diff:.2e}")
    except Exception as e:
        check("ours -> NeMo, bfloat16 default", False, str(e))
    py312 = REPO / ".venv312/bin/python"
    if py312.is_file():  # megatron-core 0.19 keeps the common state in the shards: common.pt must still be written
        try:
            _run([str(py312), "-m", "megatron_prune.cli", "convert", str(root / "hf_qwen3"), str(root / "ours_019"),
                  "--to", "nemo", "--dtype", "float32"], "convert with megatron-core 0.19")
            got = _nemo_forward(args.nemo_python, root / "ours_019", root / "nemo_019.pt")
            diff = (got["logits"][..., :1000] - _hf_logits(root / "hf_qwen3")).abs().max().item()
            check("ours (megatron-core 0.19) -> NeMo (megatron-core 0.15)", diff <= TOL, f"max |diff| {diff:.2e}")
        except Exception as e:
            check("ours (megatron-core 0.19) -> NeMo (megatron-core 0.15)", False, str(e))

    # ---- NeMo -> ours ------------------------------------------------------------------------------
    # NeMo's Qwen3 importer takes head_dim from Qwen3Config's default (128, as in every released Qwen3), not
    # from the Hugging Face config: its source has head_dim 128
    _source_model(root, "hf_qwen3_128", "qwen3", head_dim=128)
    for name, source in (("llama", "hf_llama"), ("qwen3", "hf_qwen3_128")):
        try:
            src, theirs = root / source, root / f"theirs_{name}"
            _run([args.nemo_python, "-c", NEMO_IMPORT, name, str(src), str(theirs), str(Path(__file__).parent)],
                 f"NeMo llm.import_ckpt {name}")
            reference = _nemo_forward(args.nemo_python, theirs, root / f"theirs_{name}.pt")["logits"]
            _run(ours + ["convert", str(theirs), str(root / f"theirs_{name}_hf"), "--to", "hf"], f"convert {theirs}")
            diff = (_hf_logits(root / f"theirs_{name}_hf") - reference[..., :1000]).abs().max().item()
            check(f"NeMo -> ours, {name}", diff <= TOL,
                  f"NeMo's import_ckpt read by megatron-prune and exported: transformers vs NeMo's own forward, "
                  f"max |diff| {diff:.2e}")
        except Exception as e:
            check(f"NeMo -> ours, {name}", False, str(e))
    print(f"[nemo2_check] {'all checks passed' if not failures else f'{failures} check(s) FAILED'} ({root})")
    if not failures and args.work is None:
        import shutil

        shutil.rmtree(root, ignore_errors=True)  # a temporary scratch directory: kept only to look at a failure
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
