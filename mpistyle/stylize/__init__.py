"""The stylize run across MPI ranks, one module per stage, in the order the data flows:

- :mod:`.options`  what the run is asked to do and what rank 0 decides (pure);
- :mod:`.setup`    collective setup: probe and validate on rank 0, load the model everywhere, open the buffer;
- :mod:`.scatter`  source frames into each rank's disk spool: every rank decodes its own with a seek
                   (``--decode auto`` on several ranks where the input seeks), or rank 0 decodes once and
                   streams each rank its frames (``rank0``: one rank, the dynamic schedule, inputs that
                   do not seek);
- :mod:`.worker`   each rank: network, optical flow, temporal fusion, halo exchange, send finished frames;
- :mod:`.segments` each rank encodes its blocks of the output (``--encode auto`` for H.264 outputs, on any
                   rank count), rank 0 joins them;
- :mod:`.gather`   rank 0's sink: HDF5 buffer, commits, progress, and the in-order encoder of
                   ``--encode rank0``;
- :mod:`.shutdown` one orderly end for success, signals and failures, and the verdict;
- :mod:`.run`      ties the stages together (:func:`run_stylize`);
- :mod:`.comm`     tags, stop propagation and helper threads shared by the stages.
"""

from .options import StylizeOptions
from .run import run_stylize
from .shutdown import write_json

__all__ = ["StylizeOptions", "run_stylize", "write_json"]
