"""mpistyle: seamless, flicker-free neural style transfer on video, across MPI ranks."""

__version__ = "0.4.0"
