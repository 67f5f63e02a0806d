"""Pipeline stages of unequal depth: how many decoder layers each pipeline stage holds.

megatron-core splits the layers evenly over the pipeline unless TransformerConfig's
``num_layers_in_first_pipeline_stage`` / ``num_layers_in_last_pipeline_stage`` are set; the stages between
the first and the last then hold equal numbers. Every split here therefore has megatron's form
``[first, m, ..., m, last]``, and :func:`megatron_kwargs` turns it into those two config fields.

:func:`stage_layers` is the pure rule. The rest is this process's choice for the command it runs (like
megatron's ``parallel_state``): the user's override (``--decoder-first-pipeline-num-layers`` /
``--decoder-last-pipeline-num-layers``, :func:`request_split`) applies to the command's main model, the one it
writes, trains or reads (:func:`bind_split`, called by the input checks); every other model on the same pipeline
(prune's source, the distillation teacher, specdec's draft, eval's KL teacher) uses the same split when it has the
same depth, and the automatic split of its own depth otherwise. :func:`split_for` answers for any model.
"""

from __future__ import annotations

import functools
from typing import Optional

FIRST_FLAG = "--decoder-first-pipeline-num-layers"
LAST_FLAG = "--decoder-last-pipeline-num-layers"


class StageError(ValueError):
    """A split of the layers over the pipeline that megatron cannot build."""


def check_virtual_stages(pp: int, vpp: int, pp_name: str = "--pp", vpp_name: str = "--vpp") -> None:
    """Virtual stages (``vpp`` > 1) interleave a pipeline of several ranks: ``pp`` >= 2."""
    if vpp > 1 and pp < 2:
        raise StageError(f"{vpp_name} {vpp} needs {pp_name} >= 2: virtual stages interleave a pipeline of several "
                         f"ranks; set --pp 2 or more, or drop --vpp")


def _check_vpp(stages: list[int], vpp: int, why: str) -> list[int]:
    bad = [s for s in stages if s % vpp]
    if vpp > 1 and bad:
        raise StageError(f"{why} gives stages of {stages} layers, and with --vpp {vpp} every stage needs a multiple "
                         f"of {vpp} layers (megatron splits each stage into {vpp} equal virtual stages)")
    return stages


def stage_layers(num_layers: int, pp: int, first: Optional[int] = None, last: Optional[int] = None,
                 vpp: int = 1) -> list[int]:
    """Decoder layers per pipeline stage, first stage first; they sum to ``num_layers``.

    Without ``first``/``last`` (the automatic split): the smallest possible largest stage (the pipeline runs at
    the pace of its slowest stage), so an even split whenever ``pp`` divides the layers. Ties are broken, in
    this order, by (1) the fullest middle stages, so that the first and the last stage, which also hold the
    embedding and the output layer with the loss, get the fewer layers; (2) first and last as equal as
    possible; (3) the last stage the smaller of the two (the output layer and the loss over the vocabulary
    cost more than the embedding lookup). Examples: 26 over 4 -> [6, 7, 7, 6]; 25 over 2 -> [13, 12];
    5 over 4 -> [2, 1, 1, 1].

    ``first`` and/or ``last`` fix the first/last stage as Megatron-LM's flags of the same names do; the other
    stages then split the rest evenly (an error when they cannot). ``vpp`` > 1 (virtual stages): every stage
    holds a multiple of ``vpp`` layers, as megatron requires; the automatic split keeps to that. Raises
    StageError (a ValueError) for what megatron cannot build.
    """
    return list(_stage_layers(num_layers, pp, first, last, vpp))


@functools.lru_cache(maxsize=None)
def _stage_layers(num_layers: int, pp: int, first: Optional[int], last: Optional[int], vpp: int) -> tuple:
    if pp < 1 or num_layers < 1 or vpp < 1:
        raise StageError(f"num_layers ({num_layers}), PP ({pp}) and VPP ({vpp}) must be positive")
    if pp > num_layers:
        raise StageError(f"PP={pp} is more than the {num_layers} layers: every pipeline stage needs at least one "
                         f"layer; choose --pp <= {num_layers}")
    if first is not None or last is not None:
        return tuple(_check_vpp(_fixed(num_layers, pp, first, last), vpp, _describe(first, last)))
    if pp == 1:
        return tuple(_check_vpp([num_layers], vpp, "one pipeline stage"))
    best = None
    middles = range(1, num_layers + 1) if pp > 2 else [0]
    for m in middles:
        if m % vpp:
            continue
        ends = num_layers - (pp - 2) * m
        for f in range(vpp, ends, vpp):  # first and last both >= 1 (>= vpp)
            lst = ends - f
            if lst < 1 or lst % vpp:
                continue
            key = (max(f, m, lst), -m, abs(f - lst), lst)
            if best is None or key < best[0]:
                best = (key, [f] + [m] * (pp - 2) + [lst])
    if best is None:
        raise StageError(f"{num_layers} layers cannot be split over PP={pp} stages of multiples of VPP={vpp} layers "
                         f"(megatron splits each stage into {vpp} equal virtual stages); choose another --vpp or --pp")
    return tuple(best[1])


