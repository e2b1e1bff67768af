"""`pcbmerge methods` lists every method without importing torch, once its listing is kept,
and the listing kept is the one the registries build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from mergekit_pcb.kinds import all_methods, catalog


def test_methods_lists_without_torch_from_the_kept_listing(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    live = all_methods()
    # a miss in a process that has not loaded torch builds the listing and keeps it (torch
    # is loaded in this one: hide it, the registries are imported already)
    monkeypatch.delitem(sys.modules, "torch")
    assert catalog.listing() == live
    monkeypatch.undo()
    kept = list((tmp_path / "mergekit_pcb").glob("methods-*.json"))
    assert [p.name for p in kept] == [f"methods-{catalog.source_key()}.json"]

    code = ("import sys; from typer.testing import CliRunner; from mergekit_pcb.cli import app; "
            "r = CliRunner().invoke(app, ['methods', '--json']); "
            "assert r.exit_code == 0, r.output; "
            "assert 'torch' not in sys.modules, 'torch imported'; print(r.output)")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert list(listed) == [m.name for m in live]
    assert listed == {m.name: {"kind": m.kind, "summary": m.summary,
                               "parameters": m.parameters} for m in live}


def test_help_does_not_import_torch() -> None:
    code = ("import sys; from typer.testing import CliRunner; from mergekit_pcb.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
            "assert 'methods' in r.output; assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_a_changed_added_or_removed_module_changes_the_key(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    (tmp_path / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(catalog, "PACKAGE", tmp_path)
    keys = [catalog.source_key()]
    (tmp_path / "a.py").write_text("x = 22\n")  # another size
    keys.append(catalog.source_key())
    os.utime(tmp_path / "a.py", ns=(1, 1))  # same size, another time
    keys.append(catalog.source_key())
    (tmp_path / "b.py").write_text("")
    keys.append(catalog.source_key())
    (tmp_path / "b.py").unlink()
    assert catalog.source_key() == keys[2]
    assert len(set(keys)) == 4


def test_an_unreadable_listing_is_built_again(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = catalog.cache_dir() / f"methods-{catalog.source_key()}.json"
    path.parent.mkdir(parents=True)
    path.write_text('[{"name": "linear"}]')  # not a listing
    live = all_methods()
    monkeypatch.delitem(sys.modules, "torch")
    assert catalog.listing() == live
    monkeypatch.undo()
    assert json.loads(path.read_text()) == [asdict(m) for m in live]
