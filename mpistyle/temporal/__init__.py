"""Temporal consistency: optical flow, the flow pool, the fusion kernels and the anchored fusion chains.

Imports run one way: ``flowpool``, ``kernels``, ``kernels_torch`` and ``chains`` build on ``flow``; ``chains``
(the recursion) builds on ``kernels`` (the per-frame math), which loads ``kernels_torch`` only on request;
nothing here imports ``chains``. Import names from the defining module (``mpistyle.temporal.chains`` for
``TemporalSettings``/``TemporalFuser``): this package re-exports nothing, so importing ``flow`` stays light.
"""
