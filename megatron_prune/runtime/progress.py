"""Progress bars with ETA, shown by global rank 0 only."""

from __future__ import annotations

import sys
import weakref

from megatron_prune.runtime.distributed import is_rank0


class _Silent:
    def update(self, n=1):
        pass

    def set_postfix(self, *a, **k):
        pass

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def progress(total: int, desc: str, unit: str = "it"):
    """A tqdm bar (with rate and ETA) on rank 0; a silent stand-in elsewhere."""
    if not is_rank0():
        return _Silent()
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr, mininterval=1.0)
    _open_bars.add(bar)
    return bar


_open_bars: "weakref.WeakSet" = weakref.WeakSet()


def close_bars() -> None:
    """Close the bars a stop signal left open, so that the stop message is the last line on the terminal (an open bar
    redraws itself when it is garbage-collected at exit)."""
    for bar in list(_open_bars):
        bar.close()
