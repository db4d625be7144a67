"""cryorecon: ab-initio cryo-EM reconstruction (Punjani, Brubaker & Fleet, TPAMI 2017).

The public API (each function's docstring has a short example)::

    read_particles(path)                   particles from a RELION .star or cryoSPARC .cs file
    simulate(out_dir, ...)                 synthetic particles (Eq. 1) written as .star + .mrcs
    reconstruct(particles, out_dir, config)  ab-initio reconstruction (Algorithm 1)
    backproject(particles)                 Wiener back-projection at known poses (the oracle)
    fsc(a, b, apix)                        Fourier shell correlation of two maps
    align(ref, mov, apix)                  rotation, shift and hand that superpose two maps

The names load on first use, so ``import cryorecon`` (and ``cryorecon --help``) does not
import torch. ``simulate``, ``reconstruct`` and ``backproject`` are also the names of
submodules; the package attribute is always the function. Reach a submodule's contents
with ``from cryorecon.simulate import ...`` (``import cryorecon.simulate as m`` binds the
function, not the module).
"""

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> (module, attribute)
_PUBLIC = {
    "read_particles": ("cryorecon.io.particles", "read_particles"),
    "simulate": ("cryorecon.simulate", "run_simulation"),
    "reconstruct": ("cryorecon.reconstruct", "reconstruct"),
    "backproject": ("cryorecon.backproject", "wiener_backproject"),
    "fsc": ("cryorecon.validate", "fsc"),
    "align": ("cryorecon.validate", "align"),
}
__all__ = list(_PUBLIC)


def _public_name(name: str) -> property:
    module, attr = _PUBLIC[name]

    def get(self):
        return getattr(importlib.import_module(module), attr)

    def set(self, value):
        # The import system sets ``cryorecon.<submodule>`` after loading a submodule of
        # this name; the module stays in sys.modules and the attribute stays the function.
        pass

    return property(get, set, doc=f"``{module}.{attr}``")


class _Package(types.ModuleType):
    """The package's module type: its public names are properties, loaded on first use."""

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(_PUBLIC))


for _name in _PUBLIC:
    setattr(_Package, _name, _public_name(_name))
sys.modules[__name__].__class__ = _Package
del _name
