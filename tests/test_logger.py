"""The console says what happened in short lines; the log file keeps where in the code it was said."""

import re

from logger import create_logger


def test_console_lines_are_short_and_the_file_keeps_the_code_location(tmp_path, capsys):
    logger = create_logger(str(tmp_path), 0, "test_logger_rank0")
    logger.info("start training")
    logger.warning("DATA.NUM_WORKERS 8 capped")
    out = capsys.readouterr().out
    assert re.fullmatch(
        r".*\[\d\d:\d\d:\d\d\].* start training\n.*\[\d\d:\d\d:\d\d\].*WARNING.* DATA.NUM_WORKERS 8 capped\n", out
    )
    assert "test_logger.py" not in out and "test_logger_rank0" not in out
    lines = (tmp_path / "log_rank0.txt").read_text().splitlines()
    stamp = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d test_logger_rank0\]"
    assert re.fullmatch(stamp + r" \(test_logger.py \d+\): INFO start training", lines[0])
    assert lines[1].endswith("WARNING DATA.NUM_WORKERS 8 capped")


def test_other_ranks_write_only_their_file(tmp_path, capsys):
    logger = create_logger(str(tmp_path), 1, "test_logger_rank1")
    logger.info("rank 1 of 2")
    assert capsys.readouterr().out == ""
    assert (tmp_path / "log_rank1.txt").read_text().endswith("INFO rank 1 of 2\n")
