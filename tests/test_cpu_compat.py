"""The CPU compatibility layer lets megatron-core's CUDA-only calls run on a machine without a GPU."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer applies only without CUDA")


def test_megatron_sees_cuda_calls_redirected_and_torch_is_untouched():
    """megatron's modules see the CPU stand-ins through their own ``torch``; torch itself is what it was."""
    import megatron.core.optimizer.clip_grads as clip_grads
    import megatron.core.transformer.utils as mcore_utils
    from torch.overrides import _get_current_function_mode_stack

    from megatron_prune.runtime import apply_cpu_compat

    originals = {n: getattr(torch.cuda, n) for n in ("current_device", "synchronize", "Stream", "Event")}
    tensor_methods = (torch.Tensor.cuda, torch.Tensor.type, torch.nn.Module.cuda)
    assert apply_cpu_compat() is True
    assert apply_cpu_compat() is True  # idempotent
    mt = mcore_utils.torch  # megatron's view of torch
    assert mt is not torch and mt.nn is torch.nn and mt.float32 is torch.float32 and mt.Tensor is torch.Tensor
    assert mt.ones(3, device="cuda").device.type == "cpu"
    assert mt.empty(2, device=mt.cuda.current_device()).device.type == "cpu"
    mt.cuda.synchronize()
    # megatron-core 0.17+ DDP synchronises its gradient buffers through CUDA streams and events
    side = mt.cuda.Stream(device=mt.cuda.current_device())
    event = mt.cuda.Event()
    mt.cuda.current_stream().wait_event(event)
    side.wait_stream(mt.cuda.current_stream())
    x = torch.randn(4)
    with mt.cuda.stream(side):
        y = x + 1
    assert torch.equal(y, x + 1) and event.query()
    # torch itself: nothing changed, no function mode left on the stack
    assert {n: getattr(torch.cuda, n) for n in originals} == originals
    assert (torch.Tensor.cuda, torch.Tensor.type, torch.nn.Module.cuda) == tensor_methods
    assert _get_current_function_mode_stack() == []
    assert x.type() == "torch.FloatTensor"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.ones(1, device="cuda")
    # megatron's optimizer asserts 'torch.cuda.FloatTensor': inside its functions (only), tensors are named so
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.ones(3)
    clip_grads.clip_grad_by_total_norm_fp32([p], max_norm=1.0, total_norm=2.0)  # asserts param.grad.type()
    assert torch.allclose(p.grad, torch.full((3,), 0.5), atol=1e-6)
    assert x.type() == "torch.FloatTensor" and _get_current_function_mode_stack() == []


def test_tensor_method_scope_renames_and_casts():
    from megatron_prune.runtime.cpu_compat import TensorMethodsOnCpu

    x = torch.randn(4)
    layer = torch.nn.Linear(2, 2)
    with TensorMethodsOnCpu():
        assert x.cuda() is x
        assert layer.cuda() is layer and layer.weight.device.type == "cpu"
        assert x.type() == "torch.cuda.FloatTensor"  # megatron's optimizer checks this name
        assert x.type(torch.float64).dtype == torch.float64  # casting still works
        assert x.to("cuda").device.type == "cpu"
        assert torch.zeros(2, device="cuda:0").device.type == "cpu"
    assert x.type() == "torch.FloatTensor"


def test_which_megatron_functions_get_the_tensor_scope():
    from megatron_prune.runtime.cpu_compat import calls_tensor_methods

    def tensor_cuda(t):
        return t.cuda()

    def type_assert(p):  # (no `assert`: pytest rewrites those in test files)
        if p.type() != "torch.cuda.FloatTensor":
            raise TypeError(p.type())

    def in_a_comprehension(ts):
        return [t.cuda() for t in ts]

    def namespace_only():
        return torch.cuda.current_device()

    def device_type(t):
        return t.device.type == "cpu"

    def cast(t):
        return t.type(torch.float16)

    for fn in (tensor_cuda, type_assert, in_a_comprehension):
        assert calls_tensor_methods(fn.__code__), fn.__name__
    for fn in (namespace_only, device_type, cast):
        assert not calls_tensor_methods(fn.__code__), fn.__name__


def test_megatron_rng_tracker_and_causal_mask_on_cpu():
    from megatron.core.tensor_parallel import random as tp_random
    from megatron.core.transformer.utils import get_default_causal_mask

    from megatron_prune.runtime import apply_cpu_compat

    apply_cpu_compat()
    tracker = tp_random.get_cuda_rng_tracker()
    tracker.reset()
    tracker.add("test-stream", 123)
    with tracker.fork("test-stream"):
        a = torch.rand(3)
    tracker.reset()
    tracker.add("test-stream", 123)
    with tracker.fork("test-stream"):
        b = torch.rand(3)
    assert torch.equal(a, b)  # the tracker's stream is seeded and restored on the CPU generator
    mask = get_default_causal_mask(4)  # uses device="cuda" internally
    assert mask.device.type == "cpu" and mask.sum().item() == 6


def _tp2_forward_backward():
    from megatron_prune.arch import ModelArch
    from megatron_prune.model import build_model
    from megatron_prune.runtime import init_distributed

    init_distributed(tp=2, pp=1)
    arch = ModelArch(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                     vocab_size=256)
    model = build_model(arch)
    tokens = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))
    loss = model(tokens, torch.arange(8).expand(2, 8), None, labels=tokens).mean()
    loss.backward()
    return loss.item(), all(p.grad is not None for p in model.parameters())


def test_gpt_model_forward_backward_at_tp2_on_gloo():
    from distributed_utils import run_ranks

    (loss0, grads0), (loss1, grads1) = run_ranks(_tp2_forward_backward, 2)
    assert loss0 == pytest.approx(loss1, rel=1e-6) and grads0 and grads1
    assert 4.0 < loss0 < 7.0  # about ln(256) = 5.5 for a freshly initialised model
