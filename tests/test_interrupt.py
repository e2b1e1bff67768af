"""Ctrl-C: one line that says how to go on, and no traceback from the scoring workers."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mergekit_pcb import cli
from mergekit_pcb.evolve.executor import ProcessExecutor
from mergekit_pcb.kinds import KINDS


def _sigint_handler(_: int) -> Any:
    return signal.getsignal(signal.SIGINT)


def test_scoring_workers_leave_ctrl_c_to_the_parent() -> None:
    """The parent stops the run and terminates the pool; a worker that took SIGINT itself
    printed a KeyboardInterrupt traceback of its own (20 lines for two workers)."""
    # A shell starts a background job with SIGINT ignored: compare with what it was.
    before = signal.getsignal(signal.SIGINT)
    pool = ProcessExecutor(2, threads=1)
    try:
        handlers = pool.map(_sigint_handler, [0, 1, 2, 3])
    finally:
        pool.terminate()
    assert handlers == [signal.SIG_IGN] * 4
    assert signal.getsignal(signal.SIGINT) is before  # the parent's is untouched


@pytest.mark.parametrize("command", ["evolve", "run"])
def test_an_interrupted_search_says_resume(command: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = tmp_path / "search.yaml"
    recipe.write_text("merge_method: evolver\n")

    class Kind(type(KINDS["search"])):  # type: ignore[misc]
        def run(self, *_: Any) -> Any:
            raise KeyboardInterrupt

    def stop(*_: Any, **__: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_read", lambda _: (Kind(), "evolver", (None, "")))
    monkeypatch.setattr("mergekit_pcb.evolve.run.evolve", stop)
    res = CliRunner().invoke(cli.app, [command, str(recipe), "-o", str(tmp_path / "out")])
    assert res.exit_code == 130
    assert res.stderr.splitlines() == [
        "interrupted: the run state is kept; the same command with --resume continues it"]


def test_an_interrupted_merge_says_only_interrupted(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    class Kind(type(KINDS["merge"])):  # type: ignore[misc]
        def run(self, *_: Any) -> Any:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_read", lambda _: (Kind(), "linear", (None, "")))
    res = CliRunner().invoke(cli.app, ["run", str(tmp_path / "r.yaml"), str(tmp_path / "o")])
    assert (res.exit_code, res.stderr) == (130, "interrupted\n")
