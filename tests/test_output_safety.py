"""Output safety: where `-o` and an evolution run directory may go, the pcbmerge marker that
--force relies on, the lock beside the destination, leftovers of killed runs, --shard-size.

The hazard battery drives check_destination / atomic_output_dir directly (the CLI is wired
to them elsewhere) with a seeded set of dangerous destinations: each must be refused in one
line, and the whole tree (inputs, destination, its parent) must be byte-for-byte unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

from mergekit_pcb.errors import OutputError
from mergekit_pcb.io.writer import (
    MARKER,
    atomic_output_dir,
    check_destination,
    is_pcbmerge_output,
    marker_text,
    parse_size,
    prepare_run_dir,
    remove_stale_partials,
)

INPUTS = ("models/base", "models/ft1", "models/ft2", "models/solo.safetensors")
LINKS = {"models/base": "links/base", "models/ft1": "links/ft1", "models/ft2": "links/ft2",
         "models/solo.safetensors": "links/solo"}


# ---- a tree of inputs and neighbours --------------------------------------------------------

def make_tree(root: Path) -> None:
    """Inputs (three model folders, one single-file model), links to them, a working
    directory, existing outputs that pcbmerge did not write, and a home directory."""
    rng = random.Random(7)

    def blob(path: Path, n: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(n))

    for name in ("base", "ft1", "ft2"):
        d = root / "models" / name
        blob(d / "model.safetensors", 512)
        (d / "config.json").write_text(json.dumps({"name": name}))
    blob(root / "models/ft1/model-00002-of-00002.safetensors", 256)
    blob(root / "models/solo.safetensors", 300)
    (root / "links").mkdir()
    (root / "links/base").symlink_to("../models/base")  # relative link
    for inp in INPUTS[1:]:
        (root / LINKS[inp]).symlink_to(root / inp)
    (root / "links/models").symlink_to(root / "models")
    (root / "links/work").symlink_to(root / "work")
    (root / "work/deep/er").mkdir(parents=True)
    blob(root / "outs/unmarked/notes.txt", 64)
    blob(root / "outs/file.txt", 64)
    blob(root / "outs/garbage-marker/a.bin", 64)
    (root / "outs/garbage-marker" / MARKER).write_text("not json")
    blob(root / "outs/other-tool/a.bin", 64)
    (root / "outs/other-tool" / MARKER).write_text(json.dumps({"tool": "someone-else"}))
    (root / "outs/link-unmarked").symlink_to(root / "outs/unmarked")
    (root / "home").mkdir()


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root: file hashes, link targets, directories."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            else:
                out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "t"
    root.mkdir()
    make_tree(root)
    monkeypatch.setenv("HOME", str(root / "home"))
    monkeypatch.chdir(root / "work")
    return root


def one_line(e: pytest.ExceptionInfo[OutputError]) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


# ---- the seeded hazard battery --------------------------------------------------------------

@dataclass(frozen=True)
class Hazard:
    label: str
    dest: str  # "ROOT/..." or relative to cwd
    cwd: str  # relative to ROOT
    expect: str  # a substring of the refusal; "EXISTING": depends on force
    link_inputs: bool  # inputs passed as the links to them
    force: bool
    api: str  # "check" or "atomic"


def hazards(seed: int = 20240611) -> list[Hazard]:
    rng = random.Random(seed)
    base: list[tuple[str, str, str, str, bool | None]] = []
    for inp in INPUTS:
        name, link = Path(inp).name, LINKS[inp]
        base += [
            (f"{name} itself", f"ROOT/{inp}", "work", "input", None),
            (f"{name} relative", f"../{inp}", "work", "input", None),
            (f"{name} with trailing slash", f"ROOT/{inp}/", "work", "input", None),
            (f"{name} spelt with ..", f"ROOT/models/base/../{name}", "work", "input", None),
            (f"symlink to {name}", f"ROOT/{link}", "work", "input", None),
            (f"relative symlink to {name}", f"../{link}", "work", "input", None),
            (f"{name} through a linked folder", f"ROOT/links/models/{name}", "work", "input",
             None),
            (f"inside {name}", f"ROOT/{inp}/merged", "work", "input", None),
            (f"deep inside {name}", f"ROOT/{inp}/a/b", "work", "input", None),
            (f"inside symlink to {name}", f"ROOT/{link}/merged", "work", "input", None),
        ]
        if not inp.endswith(".safetensors"):
            base += [
                (f". inside {name}", ".", inp, "input", None),
                (f".. from inside {name}", "..", inp, "input", None),
            ]
    base += [
        ("folder holding the inputs", "ROOT/models", "work", "input", None),
        ("folder holding the inputs, relative", "../models", "work", "input", None),
        ("symlink to the folder holding the inputs", "ROOT/links/models", "work", "input",
         None),
        ("folder holding the inputs via ..", "ROOT/models/ft2/..", "work", "input", None),
        ("cd models && -o .", ".", "models", "input", None),
        ("folder holding links to the inputs", "ROOT/links", "work", "input", True),
        ("top of the tree", "ROOT", "work", "input", None),
        (". as cwd", ".", "work", "current directory", None),
        ("./ as cwd", "./", "work", "current directory", None),
        (".. from deep", "..", "work/deep", "current directory", None),
        ("../.. from deeper", "../..", "work/deep/er", "current directory", None),
        ("cwd ancestor by absolute path", "ROOT/work", "work/deep/er", "current directory",
         None),
        ("symlink to cwd", "ROOT/links/work", "work", "current directory", None),
        ("home directory", "ROOT/home", "work", "home directory", None),
        ("existing unmarked dir", "ROOT/outs/unmarked", "work", "EXISTING", None),
        ("existing unmarked dir, relative", "../outs/unmarked", "work", "EXISTING", None),
        ("symlink to an unmarked dir", "ROOT/outs/link-unmarked", "work", "EXISTING", None),
        ("garbage marker", "ROOT/outs/garbage-marker", "work", "EXISTING", None),
        ("another tool's marker", "ROOT/outs/other-tool", "work", "EXISTING", None),
        ("existing file", "ROOT/outs/file.txt", "work", "not a directory", None),
        ("existing file, relative", "../outs/file.txt", "work", "not a directory", None),
    ]
    cases = []
    for label, dest, cwd, expect, link_inputs in base:
        for force in (True, False):
            cases.append(Hazard(label, dest, cwd, expect,
                                rng.random() < 0.5 if link_inputs is None else link_inputs,
                                force, rng.choice(("check", "atomic"))))
    return cases


HAZARDS = hazards()


def test_battery_is_large_enough() -> None:
    assert len(HAZARDS) >= 100
    assert {h.api for h in HAZARDS} == {"check", "atomic"}


@pytest.mark.parametrize("h", HAZARDS, ids=lambda h: f"{h.label}-{h.api}-force={h.force}")
def test_hazard_refused(h: Hazard, tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tree / h.cwd)
    dest = h.dest.replace("ROOT", str(tree))
    inputs = [tree / (LINKS[i] if h.link_inputs else i) for i in INPUTS]
    resolved = Path(dest).resolve()
    before = snapshot(tree)
    with pytest.raises(OutputError) as e:
        if h.api == "check":
            check_destination(Path(dest), force=h.force, inputs=inputs)
        else:
            with atomic_output_dir(Path(dest), force=h.force, inputs=inputs) as tmp:
                (tmp / "model.safetensors").write_bytes(b"merged")
                pytest.fail("the body ran")
    msg = one_line(e)
    assert str(resolved) in msg
    expect = h.expect
    if expect == "EXISTING":
        expect = "not written by pcbmerge" if h.force else "already exists; pass --force"
    assert expect in msg, msg
    assert snapshot(tree) == before  # inputs, destination and its neighbours untouched


# ---- location rules outside the tree --------------------------------------------------------

def test_cwd_ancestors_root_and_real_home_refused(tree: Path) -> None:
    # check_destination only: atomic_output_dir is never pointed at a real system folder
    for p in [*Path.cwd().parents, Path("/"), Path.home().parent]:
        with pytest.raises(OutputError) as e:
            check_destination(p, force=True)
        one_line(e)


def test_symlink_loop_is_one_line(tree: Path) -> None:
    (tree / "loop").symlink_to(tree / "loop")
    with pytest.raises(OutputError) as e:
        check_destination(tree / "loop", force=True)
    assert "loop" in one_line(e)


def test_ordinary_destinations_pass(tree: Path) -> None:
    inputs = [tree / i for i in INPUTS]
    for dest in (tree / "outs/new", tree / "work/merged", tree / "outs/a/b/c",
                 Path("merged"), tree / "models-merged"):
        assert check_destination(dest, force=False, inputs=inputs) == dest.resolve()
    empty = tree / "outs/empty"
    empty.mkdir()
    with pytest.raises(OutputError, match="already exists; pass --force to replace it"):
        check_destination(empty, force=False)
    assert check_destination(empty, force=True) == empty  # nothing in it to lose


# ---- marker, replacement and failure --------------------------------------------------------

def test_marker(tree: Path) -> None:
    assert json.loads(marker_text("merge")) == {"tool": "mergekit-pcb", "kind": "merge"}
    dest = tree / "outs/m"
    with atomic_output_dir(dest, force=False, kind="evolve") as tmp:
        (tmp / "model.safetensors").write_bytes(b"a")
    assert is_pcbmerge_output(dest)
    assert json.loads((dest / MARKER).read_text()) == {"tool": "mergekit-pcb",
                                                         "kind": "evolve"}
    for other in ("outs/unmarked", "outs/garbage-marker", "outs/other-tool", "outs/file.txt",
                  "outs/missing"):
        assert not is_pcbmerge_output(tree / other)
    assert sorted(p.name for p in (tree / "outs").iterdir() if p.name.startswith(".")) == []


def test_force_replaces_a_pcbmerge_output(tree: Path) -> None:
    dest = tree / "outs/m"
    with atomic_output_dir(dest, force=False) as tmp:
        (tmp / "model.safetensors").write_bytes(b"first")
        (tmp / "extra.txt").write_text("old")
    with pytest.raises(OutputError) as e:
        check_destination(dest, force=False)
    assert one_line(e) == f"output {dest} already exists; pass --force to replace it"
    with atomic_output_dir(dest, force=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"second")
    assert (dest / "model.safetensors").read_bytes() == b"second"
    assert not (dest / "extra.txt").exists() and is_pcbmerge_output(dest)
    assert [p.name for p in (tree / "outs").iterdir() if p.name.startswith(".m")] == []


def test_symlink_destination_replaces_the_target(tree: Path) -> None:
    real = tree / "outs/real"
    with atomic_output_dir(real, force=False) as tmp:
        (tmp / "model.safetensors").write_bytes(b"first")
    link = tree / "work/out"
    link.symlink_to(real)
    with atomic_output_dir(link, force=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"second")
    assert link.is_symlink() and (real / "model.safetensors").read_bytes() == b"second"


def test_failure_leaves_the_destination_as_it_was(tree: Path) -> None:
    dest = tree / "outs/m"
    with atomic_output_dir(dest, force=False) as tmp:
        (tmp / "model.safetensors").write_bytes(b"first")
    before = snapshot(tree)
    with pytest.raises(RuntimeError, match="boom"), atomic_output_dir(dest, force=True) as tmp:
        (tmp / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("boom")
    assert snapshot(tree) == before  # no partial, no lock file, old output intact
    with pytest.raises(RuntimeError), atomic_output_dir(tree / "outs/new", force=False):
        raise RuntimeError("boom")
    assert snapshot(tree) == before


# ---- the lock beside the destination --------------------------------------------------------

HOLD_LOCK = textwrap.dedent("""
    import fcntl, os, sys
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("locked", flush=True)
    sys.stdin.readline()
