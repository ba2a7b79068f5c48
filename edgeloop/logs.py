"""Logging setup for edgeloop's processes (the CLIs, the server's ingest workers).

One function, in the dependency-light core, so that every entry point configures logging the same
way without importing another entry point's module.
"""

from __future__ import annotations

import logging

#: One line per record: time, level, logger, message.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str) -> None:
    """Log to stderr at ``level`` (DEBUG, INFO, WARNING or ERROR; unknown names mean INFO)."""
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=LOG_FORMAT)
