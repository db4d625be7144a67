"""TEMPORARY stand-in until the halfmaps branch lands (not to be committed)."""
from dataclasses import dataclass
import torch
from .validate import fsc, resolution_at


def combine_halves(h1, h2, curve):
    return 0.5 * (h1 + h2)


@dataclass
class _GS:
    res: float

    def to_json(self):
        return {"resolution_A": self.res}


def gold_standard_fsc(h1, h2, apix, mask=None):
    f, c = fsc(h1, h2, apix)
    return _GS(resolution_at(f, c, 0.143))
