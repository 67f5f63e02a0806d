"""NeMo 2 checkpoints (read and write) and Megatron-Bridge checkpoints (read), without importing NeMo.

Both are megatron distributed checkpoints (torch_dist) plus a config file of their own; docs/nemo.md has
the exact layouts and the key mapping. NeMo 2::

    ckpt/
      context/model.yaml          the model (``_target_`` ...LlamaModel) with ``config`` (TransformerConfig
                                  field names) and ``tokenizer`` (HF AutoTokenizer -> ``nemo_tokenizer``)
      context/io.json             NeMo's fiddle graph of the trainer context (read by NeMo, not by us)
      context/nemo_tokenizer/     the Hugging Face tokenizer files
      weights/                    torch_dist files; sharded keys are ours with a ``module.`` prefix

Megatron-Bridge: ``ckpt/iter_0000100/{run_config.yaml, tokenizer/, *.distcp, metadata.json, ...}`` next to
``latest_checkpointed_iteration.txt`` (or ``latest_train_state.pt``); sharded keys are ours, unprefixed.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_prune.arch import LLAMA3_ROPE_DEFAULTS, ArchError, ModelArch
from megatron_prune.checkpoint.megatron import CheckpointError
from megatron_prune.checkpoint.outputs import replace_dir
from megatron_prune.inputs import free_output
from megatron_prune.models import FAMILIES, family_of

CONTEXT_DIR = "context"
WEIGHTS_DIR = "weights"
MODEL_YAML = "model.yaml"
IO_JSON = "io.json"
NEMO_TOKENIZER_DIR = "nemo_tokenizer"
ARCH_FILE = "megatron_prune.json"  # ours, in context/: what NeMo's config does not carry (true vocab, HF type)
NEMO_PREFIX = "module."
BRIDGE_RUN_CONFIG = "run_config.yaml"
BRIDGE_TRACKER = "latest_checkpointed_iteration.txt"
HF_AUTO_TOKENIZER = "nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer"

# (model class, config class) written per NeMo kind, from every family (models/<family>/config.py)
_NEMO_CLASSES = {kind: classes for f in FAMILIES for kind, classes in f.nemo_classes.items()}
_EMBED_KEY = "embedding.word_embeddings.weight"
_OUTPUT_KEY = "output_layer.weight"


class NemoFormatError(CheckpointError):
    """A directory that is not a NeMo 2 / Megatron-Bridge checkpoint we can read, or a model we cannot map."""


# ---------------------------------------------------------------------------------------------------
# layout detection
# ---------------------------------------------------------------------------------------------------
def detect_layout(path: str | os.PathLike) -> Optional[str]:
    """"nemo2", "bridge", or None when ``path`` looks like neither."""
    p = Path(path)
    if (p / CONTEXT_DIR).is_dir() or (p / WEIGHTS_DIR).is_dir():
        return "nemo2"
    if (p / BRIDGE_RUN_CONFIG).is_file() or (p / BRIDGE_TRACKER).is_file() or (p / "latest_train_state.pt").is_file():
        return "bridge"
    if p.is_dir() and any(d.is_dir() and re.fullmatch(r"iter_\d{7}", d.name) for d in p.iterdir()):
        return "bridge"
    return None


def _bridge_iteration_dir(path: Path) -> Path:
    """The ``iter_N`` directory to read: ``path`` itself, the tracker's iteration, or the newest one."""
    if (path / BRIDGE_RUN_CONFIG).is_file():
        return path
    tracker = path / BRIDGE_TRACKER
    if tracker.is_file():
        text = tracker.read_text().strip()
        sub = path / ("release" if text == "release" else f"iter_{int(text):07d}") if text else None
        if sub is None or not sub.is_dir():
            raise NemoFormatError(f"{tracker} names iteration {text!r} but {sub} does not exist; "
                                  "pass the iter_XXXXXXX directory you want")
        return sub
    iters = sorted(d for d in path.iterdir() if d.is_dir() and re.fullmatch(r"iter_\d{7}", d.name))
    if not iters:
        raise NemoFormatError(f"{path} has no iter_XXXXXXX directory; pass a Megatron-Bridge checkpoint directory")
    return iters[-1]


