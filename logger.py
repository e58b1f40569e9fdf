"""Rank-aware logging: colored console on rank 0, one plain file per rank."""

import functools
import logging
import os
import sys

from termcolor import colored


@functools.lru_cache
def create_logger(output_dir, dist_rank=0, name=""):
    """Logger writing to ``output_dir/log_rank{dist_rank}.txt`` and, on rank 0, to stdout."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.handlers.clear()

    fmt = "[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s"
    color_fmt = (
        colored("[%(asctime)s %(name)s]", "green")
        + colored("(%(filename)s %(lineno)d)", "yellow")
        + ": %(levelname)s %(message)s"
    )
    datefmt = "%Y-%m-%d %H:%M:%S"

    if dist_rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter(color_fmt, datefmt=datefmt))
        logger.addHandler(console)

    os.makedirs(output_dir, exist_ok=True)
    file_handler = logging.FileHandler(os.path.join(output_dir, f"log_rank{dist_rank}.txt"), mode="a")
    file_handler.setFormatter(logging.Formatter(fmt, datefmt=datefmt))
    logger.addHandler(file_handler)
    # the data package's warnings (skipped images, ignored files) go to the same places
    data_logger = logging.getLogger("data")
    data_logger.handlers = list(logger.handlers)
    data_logger.setLevel(logging.INFO)
    data_logger.propagate = False
    return logger
