"""One line per event on stdout: `level=info call=Join network=3f2a… endpoint=9c1b… ms=1.20 msg`.

dockerd files a plugin's stdout as info and its stderr as error, and tags each line with
`plugin=<ID>`; the level inside the line is what tells them apart.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

_KEYS = ("call", "network", "endpoint")


class LineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [f"level={record.levelname.lower()}"]
        for key in _KEYS:
            value = getattr(record, key, None)
            if value:
                text = str(value)
                parts.append(f"{key}={text if key == 'call' else text[:12]}")
        fields: dict[str, Any] = getattr(record, "fields", None) or {}
        for key, value in fields.items():
            text = str(value)
            parts.append(f"{key}={_quote(text)}")
        message = record.getMessage()
        if message and message != "call":
            parts.append(f"msg={_quote(message)}")
        line = " ".join(parts)
        if record.exc_info:
            cause = record.exc_info[1]
            line += f" error={_quote(repr(cause))}"
            if record.levelno >= logging.ERROR:
                trace = self.formatException(record.exc_info).replace("\n", " | ")
                line += f" trace={_quote(trace)}"
        return line


def _quote(text: str) -> str:
    if text and not any(c in text for c in ' "='):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def setup(level: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(LineFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("hypercorn.error", "hypercorn.access", "pyroute2"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