def _check_dist_files(weights: Path, what: str) -> None:
    meta = weights / "metadata.json"
    if not meta.is_file() or not (weights / ".metadata").is_file():
        raise NemoFormatError(f"{what}: {weights} has no megatron distributed checkpoint (metadata.json and "
                              ".metadata are missing); the checkpoint is incomplete or of another layout")
    backend = json.loads(meta.read_text()).get("sharded_backend")
    if backend != "torch_dist":
        raise NemoFormatError(f"{what}: {weights} is a {backend!r} distributed checkpoint; only torch_dist is read. "
                              "Re-save it with ckpt_format='torch_dist' (or convert it with megatron's "
                              "dist_checkpointing convert tool)")


def _load_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise NemoFormatError(f"{path} is not valid YAML ({e}); restore it from the original checkpoint") from e
    if not isinstance(data, dict):
        raise NemoFormatError(f"{path} does not hold a mapping; restore it from the original checkpoint")
    return data


# ---------------------------------------------------------------------------------------------------
# config <-> ModelArch
# ---------------------------------------------------------------------------------------------------
def _target(value: Any) -> Optional[str]:
    return value.get("_target_") if isinstance(value, dict) else (value if isinstance(value, str) else None)


def arch_from_megatron_config(cfg: dict, vocab_size: int, source: str, target: str = "") -> ModelArch:
    """ModelArch from a TransformerConfig-style mapping (NeMo GPTConfig / Bridge GPTModelProvider).

    Anything that changes the computation and that our model cannot express is rejected, naming the field.
    """
    def bad(field: str, value: Any, need: str) -> NemoFormatError:
        return NemoFormatError(f"{source}: {field}={value!r} is not supported ({need}); megatron-prune handles "
                               "Llama-family dense decoders (RoPE, RMSNorm/LayerNorm, SwiGLU/GeLU)")

    if isinstance(cfg.get("transformer"), dict):  # Megatron-Bridge's builder style: GPTModelConfig + TransformerConfig
        cfg = {**cfg["transformer"], **{k: v for k, v in cfg.items() if k != "transformer"}}

    for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads"):
        if not isinstance(cfg.get(field), int):
            raise NemoFormatError(f"{source}: config field {field} is missing or not an integer; the config is "
                                  "incomplete (pass a NeMo 2 / Megatron-Bridge checkpoint of a GPT model)")
    checks = [  # (field, value if absent, predicate, what we need)
        ("num_moe_experts", None, lambda v: not v, "dense MLPs only"),
        ("multi_latent_attention", False, lambda v: not v, "standard attention only"),
        ("window_size", None, lambda v: v is None, "full attention only"),
        ("position_embedding_type", "rope", lambda v: v == "rope", "rope"),
        ("rotary_percent", 1.0, lambda v: float(v) == 1.0, "1.0"),
        ("layernorm_zero_centered_gamma", False, lambda v: not v, "False"),
        ("apply_residual_connection_post_layernorm", False, lambda v: not v, "False"),
        ("normalization", "LayerNorm", lambda v: v in ("RMSNorm", "LayerNorm"), "RMSNorm or LayerNorm"),
        ("mtp_num_layers", None, lambda v: not v, "no multi-token prediction"),
        ("seq_len_interpolation_factor", None, lambda v: v is None, "no position interpolation"),
        ("rotary_interleaved", False, lambda v: not v, "rotate-half RoPE, not interleaved"),
        ("heterogeneous_layers_config_path", None, lambda v: not v, "homogeneous layers"),
    ]
    for field, default, ok, need in checks:
        value = cfg.get(field, default)
        if not ok(value):
            raise bad(field, value, need)
    gated = bool(cfg.get("gated_linear_unit", False))
    # Bridge's builder configs drop callables when they serialize: a gated MLP without one is SwiGLU (every
    # supported family), a plain one GeLU (megatron's default)
    act = (_target(cfg.get("activation_func")) or ("silu" if gated else "gelu")).rsplit(".", 1)[-1]
    if gated and act != "silu":
        raise bad("activation_func", act, "silu when gated_linear_unit is true (SwiGLU)")
    if not gated and act != "gelu":
        raise bad("activation_func", act, "gelu when gated_linear_unit is false")
    if "rope_scaling" in cfg:  # Megatron-Bridge style: an explicit switch, whatever the class is called
        factor = float(cfg.get("rope_scaling_factor", 8.0)) if cfg["rope_scaling"] else None
    elif "Llama31" in target or "Llama32" in target:  # NeMo's Llama31Config family (always scaled)
        for ours, theirs in (("low_freq_factor", "low_freq_factor"), ("high_freq_factor", "high_freq_factor"),
                             ("original_max_position_embeddings", "old_context_len")):
            if theirs in cfg and float(cfg[theirs]) != float(LLAMA3_ROPE_DEFAULTS[ours]):
                raise bad(theirs, cfg[theirs], f"{LLAMA3_ROPE_DEFAULTS[ours]} (megatron-core's Llama-3.1 RoPE)")
        factor = float(cfg.get("scale_factor", 8.0))
    else:
        factor = None
    lower = target.lower()
    qk_norm = bool(cfg.get("qk_layernorm", False))
    if qk_norm and (normalization := cfg.get("normalization", "LayerNorm")) != "RMSNorm":
        raise bad("normalization", normalization, "RMSNorm with qk_layernorm (Qwen3)")
    linear_bias = bool(cfg.get("add_bias_linear", True))
    if qk_norm:
        model_type = "qwen3"  # the one family with per-head q/k norms
    elif "qwen2" in lower or (cfg.get("add_qkv_bias") and not linear_bias):  # Bridge's Qwen2 class paths vary
        model_type = "qwen2"
    else:
        model_type = "mistral" if "mistral" in lower else "llama"
    heads = cfg["num_attention_heads"]
    try:
        return ModelArch(
            num_layers=cfg["num_layers"],
            hidden_size=cfg["hidden_size"],
            ffn_hidden_size=cfg["ffn_hidden_size"],
            num_attention_heads=heads,
            num_query_groups=cfg.get("num_query_groups") or heads,
            kv_channels=cfg.get("kv_channels") or cfg["hidden_size"] // heads,
            vocab_size=vocab_size,
            max_position_embeddings=int(cfg.get("seq_length", 4096)),
            normalization=cfg.get("normalization", "LayerNorm"),
            norm_eps=float(cfg.get("layernorm_epsilon", 1e-5)),
            activation="swiglu" if gated else "gelu",
            rope_base=float(cfg.get("rotary_base", 10000)),
            rope_scaling_factor=factor,
            tie_embeddings=bool(cfg.get("share_embeddings_and_output_weights", True)),
            qkv_bias=linear_bias or bool(cfg.get("add_qkv_bias", False)),
            linear_bias=linear_bias,
            model_type=model_type,
            qk_norm=qk_norm,
        )
    except ArchError as e:
        raise NemoFormatError(f"{source}: {e}") from e


