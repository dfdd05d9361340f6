"""`import weightslab` is cheap (no torch until first use), and first use behaves as before."""

from __future__ import annotations

from .support import run_python


def test_import_is_lazy_and_every_public_name_and_submodule_resolves():
    out = run_python("""
import sys
import weightslab as wl
assert "torch" not in sys.modules, "import weightslab imported torch"
import weightslab.cli, weightslab.cli.catalog
assert "torch" not in sys.modules, "the command line's listing path imported torch"
assert wl.ConfigError.__module__ == "weightslab.errors"
for name in wl.__all__:
    assert getattr(wl, name) is not None, name
assert wl.data.ResumableSampler.__name__ == "ResumableSampler"  # a submodule as an attribute
try:
    wl.no_such_name
except AttributeError as exc:
    assert "no_such_name" in str(exc)
else:
    raise AssertionError("wl.no_such_name resolved")
print("ok")
""").stdout
    assert out.strip() == "ok"


def test_the_first_registration_starts_the_system_whichever_module_it_is_imported_from(tmp_path):
    out = run_python("""
import torch
from weightslab.registration import register_model
import weightslab.ledger
assert not hasattr(weightslab.ledger, "register_model")  # one way to register: the one that starts the system
register_model(torch.nn.Linear(2, 2))
from weightslab.process import running_system
assert running_system() is not None
running_system().close()
print("ok")
""", env={"WEIGHTSLAB_ROOT": str(tmp_path / "root")}).stdout
    assert out.strip() == "ok"
