"""The public API: cryorecon.read_particles, simulate, reconstruct, backproject, fsc, align."""

import doctest
import subprocess
import sys
import tempfile

import pytest

import cryorecon

EXPECTED = {  # public name -> where it is defined
    "read_particles": ("cryorecon.io.particles", "read_particles"),
    "simulate": ("cryorecon.simulate", "run_simulation"),
    "reconstruct": ("cryorecon.reconstruct", "reconstruct"),
    "backproject": ("cryorecon.backproject", "wiener_backproject"),
    "fsc": ("cryorecon.validate", "fsc"),
    "align": ("cryorecon.validate", "align"),
}


def test_all_lists_the_public_names():
    assert sorted(cryorecon.__all__) == sorted(EXPECTED)
    assert set(EXPECTED) <= set(dir(cryorecon))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_name_is_its_function_even_after_its_submodule_is_imported(name):
    module, attr = EXPECTED[name]
    __import__(module)  # sets cryorecon.<submodule> for simulate, reconstruct, backproject
    f = getattr(cryorecon, name)
    assert callable(f) and f is getattr(sys.modules[module], attr)
    ns = {}
    exec(f"from cryorecon import {name} as g", ns)
    assert ns["g"] is f


def test_import_does_not_load_torch():
    code = "import sys, cryorecon; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("name", ["fsc", "align", "simulate", "read_particles", "backproject"])
def test_docstring_example_runs(name, tmp_path, monkeypatch):
    """Each example runs as written, in a fresh namespace (temporary folders in tmp_path)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    f = getattr(cryorecon, name)
    tests = doctest.DocTestFinder().find(f, name, globs={})
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for t in tests:
        runner.run(t)
    res = runner.summarize(verbose=False)
    assert res.attempted >= 3, f"{name} has no example"
    assert res.failed == 0
