"""Rank-aware logging: short lines on rank 0's console, full ones in one file per rank."""

import functools
import logging
import os
import sys

from termcolor import colored

# log_rank{r}.txt: when, which run, where in the code, how severe, what
FILE_FORMAT = "[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class ConsoleFormatter(logging.Formatter):
    """``[HH:MM:SS] message``; warnings and errors say so after the time."""

    def format(self, record):
        when = colored(f"[{self.formatTime(record, '%H:%M:%S')}]", "green")
        level = f"{colored(record.levelname, 'red')} " if record.levelno >= logging.WARNING else ""
        return f"{when} {level}{record.getMessage()}"


@functools.lru_cache
def create_logger(output_dir, dist_rank=0, name=""):
    """Logger writing to ``output_dir/log_rank{dist_rank}.txt`` and, on rank 0, to stdout."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logger.handlers.clear()

    if dist_rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(ConsoleFormatter())
        logger.addHandler(console)

    os.makedirs(output_dir, exist_ok=True)
    file_handler = logging.FileHandler(os.path.join(output_dir, f"log_rank{dist_rank}.txt"), mode="a")
    file_handler.setFormatter(logging.Formatter(FILE_FORMAT, datefmt=DATE_FORMAT))
    logger.addHandler(file_handler)
    # the data package's warnings (skipped images, ignored files) go to the same places
    data_logger = logging.getLogger("data")
    data_logger.handlers = list(logger.handlers)
    data_logger.setLevel(logging.INFO)
    data_logger.propagate = False
    return logger