""")

WRITE_AND_WAIT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from mergekit_pcb.io.writer import atomic_output_dir
    with atomic_output_dir(Path(sys.argv[1]), force=sys.argv[2] == "force") as tmp:
        (tmp / "model.safetensors").write_bytes(b"first")
        print("writing", flush=True)
        if sys.argv[3] == "stdin":
            sys.stdin.readline()
        else:
            time.sleep(60)
    print("done", flush=True)
""")


def spawn(script: str, *args: str | Path, log: Path) -> subprocess.Popen[str]:
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                text=True)
    return proc


def wait_for(proc: subprocess.Popen[str], line: str, log: Path) -> None:
    assert proc.stdout is not None
    got = proc.stdout.readline()
    assert got == line + "\n", (got, log.read_text())


def finish(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    assert proc.wait(timeout=30) == 0


def test_a_held_lock_refuses_a_second_writer(tree: Path, tmp_path: Path) -> None:
    dest = tree / "outs/m"
    proc = spawn(HOLD_LOCK, tree / "outs/.m.lock", log=tmp_path / "err")
    try:
        wait_for(proc, "locked", tmp_path / "err")
        before = snapshot(tree)
        for force in (False, True):
            with pytest.raises(OutputError) as e, atomic_output_dir(dest, force=force):
                pytest.fail("the body ran")
            assert one_line(e).startswith(f"another pcbmerge run is writing {dest}")
        assert snapshot(tree) == before  # the holder's lock file is left to the holder
    finally:
        finish(proc)
    with atomic_output_dir(dest, force=False) as tmp:  # released: now it goes through
        (tmp / "model.safetensors").write_bytes(b"x")
    assert is_pcbmerge_output(dest) and not (tree / "outs/.m.lock").exists()


def test_two_runs_to_one_destination(tree: Path, tmp_path: Path) -> None:
    """The second run is refused while the first writes, and after it finished the
    destination exists (re-checked under the lock): never a silent replacement."""
    dest = tree / "outs/m"
    proc = spawn(WRITE_AND_WAIT, dest, "no", "stdin", log=tmp_path / "err")
    try:
        wait_for(proc, "writing", tmp_path / "err")
        check_destination(dest, force=False)  # the unlocked early check cannot know
        with pytest.raises(OutputError, match="another pcbmerge run is writing"), \
                atomic_output_dir(dest, force=False):
            pytest.fail("the body ran")
    finally:
        finish(proc)
    assert (dest / "model.safetensors").read_bytes() == b"first"
    with pytest.raises(OutputError, match="already exists; pass --force"), \
            atomic_output_dir(dest, force=False):
        pytest.fail("the body ran")
    assert (dest / "model.safetensors").read_bytes() == b"first"


# ---- leftovers of killed runs ---------------------------------------------------------------

def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: the PID names no process now
    return proc.pid


def test_sigkill_leftovers_are_cleaned_by_the_next_run(tree: Path, tmp_path: Path) -> None:
    dest = tree / "outs/m"
    with atomic_output_dir(dest, force=False) as tmp:
        (tmp / "model.safetensors").write_bytes(b"previous")
    proc = spawn(WRITE_AND_WAIT, dest, "force", "sleep", log=tmp_path / "err")
    wait_for(proc, "writing", tmp_path / "err")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (tree / f"outs/.m.partial-{proc.pid}").is_dir()  # what a kill leaves
    assert (dest / "model.safetensors").read_bytes() == b"previous"
    with atomic_output_dir(dest, force=True) as tmp:  # the dead run's lock is no lock
        (tmp / "model.safetensors").write_bytes(b"next")
    assert sorted(p.name for p in (tree / "outs").iterdir() if p.name.startswith(".m")) == []
    assert (dest / "model.safetensors").read_bytes() == b"next"


def test_only_dead_runs_leftovers_go(tree: Path) -> None:
    outs, dead = tree / "outs", dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                            stdin=subprocess.PIPE)
    try:
        for name in (f".m.partial-{dead}", f".m.old-{dead}", f".m.partial-{live.pid}",
                     f".m.old-{live.pid}", ".m.partial-1", ".m.partial-0", ".m.partial-x",
                     f".mm.partial-{dead}", f".m.x.partial-{dead}"):
            (outs / name).mkdir()
            (outs / name / "model.safetensors").write_bytes(b"half")
        (outs / "m").mkdir()  # the destination exists: the old copy is not needed
        removed = remove_stale_partials(outs / "m")
        assert sorted(p.name for p in removed) == [f".m.old-{dead}", f".m.partial-{dead}"]
        left = sorted(p.name for p in outs.iterdir() if p.name.startswith("."))
        assert left == sorted([f".m.partial-{live.pid}", f".m.old-{live.pid}", ".m.partial-1",
                               ".m.partial-0", ".m.partial-x", f".mm.partial-{dead}",
                               f".m.x.partial-{dead}"])
    finally:
        assert live.stdin is not None
        live.stdin.close()
        live.wait()


