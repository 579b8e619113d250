"""Frames in and out: video files through one ffmpeg binary, image sequences through OpenCV.

The data path, and the direction of the imports (each module imports only those above it):

* ``children``: ffmpeg child processes shielded from the stop signals mpistyle handles itself;
* ``ffmpeg``: the binary, its version check, command lines, shared error helpers;
* ``probe``: ``VideoInfo`` of a video file (exact frame count and rate, VFR to constant rate, size),
  ``snap_fps``, ``audio_codec``, ``output_size`` (the processing size);
* ``decode``: ``iter_video_frames``, a video file's frames streamed out of ffmpeg;
* ``atomic``: ``AtomicOutput``, the write-then-rename base of both writers;
* ``encode``: ``VideoEncoder`` (frames -> H.264/VP9 with the source's audio) and ``join_segments``;
* ``sequence``: image sequences (pattern or folder) in and out; it builds on ``atomic`` only, never on the
  video-file modules;
* ``media``: the dispatchers the rest of mpistyle uses, whatever the kind of input or output: ``probe``,
  ``iter_frames``, ``read_all``, ``check_output``, ``open_writer``.

Frames are numpy uint8 arrays (H, W, 3), RGB, C-contiguous, writable. Each module's docstring gives the
conventions it keeps (frame accounting, variable frame rate, colour, atomic outputs). This package
re-exports nothing: import from the defining module.
"""
