"""`megatron-prune plan`: memory estimates against the real model (parameters per rank, activations saved for
backward, measured with autograd's saved-tensor hooks) and against public large-scale recipes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_utils import run_ranks

LLAMA_70B = "layers=80,hidden=8192,ffn=28672,heads=64,groups=8,vocab=128256"
LLAMA_8B = "layers=32,hidden=4096,ffn=14336,heads=32,groups=8,vocab=128256"


def tiny_arch(**kw):
    from megatron_prune.arch import ModelArch

    cfg = dict(num_layers=4, hidden_size=256, ffn_hidden_size=704, num_attention_heads=8, num_query_groups=2,
               vocab_size=1000)
    cfg.update(kw)
    return ModelArch(**cfg)


def params_per_rank_worker(arch_kwargs):
    """Inside each rank of a TP2 x PP2 world: the parameters this rank really holds."""
    from megatron.core import parallel_state as ps

    from megatron_prune.model import build_model
    from megatron_prune.runtime import init_distributed

    init_distributed(2, 2)
    model = build_model(tiny_arch(**arch_kwargs), use_te=False)
    return ps.get_pipeline_model_parallel_rank(), sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("tied", [False, True])
def test_parameters_per_rank_equal_the_built_model(tied):
    from megatron_prune.runtime.memory import stage_param_count

    arch = tiny_arch(tie_embeddings=tied)
    for stage, count in run_ranks(params_per_rank_worker, 4, {"tie_embeddings": tied}):
        assert count == stage_param_count(arch, 2, 2, stage), (stage, tied)
    assert stage_param_count(arch, 1, 1, 0) == arch.param_count() + (arch.padded_vocab_size - arch.vocab_size) * (
        arch.hidden_size * (1 if tied else 2))


def saved_activation_worker(tp, seq, batch, gated):
    """Bytes autograd keeps for one decoder layer's backward (non-parameter storages, fp32, local spec)."""
    from megatron_prune.model import build_model
    from megatron_prune.runtime import init_distributed

    init_distributed(tp, 1)
    arch = tiny_arch(activation="swiglu" if gated else "gelu")
    model = build_model(arch, use_te=False)
    layer = model.decoder.layers[0]
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            storages[st.data_ptr()] = st.nbytes()
        return t

    torch.manual_seed(0)
    x = torch.randn(seq, batch, arch.hidden_size, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=None, rotary_pos_emb=model.rotary_pos_emb(seq))
    return sum(storages.values())


@pytest.mark.parametrize("tp,gated", [(1, True), (2, True), (1, False)])
def test_activation_estimate_matches_saved_tensors(tp, gated):
    from megatron_prune.runtime.memory import Layout, layer_activation_bytes

    seq, batch = 96, 2
    measured = run_ranks(saved_activation_worker, tp, tp, seq, batch, gated)
    est = layer_activation_bytes(tiny_arch(activation="swiglu" if gated else "gelu"),
                                 Layout(tp=tp, seq_len=seq, micro_batch_size=batch, implementation="local",
                                        sequence_parallel=False), 4)
    for m in measured:  # RoPE tables and norm statistics are the only tensors the formula leaves out
        assert abs(est - m) <= 0.03 * m, (tp, gated, est, m)


def test_mixed_precision_bytes_per_parameter():
    """megatron's distributed-optimizer accounting: 18 bytes per parameter, 6 + 12/d with the optimizer sharded."""
    from megatron_prune.runtime.memory import Layout, estimate_memory, stage_param_count

    arch = tiny_arch()
    P = stage_param_count(arch, 1, 1, 0)
    plain = estimate_memory(arch, Layout(dp=4, distributed_optimizer=False, seq_len=64))
    sharded = estimate_memory(arch, Layout(dp=4, distributed_optimizer=True, seq_len=64))
    assert plain.student_weights + plain.student_grads + plain.optimizer == 18 * P
    assert sharded.student_weights + sharded.student_grads + sharded.optimizer == 6 * P + 12 * P // 4
    fp32 = estimate_memory(arch, Layout(seq_len=64, distributed_optimizer=False), precision="fp32")
    assert fp32.student_weights + fp32.student_grads + fp32.optimizer == 16 * P
    teacher = estimate_memory(arch, Layout(seq_len=64), teacher=tiny_arch(num_layers=8))
    fp8 = estimate_memory(arch, Layout(seq_len=64), teacher=tiny_arch(num_layers=8), fp8_teacher=True)
    assert teacher.teacher_weights == 2 * fp8.teacher_weights == 2 * stage_param_count(tiny_arch(num_layers=8), 1, 1, 0)


