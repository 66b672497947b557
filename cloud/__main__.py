"""``python -m cloud --config apps/cloud.yml [key=value ...]``: the cloud daemon."""

from __future__ import annotations

import argparse
import logging
import sys

from cloud.server import CloudConfig, serve
from cloud.worker import WorkerError
from models.checkpoint import CheckpointError
from models.config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cloud", description="SPINN cloud inference daemon")
    parser.add_argument("--config", default=None, help="YAML config (apps/cloud.yml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = load_config(CloudConfig, args.config, args.overrides)
        logging.getLogger().setLevel(cfg.log_level.upper())
        return serve(cfg)
    except (ConfigError, CheckpointError, WorkerError) as err:
        logging.getLogger("cloud").error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
