"""The documentation site: the generated configuration reference and the strict MkDocs build.

The configuration reference (``docs/configuration.md``) is generated at build time by
``config_reference_markdown`` in ``docs/hooks/ubsmoe_docs.py``; these tests load that
hook file by path. The field walk below is written independently of the generator, so a
section or nested dataclass the generator skips fails here.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from ubsmoe.config import RunConfig
from ubsmoe.methods import available_methods, get_method_class

ROOT = Path(__file__).resolve().parents[1]
HOOK = ROOT / "docs" / "hooks" / "ubsmoe_docs.py"


def _load_hook():
    """The docs hook module, imported from its file (it is not part of the package)."""
    spec = importlib.util.spec_from_file_location("ubsmoe_docs_hook", HOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dotted_fields(cls: type, prefix: str) -> list[str]:
    """Every leaf field of dataclass ``cls`` as a dotted key; nested dataclasses walked."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "method_config":
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _dotted_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _all_config_keys() -> list[str]:
    """The general sections' keys plus every registered method's section."""
    keys = _dotted_fields(RunConfig, "")
    for name in available_methods():
        keys += _dotted_fields(get_method_class(name).config_class, f"{name}.")
    return keys


def test_every_config_field_is_in_the_generated_reference_with_a_description():
    markdown = _load_hook().config_reference_markdown()
    rows = {}
    for line in markdown.splitlines():
        m = re.match(r'\| <span id="([^"]+)"></span>`([^`]+)` \|(.*)\|\s*$', line)
        if m:
            assert m.group(1) == m.group(2)
            rows[m.group(2)] = m.group(3).split(" | ")[-1].strip()
    keys = _all_config_keys()
    # sanity of the walk itself: general, nested and method sections are all there
    for key in ("method", "model.tiny.num_experts", "fl.budgets", "log.wandb",
                "ubsmoe.dmr.phi_lr", "a3smoe.gamma", "flexlora.ranks", "hetlora.reg_lambda"):
        assert key in keys
    missing = [k for k in keys if k not in rows]
    assert not missing, f"config keys absent from the generated reference: {missing}"
    undocumented = [k for k in keys if not rows[k]]
    assert not undocumented, f"config keys without a description: {undocumented}"
    extra = sorted(set(rows) - set(keys))
    assert not extra, f"reference rows that are no config field: {extra}"


def test_reference_shows_the_embedded_run_value_where_it_differs():
    markdown = _load_hook().config_reference_markdown()
    row = next(line for line in markdown.splitlines() if "`data.train_examples`" in line)
    cells = [c.strip() for c in row.split(" | ")]
    assert cells[2:4] == ["`15000`", "`2000`"]  # dataclass default, embedded default.yaml
    row = next(line for line in markdown.splitlines() if "`model.lora_rank`" in line)
    assert [c.strip() for c in row.split(" | ")][2:4] == ["`20`", ""]


def test_a_field_without_a_description_is_named(monkeypatch):
    hook = _load_hook()

    @dataclasses.dataclass
    class Undocumented:
        """A section whose field has no "Attributes:" entry."""

        knob: int = 1

    monkeypatch.setattr(hook, "config_sections", lambda: [("x.", Undocumented, "X")])
    with pytest.raises(ValueError, match=r"x\.knob"):
        hook.config_reference_markdown()


def test_api_modules_exist():
    """Every module the API reference lists can be found (a moved module fails here)."""
    hook = _load_hook()
    modules = [m for _, group in hook.API_MODULES for m in group]
    assert len(modules) == len(set(modules))
    for module in modules:
        assert importlib.util.find_spec(module) is not None, module


def test_readme_is_a_door():
    """README at most about 200 lines, none over 400 characters, linking into docs/."""
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 220
    assert max(len(line) for line in lines) <= 400
    for target in re.findall(r"\]\((docs/[^)#]+)", "\n".join(lines)):
        assert (ROOT / target).is_file(), target


@pytest.mark.e2e
def test_mkdocs_build_strict(tmp_path):
    """``mkdocs build --strict``: no broken link or anchor, no missing reference, no warning."""
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    if mkdocs is None:
        pytest.fail('mkdocs is not installed: pip install -e ".[dev]" (pins it)')
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    site = tmp_path / "site"
    done = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(site)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    config_page = (site / "configuration" / "index.html").read_text(encoding="utf-8")
    for key in _all_config_keys():
        assert f'id="{key}"' in config_page, key
    assert (site / "api" / "ubsmoe.config" / "index.html").is_file()
    assert "ubsmoe:config-reference" not in config_page
