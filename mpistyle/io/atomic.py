"""Outputs written under temporary names and moved into place only when complete.

The base of both writers (:class:`mpistyle.io.encode.VideoEncoder`,
:class:`mpistyle.io.sequence.SequenceWriter`); it imports nothing of mpistyle, so either can build on it.
"""

from __future__ import annotations

from types import TracebackType


class AtomicOutput:
    """An output written under temporary names and moved into place only when complete.

    Subclasses write, then implement ``_finish`` (complete and rename; raise on failure) and ``abort``
    (remove the temporaries, leave an earlier result as it was). Use as a context manager, or call
    ``close``/``abort``.
    """

    _done: bool = False

    def close(self) -> None:
        """Finish and move the result into place; on failure remove everything and raise."""
        if self._done:
            return
        try:
            self._finish()
        except BaseException:
            self.abort()
            raise
        self._done = True

    def _finish(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> AtomicOutput:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
