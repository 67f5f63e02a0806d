"""`megatron-prune convert`: GGUF / Hugging Face / Megatron checkpoints into each other.

The source kind is recognised from the path: a ``.gguf`` file, a Hugging Face directory (``config.json``)
or one of our Megatron checkpoints (``megatron_prune.json``).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch

from megatron_prune import inputs
from megatron_prune.arch import ArchError, ModelArch
from megatron_prune.checkpoint import load_model, save_checkpoint
from megatron_prune.checkpoint.hf import export_model_to_hf, gguf_to_hf, load_hf_into_model, read_hf_config
from megatron_prune.checkpoint.megatron import METADATA_FILE
from megatron_prune.checkpoint.outputs import check_output_path
from megatron_prune.model import build_model
from megatron_prune.runtime import barrier, init_distributed, is_rank0, log0
from megatron_prune.runtime.stop import stop_on_signals


def detect_source(path: str | Path) -> str:
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return "gguf"
    if (p / METADATA_FILE).is_file():
        return "megatron"
    if (p / "config.json").is_file():
        return "hf"
    from megatron_prune.checkpoint.nemo import detect_layout

    if p.is_dir() and detect_layout(p):
        return detect_layout(p)  # "nemo2" or "bridge"
    if not p.exists():
        raise inputs.InputError(f"SRC {p} does not exist; pass a .gguf file, a Hugging Face directory, a "
                                f"megatron-prune checkpoint or a NeMo 2 / Megatron-Bridge checkpoint")
    raise inputs.InputError(f"SRC: cannot tell what {p} is: expected a .gguf file, a Hugging Face directory "
                            f"(config.json), a megatron-prune checkpoint ({METADATA_FILE}), a NeMo 2 checkpoint "
                            f"(context/ + weights/) or a Megatron-Bridge checkpoint (iter_XXXXXXX/ with "
                            f"run_config.yaml)")


def hf_to_megatron(hf_dir: str | Path, out: str | Path, tp: int = 1, pp: int = 1, dtype: torch.dtype = torch.float32,
                   overwrite: bool = False, provenance: Optional[dict] = None, ep: int = 1) -> Path:
    """Each rank builds its TP/PP(/EP) shard, reads only its slices of the safetensors, and saves."""
    init_distributed(tp, pp, ep=ep)
    arch = ModelArch.from_hf_config(read_hf_config(hf_dir))
    inputs.pipeline_split(arch, pp, "SRC")  # a GGUF's shape is known only now; the stage-size flags size this model
    log0(f"converting {hf_dir}: {arch.describe()} -> {out} at TP={tp} PP={pp}" + (f" EP={ep}" if ep > 1 else ""))
    model = build_model(arch, dtype=dtype)
    load_hf_into_model(model, arch, hf_dir)
    prov = {"source": str(Path(hf_dir).absolute()), "source_format": "huggingface"}
    prov.update(provenance or {})
    return save_checkpoint(model, arch, out, tokenizer_src=hf_dir, provenance=prov, overwrite=overwrite)


def megatron_to_hf(ckpt: str | Path, out: str | Path, dtype: Optional[torch.dtype] = None,
                   overwrite: bool = False) -> Path:
    """Load at TP=1 with one pipeline stage per process and write a transformers-loadable directory."""
    import torch.distributed as dist

    from megatron_prune.checkpoint import tokenizer_dir

    out = inputs.free_output(out, overwrite=overwrite)
    world = dist.get_world_size() if dist.is_initialized() else _launch_world_size()
    init_distributed(tp=1, pp=world)
    model, meta = load_model(ckpt, dtype=dtype)
    log0(f"exporting {ckpt} ({meta.arch.describe()}) to Hugging Face {out}")
    return export_model_to_hf(model, meta.arch, out, tokenizer_src=tokenizer_dir(ckpt), dtype=dtype)


def _launch_world_size() -> int:
    from megatron_prune.runtime.distributed import detect_launch_env

    return detect_launch_env().world_size


def check_convert(src, out, to: Optional[str], tp: int, pp: int, dtype: str, overwrite: bool,
                  ep: int = 1) -> tuple[str, str]:
    """Every input of `convert`, before any process group or weight; returns (source kind, target format)."""
    inputs.layout(tp, pp)
    inputs.positive("--ep", ep)
    kind = detect_source(src)
    to = to or ("hf" if kind == "megatron" else "megatron")
    if to not in ("megatron", "hf", "nemo"):
        raise inputs.InputError(f"--to must be 'megatron', 'hf' or 'nemo', got {to!r}")
    if dtype != "auto" and not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise inputs.InputError(f"--dtype {dtype!r} is not a torch dtype; use auto, float32, bfloat16 or float16")
    if kind == to:
        what = "a Hugging Face directory" if kind == "hf" else "a Megatron checkpoint (it loads at any TP/PP as it is)"
        raise inputs.InputError(f"SRC {src} is already {what}; drop --to {to} to convert it to the other format")
    if kind == "megatron":
        inputs.checkpoint(src, "SRC")
    if to == "nemo" and kind in ("nemo2", "bridge"):
        raise inputs.InputError(f"SRC {src} is already a NeMo 2 / Megatron-Bridge checkpoint; convert it with --to "
                                f"megatron or --to hf")
    if ep != 1 and not (kind == "hf" and to == "megatron"):
        raise inputs.InputError("--ep sets the expert-parallel layout of an import from Hugging Face (a checkpoint "
                                "loads at any EP); drop --ep")
    if to == "hf" and (tp != 1 or pp != 1):
        raise inputs.InputError(
            "--tp/--pp set the layout of an import; an export to Hugging Face loads the checkpoint at TP=1 with one "
            "pipeline stage per process (to split a big model over N stages, launch N processes: torchrun "
            "--nproc-per-node N). Drop --tp/--pp")
    if to in ("megatron", "nemo") and kind == "hf":
        try:
            arch = ModelArch.from_hf_config(read_hf_config(src))
            arch.check_parallel(tp, pp, ep)
        except (ArchError, ValueError) as e:
            raise inputs.InputError(f"SRC {src}: {e}") from e
        inputs.pipeline_split(arch, pp, f"SRC {src}")
    inputs.output(out, "OUT", overwrite)
    return kind, to


@stop_on_signals(immediate=True)  # a conversion has nothing to resume: a stop signal ends it, nothing is written
def convert(src: str | Path, out: str | Path, to: Optional[str] = None, tp: int = 1, pp: int = 1,
            dtype: str = "auto", overwrite: bool = False, ep: int = 1) -> Path:
    """Convert ``src`` (gguf, hf or megatron) to ``to`` ("megatron" or "hf").

    ``dtype="auto"``: float32 when importing, the checkpoint's own dtype when exporting. ``ep``: the
    expert-parallel size of an import of a Mixture-of-Experts model.
    """
    kind, to = check_convert(src, out, to, tp, pp, dtype, overwrite, ep)
    check_output_path(out, {"source": src})
    torch_dtype = None if dtype == "auto" else getattr(torch, dtype)
    if kind in ("nemo2", "bridge") or to == "nemo":
        from megatron_prune.checkpoint.nemo import convert_nemo

        return convert_nemo(src, kind, out, to, tp, pp, torch_dtype, overwrite)
    import_dtype = torch_dtype or torch.float32
    out = Path(out)
    if kind == "gguf":
        if to == "hf":
            inputs.free_output(out, overwrite=overwrite)
            return gguf_to_hf(src, out)
        staging = out.parent / f".{out.name}.from-gguf"
        init_distributed(tp, pp)
        if is_rank0():
            gguf_to_hf(src, staging)
        barrier()
        try:
            return hf_to_megatron(staging, out, tp, pp, import_dtype, overwrite, {"source": str(Path(src).absolute()),
                                                                               "source_format": "gguf"})
        finally:
            barrier()
            if is_rank0():
                shutil.rmtree(staging, ignore_errors=True)
    if kind == "hf":
        return hf_to_megatron(src, out, tp, pp, import_dtype, overwrite, ep=ep)
    return megatron_to_hf(src, out, dtype=torch_dtype, overwrite=overwrite)