def test_public_70b_recipe_fits_and_smaller_layouts_do_not():
    """NeMo 2's llama3_70b pretrain recipe (TP4 PP4 VPP5 CP2, seq 8192, micro batch 1) runs on 80 GB H100s."""
    from megatron_prune.pipelines.memory_plan import PlanDoesNotFit, plan

    out = plan(LLAMA_70B, tp=4, pp=4, vpp=5, cp=2, dp=4, seq_len=8192, global_batch_size=64)
    assert out["asked"][1].total <= 80 * 1024 ** 3
    with pytest.raises(PlanDoesNotFit, match=r"TP1 PP1 DP32 needs .* GiB per GPU, more than the 80 GiB available; "
                                             r"TP\d PP\d+ DP\d+ SP fits"):
        plan(LLAMA_70B, tp=1, pp=1, dp=32, seq_len=4096, global_batch_size=32)
    # one node cannot hold 70B with Adam at all (the optimizer state alone is 12 bytes x 70.6B / 8 GPUs)
    with pytest.raises(PlanDoesNotFit, match="more than the 80 GiB available$"):
        plan(LLAMA_70B, tp=8, pp=1, dp=1, seq_len=4096)
    # distilling 70B -> 8B on two nodes: the teacher has to be sharded, which the fitting list reflects
    fitting = plan(LLAMA_8B, teacher=LLAMA_70B, tp=8, pp=2, seq_len=8192, global_batch_size=16)["fitting"]
    assert fitting and all(lay.tp * lay.pp >= 4 for lay, _ in fitting)


def test_plan_cli_refuses_with_exit_code_2_and_reads_checkpoints(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "megatron_prune.cli", "plan", *args], capture_output=True,
                              text=True, timeout=600)

    bad = cli(LLAMA_70B, "--tp", "1", "--seq-len", "8192")
    assert bad.returncode == 2 and "DOES NOT FIT" in bad.stdout and "more than the 80 GiB" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert cli("layers=2,hidden=64", "--tp", "1").returncode == 2
    ok = cli(LLAMA_8B, "--teacher", LLAMA_70B, "--tp", "8", "--pp", "2", "--fp8-teacher", "--seq-len", "4096")
    assert ok.returncode == 0, ok.stderr
    assert "teacher weights" in ok.stdout and "fits" in ok.stdout
    missing = cli(str(tmp_path / "nope"))
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_estimate_is_within_15_percent_of_the_measured_peak_on_cpu():
    """The planner against real distillation runs (teacher 4 x 256, student 2 x 192, vocab 8192, seq 256) at TP1,
    TP2, PP2 and DP2 on gloo ranks: each rank's peak resident memory over building the trainer and two steps,
    minus what the same run on a model of a few thousand parameters needs (the runtime itself)."""
    bench = Path(__file__).parents[1] / "bench" / "plan_vs_measured.py"
    out = subprocess.run([sys.executable, str(bench), "--quick"], capture_output=True, text=True, timeout=1200,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in out.stdout.splitlines() if line.startswith("| TP")]
    assert [r[0].strip() for r in rows] == ["TP1 PP1 DP1", "TP2 PP1 DP1", "TP1 PP2 DP1", "TP1 PP1 DP2"], out.stdout
    for _layout, est, runtime, measured, _ in rows:
        predicted = float(est) + float(runtime)
        assert abs(float(measured) - predicted) <= 0.15 * predicted, out.stdout
    # the layouts really differ, so agreement is not an accident of one shape
    est = {r[0].strip(): float(r[1]) for r in rows}
    assert est["TP2 PP1 DP1"] < 0.6 * est["TP1 PP1 DP1"] and est["TP1 PP2 DP1"] < est["TP1 PP1 DP1"]
