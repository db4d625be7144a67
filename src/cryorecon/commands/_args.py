"""argparse helpers shared by the commands: numbers checked at the parser, so that a bad value
stops with a one-line message naming the option instead of failing deep in a run."""

from __future__ import annotations

import argparse


def bounded(kind, low: float, strict: bool):
    """argparse type: ``kind`` (int or float) above ``low`` (or at least ``low`` unless
    ``strict``)."""

    def parse(text: str):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if x < low or (strict and x == low):
            raise argparse.ArgumentTypeError(
                f"must be {'>' if strict else '>='} {low:g}, got {text}"
            )
        return x

    return parse


def positive(kind=float):
    """argparse type: a number > 0."""
    return bounded(kind, 0, strict=True)


def at_least(low: float, kind=int):
    """argparse type: a number >= ``low``."""
    return bounded(kind, low, strict=False)


def even_box(text: str) -> int:
    """argparse type: an image box in pixels, even and at least 8."""
    x = at_least(8)(text)
    if x % 2:
        raise argparse.ArgumentTypeError(f"must be even, got {text}")
    return x
