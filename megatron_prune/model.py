"""Build a megatron-core GPTModel for a ModelArch on this rank's pipeline stage and tensor shard."""

from __future__ import annotations

import torch

from megatron_prune.arch import ModelArch
from megatron_prune.runtime.device import on_gpu


def transformer_engine_available() -> bool:
    if not on_gpu():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def layer_spec(arch: ModelArch, use_te: bool):
    """The megatron layer spec of this shape's family (models/<family>/config.py)."""
    from megatron_prune.models import family_of

    return family_of(arch).layer_spec(arch, use_te)


class LocalNorm:
    """The local spec's norm, torch's RMSNorm or LayerNorm as megatron's WrappedTorchNorm builds it, that also
    runs under sequence parallelism (which WrappedTorchNorm refuses). A norm works per token, so a sequence shard
    needs nothing but the tensor-parallel sum of its weight's gradient: megatron's finalize_model_grads adds it for
    weights tagged ``sequence_parallel``, as its fused and Transformer Engine norms tag theirs."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **_unused):
        norm_cls = torch.nn.RMSNorm if config.normalization == "RMSNorm" else torch.nn.LayerNorm
        norm = norm_cls(hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


def _with_local_norms(spec):
    """``spec`` with every WrappedTorchNorm replaced by LocalNorm (the same module, sequence parallelism allowed)."""
    import dataclasses

    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if spec is WrappedTorchNorm:
        return LocalNorm
    if isinstance(spec, ModuleSpec):
        return dataclasses.replace(spec, submodules=_with_local_norms(spec.submodules))
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        return dataclasses.replace(spec, **{f.name: _with_local_norms(getattr(spec, f.name))
                                            for f in dataclasses.fields(spec) if f.init})
    return spec


def decoder_spec(arch: ModelArch, use_te: bool, config, vp_stage: int | None):
    """What GPTModel builds its decoder from. The Transformer Engine spec as it is; the local spec as the block
    megatron would build from it (this stage's layers, then the final norm) with LocalNorm for its norms, so that
    a sequence-parallel model (a Mixture-of-Experts student trained at TP > 1) builds on the CPU too."""
    spec = layer_spec(arch, use_te)
    if use_te:
        return spec
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    layer = _with_local_norms(spec)
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage),
                                      layer_norm=LocalNorm)


def build_model(arch: ModelArch, dtype: torch.dtype = torch.float32, use_te: bool | None = None,
                vp_stage: int | None = None, **config_overrides):
    """The GPTModel shard of this rank (megatron's parallel_state must be initialized).

    ``use_te=None`` picks the Transformer Engine spec when TE and a GPU are present, the local spec otherwise;
    both write the same checkpoint keys, so a checkpoint moves freely between them. ``vp_stage``: which of this
    rank's virtual pipeline stages (model chunks) to build, when parallel_state has a virtual pipeline size.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    if use_te is None:
        use_te = transformer_engine_available()
    if arch.num_experts is not None:  # the TE spec's experts are one grouped GEMM; the local spec's a list of MLPs
        from megatron_prune.runtime.compat import moe_without_te

        moe_without_te()
        config_overrides.setdefault("moe_grouped_gemm", use_te)
        config_overrides.setdefault("expert_model_parallel_size", ps.get_expert_model_parallel_world_size())
    if vp_stage is not None:
        config_overrides["virtual_pipeline_model_parallel_size"] = ps.get_virtual_pipeline_model_parallel_world_size()
        # the interleaved schedule's steady state sends an activation and a gradient to the same peer at PP=2;
        # batched p2p pairs them by posting order and swaps the two (Megatron-LM issues #750, #1450). The
        # unbatched path puts the two directions on different groups.
        config_overrides.setdefault("batch_p2p_comm", False)
    if pp > 1:  # pipeline stages of unequal depth (runtime/stages.py): megatron's first/last stage sizes
        from megatron_prune.runtime.stages import megatron_kwargs, split_for

        vpp = config_overrides.get("virtual_pipeline_model_parallel_size") or 1
        for key, value in megatron_kwargs(split_for(arch.num_layers, pp, vpp)).items():
            config_overrides.setdefault(key, value)
    config = arch.to_transformer_config(tp=tp, pp=pp, dtype=dtype, **config_overrides)
    model = GPTModel(
        config=config,
        transformer_layer_spec=decoder_spec(arch, use_te, config, vp_stage),
        vocab_size=arch.padded_vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=ps.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        post_process=ps.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage),
        share_embeddings_and_output_weights=arch.tie_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rope_base),
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
        parallel_output=True,
        vp_stage=vp_stage,
    )
    if not config.perform_initialization:
        mark_tensor_parallel_weights(model)
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu() else torch.device("cpu")
    return model.to(device=device, dtype=dtype)


def mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Tag the TP-split weights the way megatron does when it initializes them.

    megatron sets ``tensor_model_parallel``/``partition_dim`` on a weight only in its init functions; a model
    built to be loaded from a checkpoint (``perform_initialization=False``) lacks them, and the gradient norm
    (hence clipping) then counts every split weight on TP rank 0 only, as if it were replicated.
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter) or getattr(weight, "tensor_model_parallel", False):
            continue
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            set_tensor_model_parallel_attributes(weight, True, 0, 1)
        elif isinstance(module, RowParallelLinear):
            set_tensor_model_parallel_attributes(weight, True, 1, 1)


def build_chunks(arch: ModelArch, dtype: torch.dtype = torch.float32, use_te: bool | None = None,
                 **config_overrides) -> list:
    """This rank's model chunks: one per virtual pipeline stage (megatron's interleaved schedule), in order;
    a single model when there are no virtual stages. Chunk ``i`` holds global layers
    ``(i * pp + pp_rank) * L / (pp * vpp)`` onwards (for an even split; megatron places uneven stages' chunks), and
    each chunk's sharded_state_dict carries those offsets."""
    from megatron.core import parallel_state as ps

    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    if vpp is None:
        return [build_model(arch, dtype, use_te, **config_overrides)]
    return [build_model(arch, dtype, use_te, vp_stage=i, **config_overrides) for i in range(vpp)]


def layer_offset(arch: ModelArch) -> int:
    """Global index of this stage's first decoder layer (stages may differ in depth: runtime/stages.py)."""
    from megatron.core import parallel_state as ps

    from megatron_prune.runtime.stages import current_split

    return sum(current_split(arch.num_layers)[:ps.get_pipeline_model_parallel_rank()])


def expert_offset(arch: ModelArch) -> int:
    """Global index of this rank's first local expert (0 for a dense model and at expert-parallel size 1)."""
    from megatron.core import parallel_state as ps

    if arch.num_experts is None:
        return 0
    return ps.get_expert_model_parallel_rank() * (arch.num_experts // ps.get_expert_model_parallel_world_size())
