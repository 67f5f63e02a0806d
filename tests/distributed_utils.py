"""Multi-rank test runs: the package's own local launcher (separate gloo processes, like torchrun)."""

from megatron_prune.runtime.spawn import run_ranks

__all__ = ["run_ranks"]