def test_killed_between_renames_puts_the_previous_output_back(tree: Path) -> None:
    """Killed after moving the old output aside and before the new one went in: the next
    run restores the old output (the killed run never finished), then proceeds."""
    outs, dead = tree / "outs", dead_pid()
    old = outs / f".m.old-{dead}"
    old.mkdir()
    (old / "model.safetensors").write_bytes(b"previous")
    (old / MARKER).write_text(marker_text("merge"))
    (outs / f".m.partial-{dead}").mkdir()
    with pytest.raises(OutputError, match="already exists; pass --force"), \
            atomic_output_dir(outs / "m", force=False):
        pytest.fail("the body ran")
    assert (outs / "m/model.safetensors").read_bytes() == b"previous"
    assert sorted(p.name for p in outs.iterdir() if p.name.startswith(".m")) == []


# ---- evolution run directories --------------------------------------------------------------

def make_run_dir(path: Path) -> Path:
    (path / "members").mkdir(parents=True)
    (path / "state.json").write_text("{}")
    (path / "members/init-000.safetensors").write_bytes(b"m")
    return path


def test_run_dir(tree: Path) -> None:
    fresh = tree / "outs/fresh.run"
    assert prepare_run_dir(fresh, force=False) == fresh and not fresh.exists()
    empty = tree / "outs/empty.run"
    empty.mkdir()
    assert prepare_run_dir(empty, force=False) == empty and empty.is_dir()
    run = make_run_dir(tree / "outs/m.run")
    with pytest.raises(OutputError) as e:
        prepare_run_dir(run, force=False)
    assert "holds a run; pass --resume to continue it or --force to start over" in one_line(e)
    assert prepare_run_dir(run, force=False, resume=True) == run and (run / "state.json").exists()
    assert prepare_run_dir(run, force=True) == run and not run.exists()


