"""NeMo 2 and Megatron-Bridge checkpoints: export/import round trip, the exact layout, hand-built inputs, errors.

References are independent of megatron_prune.checkpoint.nemo: transformers' forward on the source HF model,
our own Megatron checkpoint's forward at TP1, a file tree and a model.yaml written here by hand from NeMo's
documented layout, and NeMo-keyed weights written here with megatron's dist_checkpointing from HF tensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_hf_model
from distributed_utils import run_ranks

TOL = 1e-4
VOCAB = 1000
LAYERS = 4


def tiny_tokenizer(out: Path, vocab: int = VOCAB) -> Path:
    """A word-level HF tokenizer with exactly ``vocab`` entries (cheap, self-contained)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, **{f"w{i}": i for i in range(1, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    d = make_hf_model(tmp_path_factory.mktemp("nemo_src") / "hf")
    tiny_tokenizer(d)
    return d


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))


def hf_logits(hf_dir: Path, toks: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return model(toks).logits


def _forward(model, arch, toks):
    from megatron_prune.forward import broadcast_from_last_stage, gather_vocab, run_forward

    out = run_forward(model, [{"tokens": toks}], 1, toks.shape[1], toks.shape[0],
                      lambda logits, batch: gather_vocab(logits, arch))
    return broadcast_from_last_stage(out)[0]


def ours_logits(ckpt, toks):
    from megatron_prune.checkpoint import load_model
    from megatron_prune.runtime import init_distributed

    init_distributed(1, 1)
    model, meta = load_model(ckpt)
    return _forward(model, meta.arch, toks)


def foreign_logits(path, tp, pp, toks):
    from megatron_prune.checkpoint.nemo import load_foreign_model
    from megatron_prune.runtime import init_distributed

    init_distributed(tp, pp)
    model, ckpt = load_foreign_model(path)
    return _forward(model, ckpt.arch, toks)


def _convert(src, out, to, tp=1, pp=1, dtype="auto"):
    from megatron_prune.pipelines.convert import convert

    return convert(src, out, to=to, tp=tp, pp=pp, dtype=dtype)


@pytest.fixture(scope="module")
def exported(hf_dir, tmp_path_factory):
    """HF -> our Megatron checkpoint (TP2) -> NeMo 2 (exported on 2 ranks: PP2)."""
    root = tmp_path_factory.mktemp("nemo_export")
    run_ranks(_convert, 2, hf_dir, root / "mp", "megatron", 2, 1)
    run_ranks(_convert, 2, root / "mp", root / "nemo", "nemo", 1, 1, "float32")  # exact: float32, not bf16
    return root / "mp", root / "nemo"


# ---------------------------------------------------------------------------------------------------
def _tp1_checks(mp, nemo, back, toks):
    """One process: our checkpoint, the NeMo export, and the NeMo export converted back, all at TP1."""
    from megatron_prune.pipelines.convert import convert

    ref, tp1 = ours_logits(mp, toks), foreign_logits(nemo, 1, 1, toks)
    convert(nemo, back, to="megatron")
    return ref, tp1, ours_logits(back, toks)


def test_export_then_import_gives_identical_logits(exported, hf_dir):
    mp, nemo = exported
    toks = tokens()
    ref, tp1, back = run_ranks(_tp1_checks, 1, mp, nemo, nemo.parent / "back", toks)[0]
    assert (ref - hf_logits(hf_dir, toks)).abs().max() < TOL  # the Megatron checkpoint itself is right
    assert torch.equal(tp1, ref)  # same weights, same TP1 computation: bit-identical
    assert torch.equal(back, ref)  # and back into our format: the same tensors again
    for got in run_ranks(foreign_logits, 2, nemo, 2, 1, toks):  # resharded on load
        assert (got - ref).abs().max() < TOL


def _sharded_keys(weights: Path) -> dict[str, tuple]:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(str(weights)).read_metadata().state_dict_metadata
    return {k: tuple(v.size) for k, v in md.items() if isinstance(v, TensorStorageMetadata)}


def test_layout_matches_the_documented_one(exported, hf_dir):
    _, nemo = exported
    h, f, heads, groups, kv = 64, 96, 8, 4, 8
    carried = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
    tok_files = sorted(p.name for p in hf_dir.iterdir() if p.name in carried)
    assert "tokenizer.json" in tok_files
    # megatron's common (non-tensor) state: common.pt whatever megatron-core wrote the shards (0.19 also keeps it
    # inside them, but NeMo's megatron-core <= 0.16 reads only the file)
    expected = {"context/model.yaml", "context/io.json", "context/megatron_prune.json",
                *(f"context/nemo_tokenizer/{n}" for n in tok_files),
                "weights/.metadata", "weights/metadata.json", "weights/common.pt"}
    got = {str(p.relative_to(nemo)) for p in nemo.rglob("*") if p.is_file()}
    assert {g for g in got if not g.endswith(".distcp")} == expected
    assert any(g.startswith("weights/__") and g.endswith(".distcp") for g in got)
    assert not (nemo.parent / f".{nemo.name}.tmp").exists()
    assert json.loads((nemo / "weights/metadata.json").read_text()) == {
        "sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
        "common_backend_version": 1}  # what megatron-core 0.16 writes, and needs

    L = "module.decoder.layers."
    assert _sharded_keys(nemo / "weights") == {
        "module.embedding.word_embeddings.weight": (1024, h),  # 1000 padded to a multiple of 128
        L + "self_attention.linear_qkv.layer_norm_weight": (LAYERS, h),
        L + "self_attention.linear_qkv.weight": (LAYERS, (heads + 2 * groups) * kv, h),
        L + "self_attention.linear_proj.weight": (LAYERS, h, heads * kv),
        L + "mlp.linear_fc1.layer_norm_weight": (LAYERS, h),
        L + "mlp.linear_fc1.weight": (LAYERS, 2 * f, h),
        L + "mlp.linear_fc2.weight": (LAYERS, h, f),
        "module.decoder.final_layernorm.weight": (h,),
        "module.output_layer.weight": (1024, h),
    }
    model = yaml.safe_load((nemo / "context/model.yaml").read_text())
    assert model["_target_"] == "nemo.collections.llm.gpt.model.llama.LlamaModel"
    assert model["tokenizer"] == {"_target_": "nemo.collections.common.tokenizers.huggingface.auto_tokenizer"
                                  ".AutoTokenizer", "pretrained_model_name": "nemo_tokenizer"}
    cfg = model["config"]
    assert cfg["_target_"] == "nemo.collections.llm.gpt.model.llama.LlamaConfig"
    hf = json.loads((hf_dir / "config.json").read_text())
    want = {"num_layers": hf["num_hidden_layers"], "hidden_size": hf["hidden_size"],
            "ffn_hidden_size": hf["intermediate_size"], "num_attention_heads": hf["num_attention_heads"],
            "num_query_groups": hf["num_key_value_heads"], "kv_channels": h // heads,
            "seq_length": hf["max_position_embeddings"], "normalization": "RMSNorm",
            "layernorm_epsilon": hf["rms_norm_eps"], "gated_linear_unit": True, "add_bias_linear": False,
            "position_embedding_type": "rope", "share_embeddings_and_output_weights": False,
            "vocab_size": 1024, "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False},
            "params_dtype": {"_target_": "torch.float32", "_call_": False}}
    assert {k: cfg[k] for k in want} == want
    assert "max_position_embeddings" not in cfg  # not a field of NeMo's GPTConfig (LlamaConfig(**fields) raises)


# ---------------------------------------------------------------------------------------------------
# hand-built NeMo 2 and Megatron-Bridge checkpoints
# ---------------------------------------------------------------------------------------------------
def _megatron_tensors_from_hf(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Our (TE-named, layer-stacked) megatron tensors from HF weights, by the documented naive mapping."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).state_dict()
    c = json.loads((hf_dir / "config.json").read_text())
    heads, groups = c["num_attention_heads"], c["num_key_value_heads"]
    kv = c["hidden_size"] // heads
    per = heads // groups

    def layer(i, name):
        return hf[f"model.layers.{i}.{name}"]

    qkv, proj, ln1, ln2, fc1, fc2 = [], [], [], [], [], []
    for i in range(c["num_hidden_layers"]):
        q = layer(i, "self_attn.q_proj.weight").view(groups, per * kv, -1)
        k = layer(i, "self_attn.k_proj.weight").view(groups, kv, -1)
        v = layer(i, "self_attn.v_proj.weight").view(groups, kv, -1)
        qkv.append(torch.cat([q, k, v], dim=1).reshape(-1, c["hidden_size"]))  # [q heads, k, v] per group
        proj.append(layer(i, "self_attn.o_proj.weight"))
        ln1.append(layer(i, "input_layernorm.weight"))
        ln2.append(layer(i, "post_attention_layernorm.weight"))
        fc1.append(torch.cat([layer(i, "mlp.gate_proj.weight"), layer(i, "mlp.up_proj.weight")]))
        fc2.append(layer(i, "mlp.down_proj.weight"))
    L = "decoder.layers."
    return {
        "embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],  # 1000 rows: no padding
        L + "self_attention.linear_qkv.weight": torch.stack(qkv),
        L + "self_attention.linear_qkv.layer_norm_weight": torch.stack(ln1),
        L + "self_attention.linear_proj.weight": torch.stack(proj),
        L + "mlp.linear_fc1.layer_norm_weight": torch.stack(ln2),
        L + "mlp.linear_fc1.weight": torch.stack(fc1),
        L + "mlp.linear_fc2.weight": torch.stack(fc2),
        "decoder.final_layernorm.weight": hf["model.norm.weight"],
        "output_layer.weight": hf["lm_head.weight"],
    }


def _write_dist(tensors: dict, prefix: str, out: Path):
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from megatron_prune.runtime import init_distributed

    init_distributed(1, 1)
    out.mkdir(parents=True)
    state = {prefix + k: ShardedTensor.from_rank_offsets(prefix + k, v.contiguous()) for k, v in tensors.items()}
    dist_checkpointing.save(state, str(out))
    return True


def _llama_config(hf_dir: Path) -> dict:
    c = json.loads((hf_dir / "config.json").read_text())
    return {  # TransformerConfig / NeMo LlamaConfig field names, as NeMo's HF importer fills them
        "num_layers": c["num_hidden_layers"], "hidden_size": c["hidden_size"],
        "ffn_hidden_size": c["intermediate_size"], "num_attention_heads": c["num_attention_heads"],
        "num_query_groups": c["num_key_value_heads"], "kv_channels": None,
        "seq_length": c["max_position_embeddings"], "rotary_base": 10000.0,
        "normalization": "RMSNorm", "layernorm_epsilon": c["rms_norm_eps"],
        "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False},
        "gated_linear_unit": True, "add_bias_linear": False, "position_embedding_type": "rope",
        "rotary_percent": 1.0, "share_embeddings_and_output_weights": False,
        "make_vocab_size_divisible_by": 8, "num_moe_experts": None,
        "params_dtype": {"_target_": "torch.bfloat16", "_call_": False},
    }


def build_nemo2(hf_dir: Path, root: Path, **config_changes) -> Path:
    ckpt = root / "nemo2"
    run_ranks(_write_dist, 1, _megatron_tensors_from_hf(hf_dir), "module.", ckpt / "weights")
    cfg = {"_target_": "nemo.collections.llm.gpt.model.llama.LlamaConfig", **_llama_config(hf_dir), **config_changes}
    model = {"_target_": "nemo.collections.llm.gpt.model.llama.LlamaModel", "config": cfg,
             "tokenizer": {"_target_": "nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer",
                           "pretrained_model_name": "nemo_tokenizer"}}
    (ckpt / "context").mkdir()
    (ckpt / "context/model.yaml").write_text(yaml.safe_dump(model))
    (ckpt / "context/io.json").write_text("{}")  # NeMo's fiddle graph; we never read it
    tiny_tokenizer(ckpt / "context/nemo_tokenizer")
    return ckpt


@pytest.fixture(scope="module")
def hand_nemo2(hf_dir, tmp_path_factory):
    return build_nemo2(hf_dir, tmp_path_factory.mktemp("hand"))


@pytest.fixture(scope="module")
def hand_bridge(hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("bridge") / "run"
    it = root / "iter_0000010"
    run_ranks(_write_dist, 1, _megatron_tensors_from_hf(hf_dir), "", it)
    model = {"_target_": "megatron.bridge.models.llama.llama_provider.LlamaModelProvider", **_llama_config(hf_dir),
             "vocab_size": VOCAB}
    (it / "run_config.yaml").write_text(yaml.safe_dump({"model": model, "checkpoint": {"save": str(root)}}))
    (root / "latest_checkpointed_iteration.txt").write_text("10")
    return root


@pytest.mark.parametrize("which,tp,pp", [("nemo2", 1, 1), ("nemo2", 2, 1), ("bridge", 1, 2)])
def test_hand_built_checkpoint_imports_correctly(which, tp, pp, hf_dir, hand_nemo2, hand_bridge):
    toks = tokens()
    ref = hf_logits(hf_dir, toks)
    src = hand_nemo2 if which == "nemo2" else hand_bridge
    for got in run_ranks(foreign_logits, tp * pp, src, tp, pp, toks):
        assert got.shape == ref.shape and (got - ref).abs().max() < TOL


def test_hand_built_nemo2_converts_to_megatron_with_tokenizer(hand_nemo2, hf_dir, tmp_path):
    run_ranks(_convert, 2, hand_nemo2, tmp_path / "mp", "megatron", 2, 1)
    meta = json.loads((tmp_path / "mp/megatron_prune.json").read_text())
    assert meta["arch"]["vocab_size"] == VOCAB and meta["provenance"]["source_format"] == "nemo2"
    assert (tmp_path / "mp/tokenizer/tokenizer.json").is_file()
    toks = tokens()
    assert (run_ranks(ours_logits, 1, tmp_path / "mp", toks)[0] - hf_logits(hf_dir, toks)).abs().max() < TOL


# ---------------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("case", ["no_weights", "no_model_yaml", "zarr", "moe", "qk_norm", "bad_yaml",
                                  "bridge_tracker", "not_gpt"])
def test_bad_layouts_give_clear_errors(case, hand_nemo2, hand_bridge, tmp_path):
    from megatron_prune.checkpoint.nemo import NemoFormatError, read_foreign

    d = _copy(hand_nemo2, tmp_path / "c") if case != "bridge_tracker" else _copy(hand_bridge, tmp_path / "b")
    model_yaml = d / "context/model.yaml"

    def edit_config(**kw):
        m = yaml.safe_load(model_yaml.read_text())
        m["config"].update(kw)
        model_yaml.write_text(yaml.safe_dump(m))

    if case == "no_weights":
        import shutil

        shutil.rmtree(d / "weights")
        match = "weights/ is missing"
    elif case == "no_model_yaml":
        model_yaml.unlink()
        match = "model.yaml is missing.*io.json only"
    elif case == "zarr":
        (d / "weights/metadata.json").write_text(json.dumps({"sharded_backend": "zarr"}))
        match = "'zarr'.*only torch_dist"
    elif case == "moe":
        edit_config(num_moe_experts=8)
        match = "num_moe_experts=8 is not supported"
    elif case == "qk_norm":
        edit_config(qk_layernorm=True, normalization="LayerNorm")  # q/k norms are read as Qwen3's RMSNorms
        match = "normalization='LayerNorm' is not supported .RMSNorm with qk_layernorm"
    elif case == "bad_yaml":
        model_yaml.write_text("config: [unclosed")
        match = "not valid YAML"
    elif case == "bridge_tracker":
        (d / "latest_checkpointed_iteration.txt").write_text("20")
        match = "iter_0000020 does not exist"
    else:
        import shutil

        shutil.rmtree(d / "weights")
        run_ranks(_write_dist, 1, {"encoder.weight": torch.zeros(4, 4)}, "module.", d / "weights")
        match = "not the checkpoint of a GPT model"
    with pytest.raises(NemoFormatError, match=match):
        read_foreign(d)


def test_unknown_directory_is_rejected_by_convert(tmp_path):
    from megatron_prune.pipelines.convert import detect_source

    (tmp_path / "x").mkdir()
    (tmp_path / "x/model.pt").write_text("")
    with pytest.raises(ValueError, match="NeMo 2 checkpoint \\(context/ \\+ weights/\\)"):
        detect_source(tmp_path / "x")


# ---------------------------------------------------------------------------------------------------
# checkpoints as NeMo and Megatron-Bridge write them in training, with builder configs, old layouts, adapters
# ---------------------------------------------------------------------------------------------------
def _write_with_optimizer_state(tensors: dict, prefix: str, out: Path):
    """Weights plus the optimizer's copies of each, named by megatron's own optimizer serializer
    (``make_sharded_optimizer_tensor``: ``optimizer.state.<name>.<model key>``), as a training save writes them."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.optimizer import make_sharded_optimizer_tensor

    from megatron_prune.runtime import init_distributed

    init_distributed(1, 1)
    out.mkdir(parents=True)
    model = {prefix + k: ShardedTensor.from_rank_offsets(prefix + k, v.contiguous()) for k, v in tensors.items()}
    state = dict(model)
    for name in ("exp_avg", "exp_avg_sq", "fp32_param"):
        for k, sh in model.items():
            state[f"optimizer.state.{name}.{k}"] = make_sharded_optimizer_tensor(
                sh, torch.randn_like(sh.data), f"optimizer.state.{name}")
    dist_checkpointing.save(state, str(out))
    return sorted(state)


def test_training_checkpoints_with_optimizer_state_read(hf_dir, hand_nemo2, hand_bridge, tmp_path):
    import shutil

    toks = tokens()
    ref = hf_logits(hf_dir, toks)
    nemo = _copy(hand_nemo2, tmp_path / "nemo")
    shutil.rmtree(nemo / "weights")
    keys = run_ranks(_write_with_optimizer_state, 1, _megatron_tensors_from_hf(hf_dir), "module.", nemo / "weights")[0]
    assert sum(k.endswith("embedding.word_embeddings.weight") for k in keys) == 4  # the model's and 3 optimizer copies
    bridge = _copy(hand_bridge, tmp_path / "bridge")
    it = bridge / "iter_0000010"
    config = (it / "run_config.yaml").read_text()
    shutil.rmtree(it)
    run_ranks(_write_with_optimizer_state, 1, _megatron_tensors_from_hf(hf_dir), "", it)
    (it / "run_config.yaml").write_text(config)
    for src in (nemo, bridge):
        got = run_ranks(foreign_logits, 1, src, 1, 1, toks)[0]
        assert (got - ref).abs().max() < TOL, src


def _builder_run_config(hf_dir: Path, **gpt_fields) -> dict:
    """run_config.yaml's model section as Megatron-Bridge's builder configs write it (ModelConfig.as_dict: the
    GPTModelConfig fields, the TransformerConfig nested under ``transformer``, callables and private fields
    dropped, ``_builder_`` added), from a real megatron-core TransformerConfig."""
    import dataclasses

    from megatron.core.transformer.transformer_config import TransformerConfig

    c = json.loads((hf_dir / "config.json").read_text())
    tc = TransformerConfig(num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"],
                           ffn_hidden_size=c["intermediate_size"], num_attention_heads=c["num_attention_heads"],
                           num_query_groups=c["num_key_value_heads"], normalization="RMSNorm",
                           layernorm_epsilon=c["rms_norm_eps"], gated_linear_unit=True, add_bias_linear=False,
                           hidden_dropout=0.0, attention_dropout=0.0)
    transformer = {"_target_": "megatron.core.transformer.transformer_config.TransformerConfig"}
    for f in dataclasses.fields(tc):
        value = getattr(tc, f.name)
        if callable(value) or f.name.startswith("_"):
            continue
        transformer[f.name] = value if value is None or isinstance(value, (bool, int, float, str, list)) else str(value)
    return {"_target_": "megatron.training.models.gpt.GPTModelConfig", "transformer": transformer,
            "vocab_size": VOCAB, "make_vocab_size_divisible_by": 128, "seq_length": c["max_position_embeddings"],
            "share_embeddings_and_output_weights": False, "position_embedding_type": "rope", "rotary_percent": 1.0,
            "rotary_base": 10000, "rope_scaling": False, "rope_scaling_factor": 8.0,
            "seq_len_interpolation_factor": None, **gpt_fields,
            "_builder_": "megatron.training.models.gpt.GPTModelBuilder"}


def test_bridge_builder_style_run_config_reads(hf_dir, hand_bridge, tmp_path):
    bridge = _copy(hand_bridge, tmp_path / "bridge")
    (bridge / "iter_0000010/run_config.yaml").write_text(yaml.safe_dump({"model": _builder_run_config(hf_dir)}))
    toks = tokens()
    got = run_ranks(foreign_logits, 1, bridge, 1, 1, toks)[0]
    assert (got - hf_logits(hf_dir, toks)).abs().max() < TOL


def _to_megatron(hf, out):
    from megatron_prune.pipelines.convert import hf_to_megatron

    hf_to_megatron(hf, out)


def test_bridge_qwen2_is_recognised_by_its_biases(tmp_path):
    """A Bridge GPTModelProvider (no 'qwen2' in the class path) with qkv biases only is Qwen2, and exports so."""
    import shutil

    hf = make_hf_model(tmp_path / "qwen2", "qwen2", vocab_size=VOCAB)
    run_ranks(_to_megatron, 1, hf, tmp_path / "ours")
    it = tmp_path / "bridge" / "iter_0000001"
    it.mkdir(parents=True)
    for f in (tmp_path / "ours").iterdir():  # our dist files: the same unprefixed keys Bridge writes
        if f.is_file() and f.name != "megatron_prune.json":
            shutil.copy2(f, it / f.name)
    c = json.loads((hf / "config.json").read_text())
    model = {"_target_": "megatron.bridge.models.gpt_provider.GPTModelProvider", "num_layers": c["num_hidden_layers"],
             "hidden_size": c["hidden_size"], "ffn_hidden_size": c["intermediate_size"],
             "num_attention_heads": c["num_attention_heads"], "num_query_groups": c["num_key_value_heads"],
             "normalization": "RMSNorm", "layernorm_epsilon": c["rms_norm_eps"], "gated_linear_unit": True,
             "activation_func": {"_target_": "torch.nn.functional.silu", "_call_": False},
             "add_bias_linear": False, "add_qkv_bias": True, "position_embedding_type": "rope",
             "rotary_base": c.get("rope_theta", 10000.0), "share_embeddings_and_output_weights": False,
             "vocab_size": VOCAB, "seq_length": c["max_position_embeddings"]}
    (it / "run_config.yaml").write_text(yaml.safe_dump({"model": model}))
    from megatron_prune.checkpoint.nemo import read_foreign

    assert read_foreign(it.parent).arch.model_type == "qwen2"
    run_ranks(_convert, 1, it.parent, tmp_path / "hf_out", "hf")
    toks = tokens()
    assert (hf_logits(tmp_path / "hf_out", toks) - hf_logits(hf, toks)).abs().max() < TOL


@pytest.mark.parametrize("change,match", [
    ({"seq_len_interpolation_factor": 2.0}, "seq_len_interpolation_factor=2.0 is not supported"),
    ({"rotary_interleaved": True}, "rotary_interleaved=True is not supported"),
])
def test_rope_variants_we_cannot_compute_are_refused(hf_dir, tmp_path, change, match):
    from megatron_prune.checkpoint.nemo import NemoFormatError, read_foreign

    with pytest.raises(NemoFormatError, match=match):
        read_foreign(build_nemo2(hf_dir, tmp_path, **change))


def test_rope_scaling_follows_the_switch_not_the_class_name(hf_dir, hand_bridge, tmp_path):
    from megatron_prune.checkpoint.nemo import read_foreign

    bridge = _copy(hand_bridge, tmp_path / "bridge")
    run_config = bridge / "iter_0000010/run_config.yaml"
    model = yaml.safe_load(run_config.read_text())["model"]
    model["_target_"] = "megatron.bridge.models.llama.llama_provider.Llama31ModelProvider8B"
    for scaling, factor in ((False, None), (True, 8.0)):
        run_config.write_text(yaml.safe_dump({"model": {**model, "rope_scaling": scaling, "rope_scaling_factor": 8.0}}))
        assert read_foreign(bridge).arch.rope_scaling_factor == factor
    nemo31 = build_nemo2(hf_dir, tmp_path / "n", _target_="nemo.collections.llm.gpt.model.llama.Llama31Config8B",
                         scale_factor=16.0)  # NeMo's Llama31Config always scales, by scale_factor
    assert read_foreign(nemo31).arch.rope_scaling_factor == 16.0


def test_peft_adapter_checkpoint_is_named(hand_nemo2, tmp_path):
    from megatron_prune.checkpoint.nemo import NemoFormatError, read_foreign

    lora = _copy(hand_nemo2, tmp_path / "lora")
    (lora / "weights/adapter_metadata.json").write_text(json.dumps({"model_ckpt_path": "/ckpts/base"}))
    with pytest.raises(NemoFormatError, match=r"PEFT \(LoRA\) adapter checkpoint.*merge the adapter into /ckpts/base"):
        read_foreign(lora)


def test_old_nemo2_layout_without_weights_dir_reads(hf_dir, hand_nemo2, tmp_path):
    import shutil

    old = _copy(hand_nemo2, tmp_path / "old")
    for f in (old / "weights").iterdir():
        shutil.move(str(f), old / f.name)
    (old / "weights").rmdir()
    toks = tokens()
    assert (run_ranks(foreign_logits, 1, old, 1, 1, toks)[0] - hf_logits(hf_dir, toks)).abs().max() < TOL


def test_nemo_checkpoint_of_a_newer_megatron_gets_one_line(exported, tmp_path):
    """A NeMo 2 checkpoint as megatron-core 0.19 writes it (no common.pt, no common_backend): on 0.16 the
    message names the release; on 0.19 it loads."""
    import megatron.core

    _, nemo = exported
    newer = _copy(nemo, tmp_path / "newer")
    written_by_019 = not (nemo / "weights/common.pt").exists()
    if not written_by_019:
        (newer / "weights/common.pt").unlink()
        meta = json.loads((newer / "weights/metadata.json").read_text())
        (newer / "weights/metadata.json").write_text(
            json.dumps({k: v for k, v in meta.items() if not k.startswith("common_")}))
    if megatron.core.__version__ < "0.19":
        with pytest.raises(RuntimeError, match=r"written by megatron-core 0\.19 or later.*read it with megatron-core"):
            run_ranks(foreign_logits, 1, newer, 1, 1, tokens())
    else:
        assert run_ranks(foreign_logits, 1, nemo, 1, 1, tokens())[0].shape[-1] >= VOCAB
