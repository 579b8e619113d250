"""Training a style model: content (images, video frames, flow pairs) -> losses (VGG-19, ``mpistyle quality``)
-> train (``mpistyle train``, data-parallel over MPI). Imports run in that order, never back."""
