"""Progress bars and log messages shared by every long step.

``configure`` is called once by the CLI; library code calls :func:`bar` and :data:`log`.
Progress goes to stderr, so stdout stays clean for results.
"""

from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

log = logging.getLogger("cryorecon")
_QUIET = False


def configure(quiet: bool = False, verbose: bool = False) -> None:
    global _QUIET
    _QUIET = quiet
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    log.setLevel(level)


def bar(iterable=None, total=None, desc: str = "", unit: str = "it", **kw):
    """A tqdm progress bar on stderr, silent under ``--quiet``."""
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        disable=_QUIET,
        file=sys.stderr,
        dynamic_ncols=True,
        **kw,
    )
