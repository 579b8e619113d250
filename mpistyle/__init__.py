"""mpistyle: seamless, flicker-free neural style transfer on video, across MPI ranks."""

__version__ = "0.5.0.dev0"  # 0.5 in progress (CHANGELOG: Unreleased)