def nemo_config_fields(arch: ModelArch, dtype: torch.dtype) -> dict:
    """The NeMo GPTConfig fields (TransformerConfig names) of this shape; ``_call_: false`` dicts are callables.

    Only fields of NeMo's config classes: ``max_position_embeddings`` is not one (NeMo's RoPE length is
    ``seq_length``). MistralConfig7B turns sliding windows on by default: ``window_size: null`` turns it off.
    """
    fn = "silu" if arch.activation == "swiglu" else "gelu"
    config: dict[str, Any] = {
        "num_layers": arch.num_layers,
        "hidden_size": arch.hidden_size,
        "ffn_hidden_size": arch.ffn_hidden_size,
        "num_attention_heads": arch.num_attention_heads,
        "num_query_groups": arch.num_query_groups,
        "kv_channels": arch.kv_channels,
        "seq_length": arch.max_position_embeddings,
        "normalization": arch.normalization,
        "layernorm_epsilon": arch.norm_eps,
        "activation_func": {"_target_": f"torch.nn.functional.{fn}", "_call_": False},
        "gated_linear_unit": arch.gated,
        "add_bias_linear": arch.linear_bias,
        "add_qkv_bias": arch.qkv_bias,
        "qk_layernorm": arch.qk_norm,
        "position_embedding_type": "rope",
        "rotary_percent": 1.0,
        "rotary_base": arch.rope_base,
        "share_embeddings_and_output_weights": arch.tie_embeddings,
        # the embedding holds padded_vocab_size rows: NeMo then builds exactly that many
        "vocab_size": arch.padded_vocab_size,
        "make_vocab_size_divisible_by": 128,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
        "params_dtype": {"_target_": f"torch.{str(dtype).replace('torch.', '')}", "_call_": False},
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
    }
    kind = family_of(arch).nemo_kind(arch)
    if kind == "mistral":
        config["window_size"] = None
    if kind == "llama31":
        config.update(scale_factor=arch.rope_scaling_factor,
                      low_freq_factor=LLAMA3_ROPE_DEFAULTS["low_freq_factor"],
                      high_freq_factor=LLAMA3_ROPE_DEFAULTS["high_freq_factor"],
                      old_context_len=LLAMA3_ROPE_DEFAULTS["original_max_position_embeddings"])
    return config


