"""The body every ``python X.py app:apps/NAME.yml [key=value ...]`` command shares."""

from __future__ import annotations

import logging
from typing import Callable

from models.checkpoint import CheckpointError
from models.config import ConfigError


def app_main(run: Callable[[list[str]], object], argv: list[str], name: str) -> int:
    """Log to stderr, call ``run(argv)``; a bad key, file or checkpoint is one log line naming it and exit
    status 2 (never a traceback). Returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        run(argv)
    except (ConfigError, CheckpointError) as err:
        logging.getLogger(name).error("%s", err)
        return 2
    return 0
