"""Data-parallel plumbing of ``mpistyle train``: the MPI world, each rank's share of a global batch, and the
gradients as one flat buffer for one Allreduce a step (see :mod:`mpistyle.training.train` for the scheme)."""

from __future__ import annotations

import numpy as np
import torch


class Comm:
    """MPI world when mpi4py is importable (1 rank without mpiexec), else a single-rank stand-in."""

    def __init__(self) -> None:
        self._mpi = None
        self.comm = None
        self.rank, self.size = 0, 1
        try:
            from mpi4py import MPI
        except ImportError:  # pragma: no cover - mpi4py is an optional extra
            return
        self._mpi = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def allreduce_sum(self, buf: np.ndarray) -> np.ndarray:
        if self.size > 1:
            self.comm.Allreduce(self._mpi.IN_PLACE, buf, op=self._mpi.SUM)
        return buf

    def bcast_ok(self, ok: bool) -> bool:
        """True on every rank iff ``ok`` on every rank (lets all ranks fail together, no hang)."""
        if self.size == 1:
            return ok
        return bool(self.comm.allreduce(int(ok), op=self._mpi.MIN))

    def abort(self, code: int = 1) -> None:
        if self.size > 1:
            self.comm.Abort(code)


def rank_slice(global_n: int, rank: int, size: int) -> slice:
    """Contiguous share of a global batch (earlier ranks take the remainder)."""
    base, extra = divmod(global_n, size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def flat_grads(params: list[torch.nn.Parameter]) -> np.ndarray:
    return (
        torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
        )
        .cpu()
        .numpy()
    )


def set_grads(params: list[torch.nn.Parameter], flat: np.ndarray) -> None:
    t = torch.from_numpy(flat)
    off = 0
    for p in params:
        n = p.numel()
        p.grad = t[off : off + n].view(p.shape).to(device=p.device, dtype=p.dtype).clone()
        off += n