def nemo_model_yaml(arch: ModelArch, dtype: torch.dtype, has_tokenizer: bool) -> dict:
    """The ``context/model.yaml`` mapping NeMo 2 writes for a GPT model of this shape."""
    model_cls, config_cls = _NEMO_CLASSES[family_of(arch).nemo_kind(arch)]
    tokenizer = None
    if has_tokenizer:
        tokenizer = {"_target_": HF_AUTO_TOKENIZER, "pretrained_model_name": NEMO_TOKENIZER_DIR}
    return {"_target_": model_cls, "config": {"_target_": config_cls, **nemo_config_fields(arch, dtype)},
            "tokenizer": tokenizer}


def nemo_io_json(arch: ModelArch, dtype: torch.dtype, has_tokenizer: bool) -> str:
    """``context/io.json``: the fiddle graph NeMo's ``io.load_context`` rebuilds the model (and a trainer) from.

    The same TrainerContext NeMo's own ``llm.import_ckpt`` writes: the model (its config class with our fields,
    the tokenizer artifact), a one-device trainer with MegatronStrategy, no extra state.
    """
    from megatron_prune.checkpoint.fiddle_json import Call, PyRef, dumps

    def split(target: str) -> tuple[str, str]:
        module, name = target.rsplit(".", 1)
        return module, name

    fields = {k: (PyRef(*split(v["_target_"])) if isinstance(v, dict) else v)
              for k, v in nemo_config_fields(arch, dtype).items()}
    model_cls, config_cls = _NEMO_CLASSES[family_of(arch).nemo_kind(arch)]
    model_args: dict[str, Any] = {"config": Call(*split(config_cls), fields)}
    if has_tokenizer:
        model_args["tokenizer"] = Call(*split(HF_AUTO_TOKENIZER), {"pretrained_model_name": NEMO_TOKENIZER_DIR})
    strategy = Call("nemo.lightning.pytorch.strategies.megatron_strategy", "MegatronStrategy",
                    {"ckpt_save_optimizer": False, "kwargs": {"always_save_context": True}})
    trainer = Call("nemo.lightning.pytorch.trainer", "Trainer", {"accelerator": "gpu", "strategy": strategy,
                                                                 "devices": 1})
    return dumps(Call("nemo.lightning.io.pl", "TrainerContext",
                      {"model": Call(*split(model_cls), model_args), "trainer": trainer, "extra": {}}))


# ---------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------
@dataclass
class ForeignCheckpoint:
    """A NeMo 2 or Megatron-Bridge checkpoint, resolved to what we need to load it."""

    kind: str  # "nemo2" or "bridge"
    weights_dir: Path
    arch: ModelArch
    tokenizer_dir: Optional[Path]
    prefix: str  # the sharded-key prefix in the weights ("module." for NeMo 2, "" for Bridge)
    vocab_rows: int  # embedding rows stored in the weights (>= arch.vocab_size)


