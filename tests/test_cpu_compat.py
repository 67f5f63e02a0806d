"""The CPU compatibility layer lets megatron-core's CUDA-only calls run on a machine without a GPU."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer applies only without CUDA")


def test_cuda_calls_are_redirected():
    from megatron_prune.runtime import apply_cpu_compat

    assert apply_cpu_compat() is True
    assert torch.ones(3, device="cuda").device.type == "cpu"
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    x = torch.randn(4)
    assert x.cuda() is x
    torch.cuda.synchronize()
    layer = torch.nn.Linear(2, 2)
    assert layer.cuda() is layer
    assert x.type() == "torch.cuda.FloatTensor"  # megatron's optimizer checks this name
    assert x.type(torch.float64).dtype == torch.float64  # casting still works
    # megatron-core 0.17+ DDP synchronises its gradient buffers through CUDA streams and events
    side = torch.cuda.Stream(device=torch.cuda.current_device())
    event = torch.cuda.Event()
    torch.cuda.current_stream().wait_event(event)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y = x + 1
    assert torch.equal(y, x + 1) and event.query()


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
