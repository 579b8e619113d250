"""The stylize run across MPI ranks, one module per stage, in the order the data flows:

- :mod:`.options`  what the run is asked to do and what rank 0 decides (pure);
- :mod:`.setup`    collective setup: probe and validate on rank 0, load the model everywhere, open the buffer;
- :mod:`.scatter`  rank 0 decodes once and streams each rank its frames into a disk spool;
- :mod:`.worker`   each rank: network, optical flow, temporal fusion, halo exchange, send finished frames;
- :mod:`.gather`   rank 0's sink: HDF5 buffer, commits, in-order encoding, progress;
- :mod:`.shutdown` one orderly end for success, signals and failures, and the verdict;
- :mod:`.run`      ties the stages together (:func:`run_stylize`);
- :mod:`.comm`     tags, stop propagation and helper threads shared by the stages.
"""

from .options import StylizeOptions
from .run import run_stylize
from .shutdown import write_json

__all__ = ["StylizeOptions", "run_stylize", "write_json"]