def _weights_keys(weights: Path) -> dict[str, tuple]:
    """{sharded key: global shape} of a torch_dist checkpoint, read from its metadata only."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = FileSystemReader(str(weights)).read_metadata()
    return {k: tuple(v.size) for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def _prefix_and_rows(weights: Path, source: str) -> tuple[str, int]:
    # a training checkpoint also holds the optimizer's copies of every weight (megatron names them
    # ``optimizer.state.<exp_avg|exp_avg_sq|fp32_param>.<model key>``): only model keys tell the prefix
    keys = {k: v for k, v in _weights_keys(weights).items() if not k.startswith("optimizer.")}
    embeds = [k for k in keys if k.endswith(_EMBED_KEY)]
    if len(embeds) != 1:
        raise NemoFormatError(f"{source}: expected one '*{_EMBED_KEY}' tensor in {weights}, found {embeds or 'none'}; "
                              "this is not the checkpoint of a GPT model")
    prefix = embeds[0][: -len(_EMBED_KEY)]
    if not any(k.startswith(prefix + "decoder.layers.") for k in keys):
        raise NemoFormatError(f"{source}: {weights} has no '{prefix}decoder.layers.*' tensors; not a GPT checkpoint")
    return prefix, keys[embeds[0]][0]


def _tokenizer_vocab(tok_dir: Optional[Path]) -> Optional[int]:
    if tok_dir is None:
        return None
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(tok_dir)))


def read_foreign(path: str | os.PathLike) -> ForeignCheckpoint:
    """Resolve a NeMo 2 or Megatron-Bridge checkpoint; every problem is a NemoFormatError naming the fix."""
    from megatron_prune.checkpoint.hf import has_tokenizer

    p = Path(path)
    if not p.exists():
        raise NemoFormatError(f"{p} does not exist; check the path")
    kind = detect_layout(p)
    if kind is None:
        raise NemoFormatError(f"{p} is neither a NeMo 2 checkpoint (context/ + weights/) nor a Megatron-Bridge "
                              f"checkpoint (iter_XXXXXXX/ with {BRIDGE_RUN_CONFIG})")
    if kind == "nemo2":
        context, weights = p / CONTEXT_DIR, p / WEIGHTS_DIR
        if not weights.is_dir() and (p / "metadata.json").is_file():
            weights = p  # NeMo 2 before weights/ existed: the shards beside context/ (NeMo reads it the same way)
        adapter = weights / "adapter_metadata.json"
        if adapter.is_file():
            base = json.loads(adapter.read_text()).get("model_ckpt_path", "its base model")
            raise NemoFormatError(
                f"{p} is a NeMo PEFT (LoRA) adapter checkpoint (weights/adapter_metadata.json), not a whole model: "
                f"merge the adapter into {base} with NeMo (`llm.peft.merge_lora(lora_checkpoint_path=..., "
                "output_path=...)`) and convert the merged checkpoint")
        for d in (context, weights):
            if not d.is_dir():
                raise NemoFormatError(f"{p} looks like a NeMo 2 checkpoint but {d.name}/ is missing; a NeMo 2 "
                                      "checkpoint has both context/ and weights/ (a .nemo tar must be extracted first)")
        yaml_path = context / MODEL_YAML
        if not yaml_path.is_file():
            extra = f" (it has {IO_JSON} only: re-save it with a NeMo version that writes {MODEL_YAML})" \
                if (context / IO_JSON).is_file() else ""
            raise NemoFormatError(f"{p}: context/{MODEL_YAML} is missing{extra}; it holds the model config we read")
        model = _load_yaml(yaml_path)
        cfg = model.get("config")
        if not isinstance(cfg, dict):
            raise NemoFormatError(f"{yaml_path} has no 'config' mapping; expected NeMo 2's model.yaml "
                                  "(_target_: ...GPTModel/LlamaModel with config: and tokenizer:)")
        target = str(cfg.get("_target_", "")) + " " + str(model.get("_target_", ""))
        tok = model.get("tokenizer")
        tok_dir = None
        if isinstance(tok, dict) and tok.get("_target_") == HF_AUTO_TOKENIZER:
            cand = context / str(tok.get("pretrained_model_name", NEMO_TOKENIZER_DIR))
            tok_dir = cand if has_tokenizer(cand) else None
        elif has_tokenizer(context / NEMO_TOKENIZER_DIR):
            tok_dir = context / NEMO_TOKENIZER_DIR
        ours = json.loads((context / ARCH_FILE).read_text()) if (context / ARCH_FILE).is_file() else {}
    else:
        it = _bridge_iteration_dir(p)
        weights = it
        run = _load_yaml(it / BRIDGE_RUN_CONFIG) if (it / BRIDGE_RUN_CONFIG).is_file() else None
        if run is None or not isinstance(run.get("model"), dict):
            raise NemoFormatError(f"{it}: {BRIDGE_RUN_CONFIG} with a 'model' section is missing; a Megatron-Bridge "
                                  "checkpoint carries its ConfigContainer there")
        cfg, target = run["model"], str(run["model"].get("_target_", ""))
        tok_dir = it / "tokenizer" if has_tokenizer(it / "tokenizer") else None
        ours = {}
    source = f"{kind} checkpoint {p}"
    _check_dist_files(weights, source)
    prefix, rows = _prefix_and_rows(weights, source)
    vocab = ours.get("vocab_size") or _tokenizer_vocab(tok_dir) or cfg.get("vocab_size") or rows
    if vocab > rows:
        raise NemoFormatError(f"{source}: vocab size {vocab} is larger than the {rows} embedding rows in the weights; "
                              "the tokenizer or config does not belong to these weights")
    arch = arch_from_megatron_config(cfg, int(vocab), source, target)
    if ours.get("model_type"):
        arch = arch.replace(model_type=ours["model_type"])
    return ForeignCheckpoint(kind, weights, arch, tok_dir, prefix, rows)


def load_foreign_into(model: torch.nn.Module, ckpt: ForeignCheckpoint) -> None:
    """Load a NeMo 2 / Bridge checkpoint into this rank's shard of ``model`` (built for ``ckpt.arch``), any TP/PP.

    When the stored vocab padding differs from ours, the embedding and output rows are read whole and sliced.
    """
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
    from torch.distributed.checkpoint import FileSystemReader

    state = model.sharded_state_dict(prefix=ckpt.prefix)
    # module extra state (e.g. TE's fp8 meta) is optional: keep the model's own when the checkpoint has none
    stored = set(FileSystemReader(str(ckpt.weights_dir)).read_metadata().state_dict_metadata)
    own = model.state_dict()
    absent = [n for n, sh in state.items() if isinstance(sh, ShardedObject) and sh.unique_key not in stored]
    for name in absent:
        state.pop(name)
    padded = ckpt.arch.padded_vocab_size
    resliced = {}
    if ckpt.vocab_rows != padded:
        for name, sh in list(state.items()):
            if isinstance(sh, ShardedTensor) and sh.key.endswith((_EMBED_KEY, _OUTPUT_KEY)):
                full = torch.empty(ckpt.vocab_rows, *sh.local_shape[1:], dtype=sh.data.dtype, device=sh.data.device)
                state[name] = ShardedTensor.from_rank_offsets(sh.key, full, replica_id=dist.get_rank() if
                                                              dist.is_initialized() else 0)
                resliced[name] = sh.local_shape[0]
    try:
        # whole-tensor reads on several ranks are not a partition of the tensor: skip that (save-time) check
        loaded = dist_checkpointing.load(state, str(ckpt.weights_dir), validate_access_integrity=not resliced)
    except Exception as e:  # megatron raises many types for damaged or mismatched files
        from megatron_prune.checkpoint.writer import written_by_newer_megatron

        newer = written_by_newer_megatron(e, ckpt.weights_dir)
        if newer:
            raise NemoFormatError(newer) from None
        raise NemoFormatError(f"could not read the weights in {ckpt.weights_dir} as {ckpt.arch.describe()}: "
                              f"{type(e).__name__}: {e}") from e
    tp_rank = ps.get_tensor_model_parallel_rank()
    for name, rows in resliced.items():
        full = torch.zeros(padded, loaded[name].shape[1], dtype=loaded[name].dtype)
        n = min(ckpt.vocab_rows, padded)
        full[:n] = loaded[name][:n]
        loaded[name] = full[tp_rank * rows:(tp_rank + 1) * rows]
    plain = {k[len(ckpt.prefix):]: v for k, v in loaded.items() if k in state}
    plain.update({n[len(ckpt.prefix):]: own[n[len(ckpt.prefix):]] for n in absent})
    model.load_state_dict(plain, strict=True)


def load_foreign_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, use_te: Optional[bool] = None):
    """Build the model a NeMo 2 / Bridge checkpoint describes at the current TP/PP and load it: (model, ckpt)."""
    from megatron.core import parallel_state as ps

    from megatron_prune.model import build_model

    ckpt = read_foreign(path)
    ckpt.arch.check_parallel(ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
    model = build_model(ckpt.arch, dtype=dtype, use_te=use_te, perform_initialization=False)
    load_foreign_into(model, ckpt)
    return model, ckpt


# ---------------------------------------------------------------------------------------------------
# writing NeMo 2
# ---------------------------------------------------------------------------------------------------
def save_nemo_checkpoint(model: torch.nn.Module, arch: ModelArch, out_dir: str | os.PathLike, *,
                         tokenizer_src: Optional[str | os.PathLike] = None, overwrite: bool = False,
                         provenance: Optional[dict] = None) -> Path:
    """Write this rank's shard of ``model`` as a NeMo 2 checkpoint; collective, atomic (temp dir + rename).

    The weights go through our in-process writer (checkpoint/writer.py), not megatron's, whose helper processes
    outlive a killed job."""
    from megatron_prune.checkpoint.writer import write_sharded

    out = free_output(Path(out_dir).absolute(), overwrite=overwrite, error=CheckpointError)
    tmp = out.parent / f".{out.name}.tmp"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / WEIGHTS_DIR).mkdir(parents=True)
        (tmp / CONTEXT_DIR).mkdir()
    if dist.is_initialized():
        dist.barrier()
    try:
        write_sharded(model.sharded_state_dict(prefix=NEMO_PREFIX), tmp / WEIGHTS_DIR)  # every rank raises together
        if dist.is_initialized():
            dist.barrier()
        if rank == 0:
            _finish_nemo(model, arch, tmp, out, tokenizer_src, provenance)
    except BaseException:  # a failure or a stop signal (StopRequested): no half-written checkpoint stays
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dist.is_initialized():
        dist.barrier()
    return out


def _finish_nemo(model, arch: ModelArch, tmp: Path, out: Path, tokenizer_src, provenance) -> None:
    """Rank 0, after the weights: the context (tokenizer, model.yaml, our arch file), then the rename into place."""
    import yaml

    from megatron_prune.checkpoint.hf import copy_tokenizer_files, has_tokenizer

    context = tmp / CONTEXT_DIR
    has_tok = False
    if tokenizer_src is not None and has_tokenizer(tokenizer_src):
        copy_tokenizer_files(tokenizer_src, context / NEMO_TOKENIZER_DIR)
        _tokenizer_class_for_transformers4(context / NEMO_TOKENIZER_DIR)
        has_tok = True
    dtype = next(model.parameters()).dtype
    (context / MODEL_YAML).write_text(yaml.safe_dump(nemo_model_yaml(arch, dtype, has_tok), sort_keys=False))
    (context / IO_JSON).write_text(nemo_io_json(arch, dtype, has_tok))
    _write_common_pt(model, tmp / WEIGHTS_DIR)
    prov = dict(provenance or {})
    prov.setdefault("created", datetime.datetime.now().isoformat(timespec="seconds"))
    (context / ARCH_FILE).write_text(json.dumps({"vocab_size": arch.vocab_size, "model_type": arch.model_type,
                                                 "arch": arch.to_dict(), "provenance": prov}, indent=2) + "\n")
    replace_dir(tmp, out)


def _tokenizer_class_for_transformers4(tok_dir: Path) -> None:
    """transformers 5 saves a fast tokenizer as ``TokenizersBackend``, a class NeMo's transformers (4.x) lacks;
    4.x names the same tokenizer ``PreTrainedTokenizerFast``."""
    path = tok_dir / "tokenizer_config.json"
    if path.is_file():
        config = json.loads(path.read_text())
        if config.get("tokenizer_class") == "TokenizersBackend":
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
            path.write_text(json.dumps(config, indent=2) + "\n")


def _write_common_pt(model, weights: Path) -> None:
    """``weights/common.pt`` and its ``common_backend`` entry when megatron-core (>= 0.19) kept the common state
    inside the shards: NeMo's megatron-core (<= 0.16) needs the file. It holds what megatron-core 0.16 puts
    there: the non-sharded part of the state dict."""
    if (weights / "common.pt").is_file():
        return
    from megatron.core.dist_checkpointing.utils import extract_sharded_base

    _, common = extract_sharded_base(model.sharded_state_dict(prefix=NEMO_PREFIX))
    torch.save(common, weights / "common.pt")
    meta = json.loads((weights / "metadata.json").read_text())
    meta.update(common_backend="torch", common_backend_version=1)
    (weights / "metadata.json").write_text(json.dumps(meta))


# ---------------------------------------------------------------------------------------------------
# `convert` entry: every conversion that has a NeMo 2 / Bridge side
# ---------------------------------------------------------------------------------------------------
def convert_nemo(src: str | Path, kind: str, out: str | Path, to: str, tp: int = 1, pp: int = 1,
                 dtype: Optional[torch.dtype] = None, overwrite: bool = False) -> Path:
    """``kind`` is the source ("nemo2", "bridge", "megatron", "hf"); ``to`` is "nemo", "megatron" or "hf".

    ``dtype=None`` writes NeMo 2 checkpoints in bfloat16 (what NeMo writes and trains in) and everything else
    in float32 (imports) or the checkpoint's own dtype."""
    from megatron_prune.checkpoint.megatron import load_model, save_checkpoint, tokenizer_dir
    from megatron_prune.runtime import init_distributed, log0

    out = free_output(out, overwrite=overwrite, error=CheckpointError)
    if kind == "nemo2" and to == "nemo":
        raise ValueError(f"{src} is already a NeMo 2 checkpoint")
    prov = {"source": str(Path(src).absolute()), "source_format": kind}
    if to == "nemo" and dtype is None:
        dtype = torch.bfloat16
    if kind in ("nemo2", "bridge"):
        ckpt = read_foreign(src)  # before any process group: bad input fails fast
        if to == "megatron":  # the stage-size flags (runtime/stages.py) size the imported model
            from megatron_prune.runtime.stages import bind_split

            bind_split(ckpt.arch.num_layers, pp)
        world = dist.get_world_size() if dist.is_initialized() else _launch_world_size()
        layout = (tp, pp) if to == "megatron" else (1, world)
        init_distributed(*layout)
        log0(f"reading {kind} checkpoint {src}: {ckpt.arch.describe()} at TP={layout[0]} PP={layout[1]}")
        model, ckpt = load_foreign_model(src, dtype=dtype or torch.float32)
        if to == "megatron":
            return save_checkpoint(model, ckpt.arch, out, tokenizer_src=ckpt.tokenizer_dir, provenance=prov,
                                   overwrite=overwrite)
        if to == "nemo":
            return save_nemo_checkpoint(model, ckpt.arch, out, tokenizer_src=ckpt.tokenizer_dir, overwrite=overwrite,
                                        provenance=prov)
        from megatron_prune.checkpoint.hf import export_model_to_hf

        return export_model_to_hf(model, ckpt.arch, out, tokenizer_src=ckpt.tokenizer_dir, dtype=dtype)
    if to != "nemo":
        raise ValueError(f"convert_nemo handles NeMo sources or --to nemo, got {kind} -> {to}")
    if kind == "megatron":
        world = dist.get_world_size() if dist.is_initialized() else _launch_world_size()
        init_distributed(1, world)
        model, meta = load_model(src, dtype=dtype)
        log0(f"exporting {src} ({meta.arch.describe()}) to NeMo 2 {out}")
        return save_nemo_checkpoint(model, meta.arch, out, tokenizer_src=tokenizer_dir(src), overwrite=overwrite,
                                    provenance=prov)
    if kind == "hf":
        from megatron_prune.checkpoint.hf import load_hf_into_model, read_hf_config
        from megatron_prune.model import build_model

        init_distributed(tp, pp)
        arch = ModelArch.from_hf_config(read_hf_config(src))
        model = build_model(arch, dtype=dtype or torch.float32)
        load_hf_into_model(model, arch, src)
        return save_nemo_checkpoint(model, arch, out, tokenizer_src=src, overwrite=overwrite, provenance=prov)
    raise ValueError(f"cannot convert a {kind} source to NeMo 2 directly; convert it to megatron first")


def _launch_world_size() -> int:
    from megatron_prune.runtime.distributed import detect_launch_env

    return detect_launch_env().world_size
