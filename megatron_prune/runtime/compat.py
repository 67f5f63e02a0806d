"""Every place where megatron-core (0.16.1 - 0.19.x) or transformers (4.51 - 5.x) differ between releases.

The rest of the code calls these names instead of the library's own, so a release that moves an API is handled
here, once. Each entry detects the feature (an attribute, a parameter, an import), never a version string, and
says in one comment which releases differ and how. The CPU stand-ins for CUDA calls are in cpu_compat.py.
"""

from __future__ import annotations

import inspect

import torch

# --------------------------------------------------------------------------------------------- megatron-core
# (imported inside the functions: this module is also used where megatron is not loaded yet)


def torch_dist_save_strategy_base() -> type:
    """The class a custom ``torch_dist`` save strategy must subclass to be used by ``dist_checkpointing.save``.

    0.16: a subclass of AsyncSaveShardedStrategy, (backend, version) positional, any SaveShardedStrategy is used;
    0.17+: a plain class with defaults, and save() swaps any strategy that is not an instance of it for its
    default. Subclassing it and passing both arguments works on every release."""
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    return TorchDistSaveShardedStrategy


def group_by_sharded_key(sharded_state_dict: dict) -> dict:
    """megatron's sharded state dict regrouped by checkpoint key (main replicas only), the first step of its own
    torch_dist save and the input of ``mcore_to_pyt_state_dict`` (private; same signature 0.16.1 - 0.19.x)."""
    from megatron.core.dist_checkpointing.strategies import torch as strategies

    group = getattr(strategies, "_replace_state_dict_keys_with_sharded_keys", None)
    if group is None:  # pragma: no cover - a release that renames it
        raise ImportError("this megatron-core has no _replace_state_dict_keys_with_sharded_keys; install "
                          "megatron-core 0.16.1 - 0.19.x")
    by_key, _, _ = group(sharded_state_dict, keep_only_main_replica=True)
    return by_key


def megatron_rng_module():
    """The module whose ``_get_cuda_rng_state`` / ``_set_cuda_rng_state`` megatron's tensor-parallel RNG tracker
    calls (private; 0.16.1 - 0.19.x keep the names and the ``(device, graph_safe)`` arguments)."""
    from megatron.core.tensor_parallel import random as tp_random

    for name in ("_get_cuda_rng_state", "_set_cuda_rng_state"):
        if not hasattr(tp_random, name):  # pragma: no cover - a release that renames them
            raise ImportError(f"megatron.core.tensor_parallel.random has no {name}; install megatron-core "
                              "0.16.1 - 0.19.x")
    return tp_random


# CUDA streams and events: 0.17+ DDP calls torch.cuda.current_stream().wait_event(...) on every gradient sync
# and partial distributed optimizers create torch.cuda.Streams; 0.16 calls neither. On a machine without CUDA,
# cpu_compat.py maps torch.cuda.current_stream/default_stream/stream/Stream/Event to no-op stand-ins on every
# release (every CPU op has finished when it returns), so nothing here needs to detect it.

# The common (non-tensor) state: 0.16 and 0.17 torch.save it to common.pt on rank 0 before the shards; 0.19 hands
# it to the strategy as a 'common_state' object serialized into the shards on every rank (no common.pt; 0.19 reads
# either, 0.16 needs common.pt). checkpoint/writer.py serializes before the ranks agree, which covers both.


# ---------------------------------------------------------------------------------------------- transformers

def _config_spells_dtype() -> bool:
    import transformers

    cfg = transformers.PretrainedConfig
    # 4.56+ (and 5.x) store ``dtype`` and keep ``torch_dtype`` as a deprecated property; 4.51-4.55 only know
    # ``torch_dtype`` (an unknown ``dtype=`` there becomes a config attribute or a model argument).
    return hasattr(cfg, "dtype") or isinstance(getattr(cfg, "torch_dtype", None), property)


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """The dtype argument of ``from_pretrained`` / ``from_config``: ``dtype=`` on 4.56+, ``torch_dtype=`` before."""
    return {"dtype" if _config_spells_dtype() else "torch_dtype": dtype}


def set_config_dtype(config, dtype_name: str) -> None:
    """Record the weights' dtype (``"float32"``) in a transformers config: ``config.dtype`` on 4.56+ (where
    ``torch_dtype`` warns as deprecated), ``config.torch_dtype`` before. Both are saved as config.json's dtype."""
    setattr(config, "dtype" if _config_spells_dtype() else "torch_dtype", dtype_name)


def rope_config_kwargs(config_cls, rope_parameters: dict) -> dict:
    """RoPE as arguments of a transformers config class.

    5.x configs take one ``rope_parameters`` dict (rope_type, rope_theta, scaling); 4.x take ``rope_theta`` and,
    when scaled, a ``rope_scaling`` dict (5.x would ignore those, 4.x would ignore ``rope_parameters``)."""
    if "rope_parameters" in inspect.signature(config_cls.__init__).parameters:
        return {"rope_parameters": rope_parameters}
    kwargs = {"rope_theta": rope_parameters["rope_theta"]}
    if rope_parameters.get("rope_type", "default") != "default":
        kwargs["rope_scaling"] = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
    return kwargs


def moe_without_te() -> None:
    """Two megatron-core 0.16 MoE paths that assume CUDA and Transformer Engine, made to run on the CPU too:

    - the router GEMM tests ``te_general_gemm is not None``, a name bound only when TE imports: without TE every
      MoE forward raises NameError. Bound to None (megatron's own torch.mm path then runs).
    - the all-to-all dispatcher turns its split sizes into numpy arrays only when they are on a GPU
      (``maybe_move_tensor_to_cpu(..., as_numpy=True)``); CPU tensors stay tensors and gloo's all_to_all_single
      refuses them. CPU tensors are converted too (what the GPU path returns).
    """
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    original = moe_utils.maybe_move_tensor_to_cpu
    if getattr(original, "_cpu_numpy", False):
        return

    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    maybe_move_tensor_to_cpu._cpu_numpy = True
    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    uneven_collectives_on_gloo()


def uneven_collectives_on_gloo() -> None:
    """megatron's all-gather and reduce-scatter of uneven slices (``output_split_sizes``/``input_split_sizes``)
    on gloo, which takes only equal ones. The all-to-all dispatcher uses them at TP > 1 with EP > 1 under
    sequence parallelism, where each TP rank routes a different number of tokens to an EP rank's experts. On gloo
    the gather pads every slice to the longest, and the reduce-scatter all-reduces the whole tensor and keeps this
    rank's slice (the same sums); other backends (NCCL) run megatron's own code (0.16.1 - 0.19.x: same names)."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    if getattr(mappings._gather_along_first_dim, "_uneven_on_gloo", False):
        return
    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1 or dist.get_backend(group) != "gloo":
            return gather(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        out = input_.new_empty((longest * group.size(),) + tuple(input_.shape[1:]))
        dist.all_gather_into_tensor(out, padded.contiguous(), group=group)
        return torch.cat([chunk[:n] for chunk, n in zip(out.split(longest), output_split_sizes)])

    def _reduce_scatter_along_first_dim(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1 or dist.get_backend(group) != "gloo":
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        summed = input_.contiguous().clone()
        dist.all_reduce(summed, group=group)
        return summed.split(list(input_split_sizes))[group.rank()].contiguous()

    _gather_along_first_dim._uneven_on_gloo = True
    mappings._gather_along_first_dim = _gather_along_first_dim
    mappings._reduce_scatter_along_first_dim = _reduce_scatter_along_first_dim
