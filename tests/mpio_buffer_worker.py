"""Run under Debian's mpiexec.mpich with the parallel-h5py environment (tests/test_parallel_hdf5.py).

Rank 0 creates an mpio-layout buffer; every rank opens it together, writes its own frames and done
flags with independent I/O (MpioWriter), and commits; after the collective close, rank 0 reopens it
with FrameBuffer (serial) and checks every frame and flag. argv: PATH [STOP_AT]: with STOP_AT, rank 1
stops committing after that many frames (a resume must see exactly those).

The ranks' writes interleave in a fixed order on any machine: a token passed round the ranks lets each
write (and commit) its next frame in turn, rank 0's first, rank 1's first, ..., rank 0's second, ... The
token is a point-to-point message, never an HDF5 call, so every write stays independent I/O while
another rank's open handle has written to the file since its last write.
"""

from __future__ import annotations

import sys

import numpy as np
from mpi4py import MPI

from mpistyle.buffer import FrameBuffer, MpioWriter, open_parallel

N, H, W = 30, 24, 32
SETTINGS = {"input": "x", "model": "y"}


def frame(t: int) -> np.ndarray:
    return (np.full((H, W, 3), t * 7 % 251, np.uint8) + np.arange(W, dtype=np.uint8)[None, :, None])


def main() -> None:
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    path = sys.argv[1]
    stop_at = int(sys.argv[2]) if len(sys.argv) > 2 else None
    if rank == 0:
        FrameBuffer.open(path, N, H, W, SETTINGS, layout="mpio").close()
    comm.Barrier()
    handle = open_parallel(path, comm)
    writer = MpioWriter(handle, path)
    mine = [t for t in range(N) if t * size // N == rank]  # contiguous partitions
    rounds = max(len([t for t in range(N) if t * size // N == r]) for r in range(size))
    stopped = False
    for i in range(rounds):
        if i or rank:  # the token: the previous rank has written its frame of this round (or rank size-1 its last)
            comm.recv(source=(rank - 1) % size, tag=7)
        if i < len(mine) and not stopped:
            t = mine[i]
            writer.write(t, frame(t))
            if stop_at is not None and rank == 1 and i == stop_at:
                stopped = True  # written but never committed: must not count as done
            elif i % 3 == 2 or i == len(mine) - 1:
                writer.commit()
        if i < rounds - 1 or rank < size - 1:
            comm.send(None, dest=(rank + 1) % size, tag=7)
    writer.close()
    handle.close()
    if rank == 0:
        buf = FrameBuffer.open(path, N, H, W, SETTINGS)
        assert buf.layout == "mpio"
        expected = np.ones(N, bool)
        if stop_at is not None:
            ones = [t for t in range(N) if t * size // N == 1]
            expected[ones[stop_at // 3 * 3:]] = False  # rank 1 committed in threes
        assert buf.done.tolist() == expected.tolist(), buf.done.tolist()
        for t in np.flatnonzero(expected):
            assert np.array_equal(buf.read(int(t)), frame(int(t))), t
        buf.close()
        print("mpio buffer ok", int(expected.sum()))


if __name__ == "__main__":
    main()