def test_run_dir_hazards(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs = [tree / i for i in INPUTS]
    (tree / "models/base/state.json").write_text("{}")  # looks like a run dir, is an input
    (tree / "work/state.json").write_text("{}")
    make_run_dir(tree / "models/ft2/x.run")
    before = snapshot(tree)
    for root, force, resume, expect in [
        (tree / "outs/unmarked", True, False, "not written by pcbmerge"),
        (tree / "outs/unmarked", False, False, "not written by pcbmerge"),
        (tree / "outs/file.txt", True, False, "not a directory"),
        (tree / "models/base", True, False, "is the input"),
        (tree / "links/base", True, False, "is the input"),
        (tree / "models", True, False, "contains the input"),
        (tree / "models/ft2/x.run", True, False, "lies inside the input"),
        (tree / "models/ft2/x.run", False, True, "lies inside the input"),
        (Path("."), True, False, "current directory"),
        (tree / "home", True, False, "home directory"),
    ]:
        with pytest.raises(OutputError) as e:
            prepare_run_dir(root, force=force, resume=resume, inputs=inputs)
        assert expect in one_line(e), (root, one_line(e))
        assert str(root.resolve()) in str(e.value)
    assert snapshot(tree) == before


# ---- --shard-size ---------------------------------------------------------------------------

@pytest.mark.parametrize("text,value", [
    ("5GB", 5 * 10**9), ("500M", 500 * 10**6), ("2GiB", 2 * 2**30), (" 7 mb ", 7 * 10**6),
    ("30KB", 30_000), ("1e3", 1000), ("1024", 1024), (1024, 1024), ("1000TB", 10**15),
])
def test_parse_size(text: str | int, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", [
    "inf", "INF", "-inf", "infGB", "nan", "NaN MB", "1e400", "-5GB", "0", "0B", "0.1", "-0",
    "1001TB", "1e16", "abc", "", "GB", "5XB", "5 G B x", 0, -1, 10**16, True, 5.0,
])
def test_parse_size_refuses(text: object) -> None:
    with pytest.raises(OutputError) as e:
        parse_size(text)  # type: ignore[arg-type]
    assert "--shard-size" in one_line(e)