def _describe(first, last) -> str:
    parts = [f"{flag} {v}" for flag, v in ((FIRST_FLAG, first), (LAST_FLAG, last)) if v is not None]
    return " with ".join(parts)


def _fixed(num_layers: int, pp: int, first: Optional[int], last: Optional[int]) -> list[int]:
    """Megatron's rule for a given first and/or last stage: the other stages split the rest evenly."""
    what = _describe(first, last)
    if pp < 2:
        raise StageError(f"{what} needs --pp >= 2 (it sizes the first/last of several pipeline stages)")
    for flag, v in ((FIRST_FLAG, first), (LAST_FLAG, last)):
        if v is not None and v < 1:
            raise StageError(f"{flag} must be at least 1, got {v}")
    rest = num_layers - (first or 0) - (last or 0)
    others = pp - (first is not None) - (last is not None)
    if others == 0:
        if rest:
            raise StageError(f"{what} is {first + last} layers over the {pp} stages, but the model has {num_layers}: "
                             f"give two numbers that sum to {num_layers}, or only one of the two flags")
        return [first, last]
    if rest < others or rest % others:
        given = [flag for flag, v in ((FIRST_FLAG, first), (LAST_FLAG, last)) if v is not None]
        if len(given) == 1:
            fits = ", ".join(str(v) for v in _fitting(num_layers, pp)[:8])
            hint = f"values of {given[0]} that fit: {fits or 'none'}"
        else:
            hint = f"choose two that leave a positive multiple of {others} layers"
        raise StageError(f"{what} leaves {rest} of the {num_layers} layers for the other {others} pipeline stage"
                         f"{'s' if others > 1 else ''}, which must hold an equal number of at least 1 each; {hint}")
    m = rest // others
    return [m if first is None else first] + [m] * (pp - 2) + [m if last is None else last]


def _fitting(num_layers: int, pp: int) -> list[int]:
    """Values of a lone first (or last) stage that leave an equal share for the other ``pp - 1`` stages."""
    return [v for v in range(1, num_layers) if (num_layers - v) >= pp - 1 and (num_layers - v) % (pp - 1) == 0]


def megatron_kwargs(stages: list[int]) -> dict:
    """TransformerConfig fields for this split: none when it is even.

    At PP=2 only the first stage is given (megatron derives the last): megatron-core 0.16's interleaved layer
    offset divides by the number of middle stages, which is 0 when both are set at PP=2.
    """
    if len(set(stages)) <= 1:
        return {}
    if len(stages) == 2:
        return {"num_layers_in_first_pipeline_stage": stages[0]}
    m = stages[1]
    out = {}
    if stages[0] != m:
        out["num_layers_in_first_pipeline_stage"] = stages[0]
    if stages[-1] != m:
        out["num_layers_in_last_pipeline_stage"] = stages[-1]
    return out


# ---- this process's choice for the running command ------------------------------------------------------
_requested: tuple[Optional[int], Optional[int]] = (None, None)
_bound: dict[tuple[int, int], tuple[Optional[int], Optional[int]]] = {}


def request_split(first: Optional[int] = None, last: Optional[int] = None) -> None:
    """The user's ``--decoder-first/last-pipeline-num-layers`` for this command (None, None: automatic)."""
    global _requested
    _requested = (first, last)
    _bound.clear()


def requested_split() -> tuple[Optional[int], Optional[int]]:
    return _requested


def bind_split(num_layers: int, pp: int, vpp: int = 1) -> list[int]:
    """The split of the command's main model (``num_layers`` deep at ``pp``): the requested override, which
    from now on applies to every model of this depth at this PP; StageError when it does not fit."""
    first, last = _requested
    stages = stage_layers(num_layers, pp, first, last, vpp)
    if first is not None or last is not None:
        _bound[(num_layers, pp)] = (first, last)
    return stages


def split_for(num_layers: int, pp: int, vpp: int = 1) -> list[int]:
    """Layers per stage of a model ``num_layers`` deep at ``pp`` (x ``vpp``): the override bound to this depth,
    else the automatic split."""
    first, last = _bound.get((num_layers, pp), (None, None))
    return stage_layers(num_layers, pp, first, last, vpp)


def current_split(num_layers: int) -> list[int]:
    """:func:`split_for` at megatron's current pipeline (and virtual pipeline) size."""
    from megatron.core import parallel_state as ps

    pp = ps.get_pipeline_model_parallel_world_size()
    vpp = ps.get_virtual_pipeline_model_parallel_world_size() or 1
    return split_for(num_layers, pp, vpp)
