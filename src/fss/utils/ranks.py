"""Which DDP process this is, as Lightning knows it.

Under ``trainer.strategy=ddp`` without a cluster launcher, Lightning starts ranks > 0 by running
the same command again (``python run.py ...``, with ``hydra.run.dir`` pinned to rank 0's run
directory), so every rank runs the whole job. Lightning's ``rank_zero_only.rank`` is this
process's global rank: read from the launcher's environment (``RANK``, ``LOCAL_RANK``,
``SLURM_PROCID``) when Lightning is imported, and set by the strategy once the processes exist.
"""

from __future__ import annotations


def global_rank() -> int:
    """0 in a single process and on rank 0; the process's global rank under DDP."""
    from lightning.pytorch.utilities import rank_zero_only

    return int(getattr(rank_zero_only, "rank", 0) or 0)


def is_global_zero() -> bool:
    """Whether this process writes the job's files and prints its summary."""
    return global_rank() == 0
