"""Several processes over one batch: `torchrun` or `accelerate launch` start N copies of a command, each with a rank.

Inference needs no gradients to average, only a fair split and one merged answer: every process plans the same
sorted file list, takes every N-th item from its rank on, and the per-rank results are gathered back into plan
order, so N processes write exactly the files (and the report) one process would.  The launchers describe the
group in the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); a gloo group carries the small Python
objects to gather on CPUs and GPUs alike.  Without a launcher everything here is a no-op for one process.

PyTorch is imported by the functions that talk to the group, not with the module: the command line asks which rank
it is (`launched_ranks`) while it checks options, before PyTorch loads.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the group: rank `rank` of `world`, `local_rank` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """Every `world`-th item from `rank` on: an even split of a sorted list, identical on every process."""
        return list(items[self.rank :: self.world])


def launched_ranks() -> Ranks:
    """What the launcher put in the environment (one process when it put nothing)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    return Ranks(rank, world, int(os.environ.get("LOCAL_RANK", str(rank))))


def current() -> Ranks:
    """The ranks of the initialised process group, else one process."""
    import torch.distributed

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Ranks(torch.distributed.get_rank(), torch.distributed.get_world_size(), launched_ranks().local_rank)
    return Ranks()


@contextmanager
def process_group() -> Iterator[Ranks]:
    """Join the launcher's group for the duration of a command (nothing to join for one process)."""
    import torch.distributed

    ranks = launched_ranks()
    if ranks.world == 1 or torch.distributed.is_initialized():
        yield current()
        return
    torch.distributed.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world)
    try:
        yield ranks
        # No rank tears its connections down while another still works (rank 0 writes the merged report after the
        # last gather).  Not on errors: a failing rank must not wait for the others.  (The rare abort at exit that
        # this barrier was first meant to stop came from the interpreter's teardown: see exit_launched_process.)
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def all_gather(value: Any, ranks: Ranks) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if ranks.world == 1:
        return [value]
    import torch.distributed

    gathered: list[Any] = [None] * ranks.world
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def barrier(ranks: Ranks) -> None:
    """Wait until every rank got here (e.g. all have planned before any writes)."""
    if ranks.world > 1:
        import torch.distributed

        torch.distributed.barrier()


def exit_launched_process(code: int) -> NoReturn:
    """End one process of a multi-process launch once its command is done: flush what it printed and leave without
    the interpreter's teardown.  Why: after the group was destroyed and every file and the report were written,
    PyTorch's C++ teardown at interpreter exit aborted a rank now and then ("terminate called without an active
    exception", SIGABRT, no Python frame left: ~3 % of 2-process CPU runs on the project's machine), and the
    launcher then reports the whole run as failed."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def rank_device(device: str | torch.device, ranks: Ranks) -> str | torch.device:
    """`auto` with several processes on a machine with GPUs: one GPU per process (by local rank)."""
    import torch

    if str(device) == "auto" and ranks.world > 1 and torch.cuda.is_available():
        return f"cuda:{ranks.local_rank % torch.cuda.device_count()}"
    return device


__all__ = [
    "Ranks",
    "all_gather",
    "barrier",
    "current",
    "exit_launched_process",
    "launched_ranks",
    "process_group",
    "rank_device",
]
