"""Structured logging: one ``event=... key=value`` line per job or request event, easy to grep and parse."""

from __future__ import annotations

import json
import logging
from typing import Any


def format_fields(event: str, **fields: Any) -> str:
    """Render ``event=NAME k=v ...``; values with spaces or quotes are JSON-quoted so each line stays parseable."""
    parts = [f"event={event}"]
    for key, value in fields.items():
        if value is None:
            continue
        text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        if not text or any(c in text for c in ' "=\n\t'):
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def log_event(logger: logging.Logger, event: str, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event line."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s", format_fields(event, **fields))
