"""ModelArch: the shape of a Llama-family decoder, its exact parameter count, and its mappings.

Everything that is a *shape* lives here (and nothing that is a weight): megatron's TransformerConfig and
Hugging Face configs are derived from a ModelArch, and pruning produces a new ModelArch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

# Hugging Face model types we convert. All are Llama-shaped decoders with RoPE, RMSNorm and SwiGLU.
SUPPORTED_HF_MODEL_TYPES = ("llama", "mistral", "qwen2")

# megatron-core's built-in Llama-3.1 RoPE scaling uses these constants; other values are rejected.
_LLAMA3_ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

VOCAB_PAD_MULTIPLE = 128


class ArchError(ValueError):
    """A shape that cannot be built, converted, or sharded as asked."""


@dataclass(frozen=True)
class ModelArch:
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    kv_channels: Optional[int] = None  # default hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    normalization: str = "RMSNorm"  # or "LayerNorm"
    norm_eps: float = 1e-5
    activation: str = "swiglu"  # "swiglu" (gated SiLU) or "gelu" (not gated)
    rope_base: float = 10000.0
    rope_scaling_factor: Optional[float] = None  # Llama-3.1 style scaling when set
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 has biases on q, k, v only
    linear_bias: bool = False  # biases on the attention output projection and the MLP
    model_type: str = "llama"  # the HF model_type this shape came from / exports to

    def __post_init__(self):
        if self.kv_channels is None:
            object.__setattr__(self, "kv_channels", self.hidden_size // self.num_attention_heads)
        self.validate()

    # ---- checks -------------------------------------------------------------------------------
    def validate(self) -> None:
        positive = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                    "vocab_size", "kv_channels")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ArchError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ArchError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_query_groups "
                f"({self.num_query_groups}): every query group holds the same number of heads"
            )
        if self.normalization not in ("RMSNorm", "LayerNorm"):
            raise ArchError(f"normalization must be RMSNorm or LayerNorm, got {self.normalization!r}")
        if self.activation not in ("swiglu", "gelu"):
            raise ArchError(f"activation must be swiglu or gelu, got {self.activation!r}")

    def check_parallel(self, tp: int, pp: int) -> None:
        """Raise a clear error when this shape cannot be split over ``tp`` x ``pp``."""
        problems = []
        if self.num_query_groups % tp:
            problems.append(f"num_query_groups={self.num_query_groups} is not divisible by TP={tp}")
        if self.num_attention_heads % tp:
            problems.append(f"num_attention_heads={self.num_attention_heads} is not divisible by TP={tp}")
        if self.ffn_hidden_size % tp:
            problems.append(f"ffn_hidden_size={self.ffn_hidden_size} is not divisible by TP={tp}")
        if self.padded_vocab_size % tp:
            problems.append(f"padded vocab {self.padded_vocab_size} is not divisible by TP={tp}")
        if pp > self.num_layers:  # stages may differ in depth (runtime/stages.py), but none can be empty
            problems.append(f"PP={pp} is more than num_layers={self.num_layers} (every stage needs a layer)")
        if problems:
            raise ArchError(
                f"cannot shard this model at TP={tp} PP={pp}: " + "; ".join(problems)
                + ". Choose a TP that divides the heads, query groups and FFN size, and a PP of at most the layers."
            )

    # ---- derived sizes --------------------------------------------------------------------------
    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    @property
    def gated(self) -> bool:
        return self.activation == "swiglu"

    @property
    def padded_vocab_size(self) -> int:
        """Vocab rows in the Megatron embedding: rounded up to a multiple of 128, independent of the
        layout so that a checkpoint reshards freely. Logits past ``vocab_size`` are padding."""
        if self.vocab_size % VOCAB_PAD_MULTIPLE == 0:
            return self.vocab_size
        return int(math.ceil(self.vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE)

    # ---- parameter counts ---------------------------------------------------------------------
    def layer_param_count(self) -> int:
        h, f, kv = self.hidden_size, self.ffn_hidden_size, self.kv_channels
        norm = h * (2 if self.normalization == "LayerNorm" else 1)
        qkv_out = (self.num_attention_heads + 2 * self.num_query_groups) * kv
        attn = h * qkv_out + (qkv_out if self.qkv_bias else 0)
        attn += self.num_attention_heads * kv * h + (h if self.linear_bias else 0)
        fc1_out = f * (2 if self.gated else 1)
        mlp = h * fc1_out + f * h + ((fc1_out + h) if self.linear_bias else 0)
        return 2 * norm + attn + mlp

    def param_count(self) -> int:
        """Exact number of parameters (true vocab, no padding), equal to the HF model's count."""
        h = self.hidden_size
        norm = h * (2 if self.normalization == "LayerNorm" else 1)
        embed = self.vocab_size * h
        output = 0 if self.tie_embeddings else self.vocab_size * h
        return embed + self.num_layers * self.layer_param_count() + norm + output

    def replace(self, **changes) -> "ModelArch":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArch":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ArchError(f"unknown ModelArch fields {sorted(unknown)}; this file was written by a newer version?")
        return cls(**d)

    def differences(self, other: "ModelArch") -> str:
        """``field: mine != theirs`` for every field that differs (for error messages)."""
        a, b = self.to_dict(), other.to_dict()
        return ", ".join(f"{k}: {a[k]} != {b[k]}" for k in a if a[k] != b[k])

    def describe(self) -> str:
        return (
            f"{self.num_layers} layers, hidden {self.hidden_size}, FFN {self.ffn_hidden_size}, "
            f"{self.num_attention_heads} heads in {self.num_query_groups} query groups (kv {self.kv_channels}), "
            f"vocab {self.vocab_size}, {self.param_count() / 1e6:.1f}M params"
        )

    # ---- megatron ---------------------------------------------------------------------------
    def to_transformer_config(self, tp: int = 1, pp: int = 1, dtype: torch.dtype = torch.float32, **overrides):
        """The megatron TransformerConfig for this shape at ``tp`` x ``pp``."""
        import torch.nn.functional as F
        from megatron.core.transformer.transformer_config import TransformerConfig

        self.check_parallel(tp, pp)
        on_gpu = torch.cuda.is_available()
        kwargs: dict[str, Any] = dict(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            ffn_hidden_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            kv_channels=self.kv_channels,
            normalization=self.normalization,
            layernorm_epsilon=self.norm_eps,
            gated_linear_unit=self.gated,
            activation_func=F.silu if self.gated else F.gelu,
            add_bias_linear=self.linear_bias,
            add_qkv_bias=self.qkv_bias,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            params_dtype=dtype,
            pipeline_dtype=dtype,
            bf16=dtype == torch.bfloat16,
            fp16=dtype == torch.float16,
            use_cpu_initialization=not on_gpu,
            perform_initialization=True,
            bias_activation_fusion=False,
            bias_dropout_fusion=False,
            masked_softmax_fusion=False,
            apply_rope_fusion=False,
            persist_layer_norm=False,
            gradient_accumulation_fusion=False,
            sequence_parallel=False,
        )
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)

    # ---- Hugging Face -------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, hf: Any) -> "ModelArch":
        """From a transformers config object or a config.json dict of the Llama family."""
        c = hf if isinstance(hf, dict) else hf.to_dict()
        model_type = c.get("model_type")
        if model_type not in SUPPORTED_HF_MODEL_TYPES:
            raise ArchError(
                f"unsupported Hugging Face model_type {model_type!r}; megatron-prune converts Llama-shaped "
                f"decoders: {', '.join(SUPPORTED_HF_MODEL_TYPES)} (Llama 2/3/3.1, Mistral, Qwen2, SmolLM)"
            )
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise ArchError(f"hidden_act={act!r} is not supported; Llama-family models use SiLU (SwiGLU)")
        window = c.get("sliding_window")
        if window is not None and (model_type != "qwen2" or c.get("use_sliding_window")):
            if window < c.get("max_position_embeddings", 0):
                raise ArchError(
                    f"sliding-window attention (sliding_window={window}) is not supported; models with "
                    "sliding_window=null (e.g. Mistral v0.2+) are"
                )
        rope_theta, rope_scaling = _hf_rope(c)
        scaling_factor = None
        if rope_scaling:
            rtype = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if rtype != "llama3":
                raise ArchError(f"RoPE scaling type {rtype!r} is not supported (only Llama-3.1 'llama3' scaling)")
            for k, v in _LLAMA3_ROPE_DEFAULTS.items():
                if float(rope_scaling.get(k, v)) != float(v):
                    raise ArchError(f"llama3 RoPE scaling with {k}={rope_scaling.get(k)} is not supported (needs {v})")
            scaling_factor = float(rope_scaling["factor"])
        if model_type == "qwen2":
            qkv_bias, linear_bias = True, False
        else:
            attn_bias, mlp_bias = bool(c.get("attention_bias", False)), bool(c.get("mlp_bias", False))
            if attn_bias != mlp_bias:
                raise ArchError("attention_bias and mlp_bias must be equal (megatron has one switch for both)")
            qkv_bias = linear_bias = attn_bias
        heads = c["num_attention_heads"]
        return cls(
            num_layers=c["num_hidden_layers"],
            hidden_size=c["hidden_size"],
            ffn_hidden_size=c["intermediate_size"],
            num_attention_heads=heads,
            num_query_groups=c.get("num_key_value_heads") or heads,
            kv_channels=c.get("head_dim") or c["hidden_size"] // heads,
            vocab_size=c["vocab_size"],
            max_position_embeddings=c.get("max_position_embeddings", 4096),
            normalization="RMSNorm",
            norm_eps=float(c.get("rms_norm_eps", 1e-5)),
            activation="swiglu",
            rope_base=float(rope_theta),
            rope_scaling_factor=scaling_factor,
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            linear_bias=linear_bias,
            model_type=model_type,
        )

    def hf_export_model_type(self) -> str:
        """The Hugging Face model_type this shape exports to; ArchError when no supported one can hold it.

        Usually ``model_type`` itself. A Llama whose hidden size is not a multiple of its head count (which
        pruning ``hidden`` or ``heads`` easily produces: hidden 448 with 9 heads, Minitron-8B's 4096 with 48)
        exports as ``mistral`` with ``sliding_window: null``: the same network as Llama with an explicit
        ``head_dim``, but without LlamaConfig's ``hidden_size % num_attention_heads == 0`` check, which
        transformers 5 enforces when the config is built and loaded.
        """
        if self.normalization != "RMSNorm" or self.activation != "swiglu":
            raise ArchError(f"{self.normalization} + {self.activation} has no Hugging Face Llama-family config: "
                            "only RMSNorm + SwiGLU shapes export")
        if self.model_type == "qwen2":
            if not self.qkv_bias or self.linear_bias:
                raise ArchError("a qwen2 export needs qkv biases and no other linear biases")
            return "qwen2"
        if self.model_type == "mistral" or self.hidden_size % self.num_attention_heads == 0:
            if self.model_type == "mistral" and (self.qkv_bias or self.linear_bias):
                raise ArchError("a mistral export cannot have linear biases")
            if self.qkv_bias != self.linear_bias:
                raise ArchError("a llama export has biases on all linear layers or none")
            return self.model_type
        if self.qkv_bias or self.linear_bias:
            raise ArchError(
                f"hidden size {self.hidden_size} is not a multiple of {self.num_attention_heads} attention heads, "
                "which transformers' LlamaConfig refuses, and this model's linear biases rule out the Mistral "
                "config used instead: choose hidden/heads so that hidden % heads == 0 "
                f"(e.g. hidden={self.num_attention_heads * (self.hidden_size // self.num_attention_heads)})"
            )
        return "mistral"

    def to_hf_config(self, extra: Optional[dict] = None):
        """A transformers config object (LlamaConfig, MistralConfig or Qwen2Config), with ``architectures``.

        ``head_dim`` is always written: pruning ``hidden`` or ``heads`` leaves it != hidden / heads.
        """
        import transformers

        from megatron_prune.runtime.compat import rope_config_kwargs

        model_type = self.hf_export_model_type()
        kwargs: dict[str, Any] = dict(
            num_hidden_layers=self.num_layers,
            hidden_size=self.hidden_size,
            intermediate_size=self.ffn_hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_query_groups,
            head_dim=self.kv_channels,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.norm_eps,
            hidden_act="silu",
            tie_word_embeddings=self.tie_embeddings,
        )
        if model_type == "qwen2":
            cls, arch_name = transformers.Qwen2Config, "Qwen2ForCausalLM"
        elif model_type == "mistral":
            cls, arch_name = transformers.MistralConfig, "MistralForCausalLM"
            kwargs["sliding_window"] = None
        else:
            cls, arch_name = transformers.LlamaConfig, "LlamaForCausalLM"
            kwargs["attention_bias"] = kwargs["mlp_bias"] = self.linear_bias
        kwargs.update(rope_config_kwargs(cls, self.hf_rope_parameters()))
        kwargs["architectures"] = [arch_name]
        if extra:
            kwargs.update(extra)
        return cls(**kwargs)

    def hf_rope_parameters(self) -> dict:
        """RoPE as transformers 5 spells it (``rope_parameters``)."""
        if self.rope_scaling_factor:
            return {"rope_type": "llama3", "rope_theta": self.rope_base, "factor": self.rope_scaling_factor,
                    **_LLAMA3_ROPE_DEFAULTS}
        return {"rope_type": "default", "rope_theta": self.rope_base}


def _hf_rope(c: dict) -> tuple[float, Optional[dict]]:
    """(rope_theta, scaling dict or None) from a transformers 4 or 5 style config dict."""
    params = c.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = params.get("rope_theta", c.get("rope_theta", 10000.0))
        scaling = params if params.get("rope_type", "default") != "default" else None
        return theta, scaling
    return c.get("rope_theta", 10000.0), c.get("rope_scaling")
