"""The ops' documented signatures are the code's: each public op is its reference twin's signature plus
``backend="auto"`` (docs/kernels.md), and the README's table of ops lists every parameter but ``backend``."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from mulclip_fast import ops
from mulclip_fast import reference as R

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize("name", ops.__all__)
def test_each_op_is_its_reference_twin_plus_backend(name):
    op, twin = inspect.signature(getattr(ops, name)), inspect.signature(getattr(R, name))
    params = list(op.parameters.values())
    assert params[-1].name == "backend" and params[-1].default == "auto"
    assert [(p.name, p.default) for p in params[:-1]] == [(p.name, p.default) for p in twin.parameters.values()]


@pytest.mark.parametrize("name", ops.__all__)
def test_the_readme_table_lists_every_parameter_but_backend(name):
    rows = re.findall(rf"^\| `{name}\(([^)]*)\)` \|", README.read_text(encoding="utf-8"), flags=re.MULTILINE)
    assert len(rows) == 1, f"README's table of ops has {len(rows)} rows for {name}"
    listed = [p.strip() for p in rows[0].split(",")]
    assert listed == [p for p in inspect.signature(getattr(ops, name)).parameters if p != "backend"]
