"""Log records captured in memory: tests grep them for plaintext that must never appear."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator


class LogCapture(logging.Handler):
    """Appends every formatted record to `sink`."""

    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.DEBUG)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(self.format(record))


@contextlib.contextmanager
def capture_logs(
    sink: list[str], fmt: str = "%(levelname)s %(name)s %(message)s"
) -> Iterator[None]:
    """Every log record of this process, at every level, into `sink` while inside."""
    handler = LogCapture(sink)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
