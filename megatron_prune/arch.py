"""ModelArch: the shape of a decoder, its exact parameter count, and its megatron TransformerConfig.

Everything that is a *shape* lives here (and nothing that is a weight): pruning produces a new ModelArch.
One dataclass for every family: a family adds fields with defaults that leave the others unchanged (Qwen3:
``qk_norm``). Hugging Face configs are read and written by the family (megatron_prune/models/<family>/).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

# megatron-core's built-in Llama-3.1 RoPE scaling uses these constants; other values are rejected.
LLAMA3_ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

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
    model_type: str = "llama"  # the HF model_type this shape came from / exports to (its family: models/)
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on every query and key head before RoPE
    # Mixture of Experts (Mixtral, Qwen3-MoE): every layer's MLP is ``num_experts`` SwiGLU experts of width
    # ``moe_ffn_hidden_size``, of which a softmax router picks ``moe_router_topk`` per token; None: dense
    num_experts: Optional[int] = None
    moe_ffn_hidden_size: Optional[int] = None
    moe_router_topk: int = 0
    moe_norm_topk_prob: bool = True  # the k gate weights renormalised to sum 1 (Mixtral; Qwen3-MoE's norm_topk_prob)
    moe_aux_loss_coeff: float = 0.0  # the router's load-balancing loss coefficient (used in training only)

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
        if self.num_experts is not None:
            self._validate_moe()

    def _validate_moe(self) -> None:
        if self.num_experts < 1:
            raise ArchError(f"num_experts={self.num_experts}: a Mixture-of-Experts model needs at least 1 expert; "
                            "keep experts >= 1 (and >= the router's top-k)")
        if not self.moe_ffn_hidden_size or self.moe_ffn_hidden_size < 1:
            raise ArchError(f"moe_ffn_hidden_size={self.moe_ffn_hidden_size} must be positive "
                            "(each expert's FFN width)")
        if not 1 <= self.moe_router_topk <= self.num_experts:
            raise ArchError(f"router top-k {self.moe_router_topk} must be between 1 and the {self.num_experts} "
                            "experts: keep experts >= top-k, or lower top-k (num_experts_per_tok) to at most "
                            f"{self.num_experts}")
        if self.moe_router_topk == 1 and self.moe_norm_topk_prob:
            raise ArchError("router top-k 1 with renormalised gate weights (every weight 1) cannot be built in "
                            "megatron-core (it needs the softmax before the top-k for k=1): keep top-k >= 2")

    def check_parallel(self, tp: int, pp: int, ep: int = 1) -> None:
        """Raise a clear error when this shape cannot be split over ``tp`` x ``pp`` (and ``ep`` expert-parallel)."""
        problems = []
        if ep > 1 and self.num_experts is None:
            problems.append(f"EP={ep} needs a Mixture-of-Experts model (this one is dense; use --ep 1)")
        elif ep > 1 and self.num_experts % ep:
            problems.append(f"EP={ep} does not divide the {self.num_experts} experts "
                            "(choose an --ep that divides them)")
        if self.num_experts is not None and self.moe_ffn_hidden_size % tp:
            problems.append(f"moe_ffn_hidden_size={self.moe_ffn_hidden_size} is not divisible by TP={tp}")
        if self.num_query_groups % tp:
            problems.append(f"num_query_groups={self.num_query_groups} is not divisible by TP={tp}")
        if self.num_attention_heads % tp:
            problems.append(f"num_attention_heads={self.num_attention_heads} is not divisible by TP={tp}")
        if self.ffn_hidden_size % tp and self.num_experts is None:
            problems.append(f"ffn_hidden_size={self.ffn_hidden_size} is not divisible by TP={tp}")
        if self.padded_vocab_size % tp:
            problems.append(f"padded vocab {self.padded_vocab_size} is not divisible by TP={tp}")
        if pp > self.num_layers:  # stages may differ in depth (runtime/stages.py), but none can be empty
            problems.append(f"PP={pp} is more than num_layers={self.num_layers} (every stage needs a layer)")
        if problems:
            where = f"TP={tp} PP={pp}" + (f" EP={ep}" if ep > 1 else "")
            raise ArchError(
                f"cannot shard this model at {where}: " + "; ".join(problems)
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
        qk_norms = 2 * kv if self.qk_norm else 0
        if self.num_experts is not None:  # the router plus every expert's SwiGLU MLP
            return 2 * norm + attn + qk_norms + self.num_experts * h + self.num_experts * self._expert_params()
        fc1_out = f * (2 if self.gated else 1)
        mlp = h * fc1_out + f * h + ((fc1_out + h) if self.linear_bias else 0)
        return 2 * norm + attn + mlp + qk_norms

    def _expert_params(self) -> int:
        return 3 * self.hidden_size * self.moe_ffn_hidden_size

    def active_param_count(self) -> int:
        """Parameters one token uses: everything but the experts the router does not pick (all of a dense model)."""
        if self.num_experts is None:
            return self.param_count()
        idle = self.num_experts - self.moe_router_topk
        return self.param_count() - self.num_layers * idle * self._expert_params()

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
        ffn = f"FFN {self.ffn_hidden_size}"
        if self.num_experts is not None:
            ffn = f"{self.num_experts} experts (top-{self.moe_router_topk}) of FFN {self.moe_ffn_hidden_size}"
        return (
            f"{self.num_layers} layers, hidden {self.hidden_size}, {ffn}, "
            f"{self.num_attention_heads} heads in {self.num_query_groups} query groups (kv {self.kv_channels}), "
            f"vocab {self.vocab_size}, {self.param_count() / 1e6:.1f}M params"
        )

    # ---- megatron ---------------------------------------------------------------------------
    def to_transformer_config(self, tp: int = 1, pp: int = 1, dtype: torch.dtype = torch.float32, **overrides):
        """The megatron TransformerConfig for this shape at ``tp`` x ``pp``."""
        import torch.nn.functional as F
        from megatron.core.transformer.transformer_config import TransformerConfig

        self.check_parallel(tp, pp, overrides.get("expert_model_parallel_size", 1))
        from megatron_prune.runtime.device import on_gpu as _on_gpu

        on_gpu = _on_gpu()
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
            qk_layernorm=self.qk_norm,
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
        if self.num_experts is not None:
            kwargs.update(self._moe_config(on_gpu))
        kwargs.update(overrides)
        return TransformerConfig(**kwargs)

    def _moe_config(self, on_gpu: bool) -> dict:
        """megatron's MoE fields: softmax router; the k weights renormalised = softmax over the top-k logits
        (megatron's default), not renormalised = softmax over all experts first (``moe_router_pre_softmax``).
        Dropless (no capacity factor), the all-to-all dispatcher (expert-parallel over gloo on a CPU too). The
        router runs in fp32 on a GPU (megatron-core 0.16's fp32 router GEMM needs Transformer Engine: on the CPU
        the model's own dtype, float32 in every test)."""
        return dict(
            num_moe_experts=self.num_experts,
            moe_ffn_hidden_size=self.moe_ffn_hidden_size,
            moe_router_topk=self.moe_router_topk,
            moe_router_pre_softmax=not self.moe_norm_topk_prob,
            moe_router_score_function="softmax",
            moe_router_load_balancing_type="aux_loss" if self.moe_aux_loss_coeff else "none",
            moe_aux_loss_coeff=self.moe_aux_loss_coeff,
            moe_token_dispatcher_type="alltoall",
            moe_router_dtype="fp32" if on_gpu else None,
            moe_permute_fusion=False,
        )

    # ---- Hugging Face (read and written by the family, megatron_prune/models/<family>/config.py) -----
    @classmethod
    def from_hf_config(cls, hf: Any) -> "ModelArch":
        """From a transformers config object or a config.json dict of a supported family."""
        from megatron_prune.models import family_for

        c = hf if isinstance(hf, dict) else hf.to_dict()
        return family_for(c.get("model_type")).arch_from_hf(c)

    def hf_export_model_type(self) -> str:
        """The Hugging Face model_type this shape exports to; ArchError when its family cannot hold it."""
        from megatron_prune.models import family_of

        return family_of(self).hf_export_model_type(self)

    def to_hf_config(self, extra: Optional[dict] = None):
        """A transformers config object of this shape's family, with ``architectures``."""
        from megatron_prune.models import family_of

        return family_of(self).hf_config(self, extra)

    def hf_rope_parameters(self) -> dict:
        """RoPE as transformers 5 spells it (``rope_parameters``)."""
        if self.rope_scaling_factor:
            return {"rope_type": "llama3", "rope_theta": self.rope_base, "factor": self.rope_scaling_factor,
                    **LLAMA3_ROPE_DEFAULTS}
        return {"rope_type": "default", "rope_theta": self.rope_base}

