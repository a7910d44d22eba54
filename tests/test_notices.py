"""The stack's log lines that are not a user's business are dropped by their exact text; others stay."""

import logging

from helpers.sd.notices import KNOWN_NOISE, quiet_known_noise


def test_known_noise_is_dropped_and_other_lines_of_the_same_logger_stay(caplog):
    quiet_known_noise()
    quiet_known_noise()  # twice: one filter per logger
    for name, text in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        assert sum(type(f).__name__ == "_DropText" for f in logger.filters) == 1
        with caplog.at_level(logging.WARNING, logger=name):
            caplog.clear()
            logger.warning(f"something {text} something")
            logger.warning("a real problem the user must see")
        assert [r.getMessage() for r in caplog.records] == ["a real problem the user must see"]
