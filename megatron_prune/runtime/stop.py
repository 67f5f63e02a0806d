"""Stop a long run cleanly on SIGTERM, SIGINT or SIGUSR1 (Slurm preemption and time limits, Ctrl-C).

A signal only sets a flag; the training loop asks :meth:`StopSignals.agreed` once per step (an all-reduce, so
every rank stops at the same step even when the signal reached only some of them), saves, and raises
:class:`StopRequested`; the command line turns that into exit code :data:`EXIT_STOPPED`. A second signal
acts as if no handler were installed (Ctrl-C twice kills at once).

``selfdistill`` asks the same question after every chunk it writes. For work with no resumable state
(``importance``, ``generate``, ``convert``, ``prune``, ``merge``, ``data``, ``specdec``), ``immediate=True`` raises
StopRequested from the handler itself: the pass ends at once, and the writers remove what they had half written.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by a signal after saving; run the same command again to continue
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
STOP_MARKER_ENV = "MP_STOP_MARKER"  # set by launch/slurm/megatron_prune.sbatch


def write_stop_marker(message: str) -> None:
    """Leave a file at $MP_STOP_MARKER saying the run stopped cleanly (rank 0, after the save).

    A launcher cannot rely on the exit code alone: ``srun --kill-on-bad-exit`` takes a first rank's exit 75 as a
    failure and kills the ranks still on their way out, so srun may report their signal instead of 75.
    """
    path = os.environ.get(STOP_MARKER_ENV)
    if path:
        Path(path).write_text(message + "\n")


class StopRequested(BaseException):
    """The run stopped on a signal; ``saved`` is the checkpoint to continue from (None: nothing was saved);
    ``at`` says where the run was (default: "at step N").

    A BaseException, like KeyboardInterrupt: raised from a signal handler it can surface inside any library code,
    and libraries' ``except Exception`` must neither swallow it nor re-wrap it (megatron's ``build_module``
    re-raises ``type(e)(f"{e} when instantiating ...")``, which made "stopped by stopped by ..." messages).
    """

    def __init__(self, reason: str, saved: Optional[Path] = None, step: Optional[int] = None,
                 at: Optional[str] = None):
        self.reason, self.saved, self.step = reason, saved, step
        at = f" {at}" if at else f" at step {step}" if step is not None else ""
        then = (f"; saved to {saved}; run the same command again to continue from there" if saved is not None
                else "; nothing was written; run the same command again to start over")
        super().__init__(f"stopped by {reason}{at}{then}")


class StopSignals:
    def __init__(self):
        self.received: Optional[str] = None

    def agreed(self) -> Optional[str]:
        """Collective over all ranks: the signal's name if any rank received one, else None."""
        from megatron_prune.runtime.distributed import any_rank

        if any_rank(self.received is not None):
            return self.received or "a signal on another rank"
        return None


@contextmanager
def stop_on_signals(immediate: bool = False) -> Iterator[StopSignals]:
    """Catch SIGTERM/SIGINT/SIGUSR1 inside the ``with`` block (main thread only; elsewhere a no-op)."""
    state = StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

    def restore():
        for s, handler in previous.items():
            signal.signal(s, handler)

    def handler(signum, _frame):
        state.received = signal.Signals(signum).name
        restore()  # a second signal is not caught
        if immediate:
            raise StopRequested(state.received)

    for s in STOP_SIGNALS:
        signal.signal(s, handler)
    try:
        yield state
    finally:
        restore()
