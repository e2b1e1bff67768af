"""The documentation is tested: the site builds in strict mode, every `pcbmerge` command
shown in a fenced block of the README or a page exists with the flags it uses, and every
YAML recipe shown (and every recipe in `recipes/`) passes the project's own recipe checks.

Recipes are checked the way `pcbmerge validate` reads them (`cli._read`: the bounded YAML
reader, the kind registry, the kind's schema), then, for merges, with every check that
needs no checkpoint (`engine.plan.check_merge_recipe`): the models the pages name (hub ids,
`./my-finetune-a`) do not exist here. The site builds in-process into tmp_path.
"""

from __future__ import annotations

import importlib.util
import logging
import re
import shlex
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from mergekit_pcb.cli import _read
from mergekit_pcb.engine.plan import check_merge_recipe
from mergekit_pcb.errors import RecipeError
from mergekit_pcb.kinds import KINDS, all_methods

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
PAGES = sorted([REPO / "README.md", *DOCS.rglob("*.md")])
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```\s*$", re.S | re.M)

def load_hooks() -> ModuleType:
    """`scripts/docs_hooks.py` (the MkDocs hook that generates the reference pages)."""
    name = "pcbmerge_docs_hooks"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "docs_hooks.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


hooks = load_hooks()


def fenced_blocks(path: Path) -> list[tuple[str, str, int]]:
    """(language, body, line number) of every fenced block of a Markdown file."""
    text = path.read_text()
    return [(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1)
            for m in FENCE.finditer(text)]


def shown_commands() -> list[tuple[str, str]]:
    """Every `pcbmerge ...` line of a fenced block, continuations joined: (where, line)."""
    out = []
    for page in PAGES:
        for _, body, line_no in fenced_blocks(page):
            lines = body.splitlines()
            i = 0
            while i < len(lines):
                line, start = lines[i].strip().removeprefix("$ "), i
                while line.endswith("\\") and i + 1 < len(lines):
                    i += 1
                    line = line[:-1] + " " + lines[i].strip()
                if line.startswith("pcbmerge ") or line == "pcbmerge":
                    out.append((f"{page.relative_to(REPO)}:{line_no + start + 1}", line))
                i += 1
    return out


def command_problems(line: str) -> list[str]:
    """What is wrong with a shown command line: an unknown subcommand, a flag the
    subcommand lacks, or a line click would refuse (a missing value, a bad choice)."""
    import click
    import typer

    # typer 0.29 parses with its own copy of click, whose errors derive from TyperException.
    usage_errors = tuple(c for c in (getattr(typer, "TyperException", None),
                                     click.ClickException) if c is not None)
    # `[--workers 2]` marks an optional part; `# ...` is a shell comment.
    words = [w.strip("[]") for w in shlex.split(line, comments=True)]
    words = [w for w in words if w]
    commands = hooks.commands()
    if len(words) < 2:
        return []  # `pcbmerge` alone prints the help
    name, args = words[1], words[2:]
    if name not in commands:
        return [f"no subcommand '{name}' (known: {', '.join(commands)})"]
    command = commands[name]
    flags = hooks.command_flags(command)
    problems = [f"'pcbmerge {name}' has no option {w.split('=')[0]}"
                for w in args if w.startswith("-") and not _is_number(w)
                and w.split("=")[0] not in flags]
    if not problems:
        try:
            command.make_context(f"pcbmerge {name}", list(args))
        except usage_errors as e:
            message = e.format_message() if hasattr(e, "format_message") else str(e)
            problems.append(f"'pcbmerge {name}' refuses it: {message}")
    return problems


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def shown_recipes() -> list[tuple[str, str]]:
    """Every fenced ```yaml block of the README and the pages: (where, text)."""
    return [(f"{page.relative_to(REPO)}:{line_no}", body) for page in PAGES
            for lang, body, line_no in fenced_blocks(page) if lang == "yaml"]


def check_recipe_file(path: Path) -> str:
    """Run the checks `pcbmerge validate` makes before it opens a model; the kind's name."""
    kind, _, loaded = _read(path)
    if kind.name == "merge":
        try:
            check_merge_recipe(loaded[0])
        except RecipeError as e:
            raise RecipeError(f"{path}: {e}") from None
    return kind.name


def make_ancestors(data: Any, root: Path) -> None:
    """`de-ancestor` globs its checkpoints when the recipe is read: give each pattern three
    matches under `root` (the working directory), as a run's epochs would be."""
    spec = data.get("ancestors") if isinstance(data, dict) else None
    patterns = [spec["glob"]] if isinstance(spec, dict) else [spec] if isinstance(spec, str) \
        else list(spec or [])
    for pattern in patterns:
        for i in (1, 2, 10):
            (root / pattern.replace("*", str(i))).mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------- the site


def build_site(site_dir: Path, **overrides: Any) -> None:
    from mkdocs.commands.build import build
    from mkdocs.config import load_config

    config = load_config(str(REPO / "mkdocs.yml"), site_dir=str(site_dir), strict=True,
                         **overrides)
    build(config)


def test_the_site_builds_in_strict_mode(tmp_path: Path) -> None:
    build_site(tmp_path / "site")
    for page in DOCS.rglob("*.md"):
        rel = page.relative_to(DOCS).with_suffix("")
        out = tmp_path / "site" / (rel.parent if rel.name == "index" else rel) / "index.html"
        assert out.is_file(), out
    # The generated pages hold what the code holds, not a copy made once.
    cli_html = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    for name, command in hooks.commands().items():
        assert f"pcbmerge {name}" in cli_html
        for param in command.params:
            shown = param.opts[0] if param.param_type_name == "option" else param.name.upper()
            assert shown in cli_html, (name, shown)
    recipes_html = (tmp_path / "site" / "reference" / "recipes" / "index.html").read_text()
    for method in all_methods():
        assert f'id="{method.name}"' in recipes_html, method.name
        for p in method.parameters:
            assert f"<code>{p['name']}</code>" in recipes_html, (method.name, p["name"])


def test_every_recipe_kind_is_in_the_generated_reference() -> None:
    assert {kind for kind, *_ in hooks.recipe_kinds()} == set(KINDS)
    page = hooks.render_recipes()
    for _, _, schema, params in hooks.recipe_kinds():
        for model in (schema, *(m for _, m in params)):
            for key in model.model_fields:
                assert f"`{key}`" in page, (model.__name__, key)


def test_the_generated_cli_page_follows_the_app(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new option shows up in the page at the next build, with its help and default."""
    import typer

    from mergekit_pcb import cli

    def extra(name: str = typer.Option("x", "--flavour", help="a flavour of test")) -> None:
        """An extra command."""

    app = typer.Typer()
    app.registered_commands = list(cli.app.registered_commands)
    app.command("extra-for-test")(extra)
    monkeypatch.setattr(cli, "app", app)
    page = hooks.render_cli()
    assert "## pcbmerge extra-for-test" in page
    assert "| `--flavour` | `x` | a flavour of test |" in page


@pytest.mark.parametrize("link", ["missing-page.md", "reference/cli.md#pcbmerge-no-such"])
def test_a_broken_link_fails_the_build(tmp_path: Path, link: str,
                                       caplog: pytest.LogCaptureFixture) -> None:
    from mkdocs.exceptions import Abort

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text(
        "# Home\n\n[cli](reference/cli.md) [recipes](reference/recipes.md)\n"
        f"[broken]({link})\n")
    nav = [{"Home": "index.md"}, {"CLI": "reference/cli.md"},
           {"Recipes": "reference/recipes.md"}]
    with caplog.at_level(logging.WARNING, logger="mkdocs"), pytest.raises(Abort):
        build_site(tmp_path / "site", docs_dir=str(docs), nav=nav)
    assert any(link.split("#")[-1] in r.getMessage() for r in caplog.records), caplog.text


# ---------------------------------------------------------------- commands shown


def test_commands_are_shown_for_every_subcommand_that_needs_one() -> None:
    found = {shlex.split(line, comments=True)[1] for _, line in shown_commands()}
    assert {"run", "validate", "methods", "inspect", "evolve", "eval", "restore"} <= found


@pytest.mark.parametrize(("where", "line"), shown_commands(),
                         ids=[w for w, _ in shown_commands()])
def test_shown_command_exists_with_its_flags(where: str, line: str) -> None:
    assert command_problems(line) == [], f"{where}: {line}"


@pytest.mark.parametrize(("line", "problem"), [
    ("pcbmerge merge recipe.yaml -o out", "no subcommand 'merge'"),
    ("pcbmerge run recipe.yaml -o out --worker 2", "has no option --worker"),
    ("pcbmerge validate recipe.yaml --trust-code", "has no option --trust-code"),
    ("pcbmerge evolve r.yaml --executor spark", "refuses it"),
    ("pcbmerge run", "refuses it: Missing argument"),
    ("pcbmerge run r.yaml out --threads many", "refuses it: Invalid value"),
])
def test_a_wrong_command_is_caught(line: str, problem: str) -> None:
    problems = command_problems(line)
    assert len(problems) == 1 and problem in problems[0], problems


# ---------------------------------------------------------------- recipes shown


def test_recipes_are_shown_for_every_kind_of_example(tmp_path: Path) -> None:
    kinds = set()
    for i, (_, text) in enumerate(shown_recipes()):
        path = tmp_path / f"shown-{i}.yaml"
        path.write_text(text)
        kinds.add(check_recipe_file(path))
    assert {"merge", "search", "coefficient-search", "reprogram"} <= kinds


@pytest.mark.parametrize(("where", "text"), shown_recipes(),
                         ids=[w for w, _ in shown_recipes()])
def test_shown_recipe_is_valid(where: str, text: str, tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    try:
        check_recipe_file(path)
    except RecipeError as e:
        pytest.fail(f"{where}: {e}")


RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_example_recipe_is_valid(path: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative globs and paths resolve here, as for a user
    make_ancestors(yaml.safe_load(path.read_text()), tmp_path)
    check_recipe_file(path)


README_MERGE = """\
merge_method: ties
base_model: base
models:
  - model: ./a
    parameters: {weight: 1.0, density: 0.5}
parameters: {lambda: 1.0}
"""
README_SEARCH = """\
merge_method: evolver
base_model: base
models: [{model: a}, {model: b}]
parameters: {generations: 2, F: 0.5}
merge: {merge_method: ties, parameters: {density: 0.5}}
fitness: {type: callable, function: "pkg.mod:score"}
"""


@pytest.mark.parametrize(("text", "fault"), [
    (README_MERGE, None),
    (README_SEARCH, None),
    (README_MERGE.replace("parameters: {lambda", "paramters: {lambda"),
     "unknown key 'paramters'"),
    (README_MERGE.replace("merge_method: ties", "merge_method: tiez"),
     "unknown method 'tiez'"),
    (README_MERGE.replace("density: 0.5", "densty: 0.5"),
     "models[0].parameters.densty: unknown parameter for ties"),
    (README_MERGE.replace("lambda: 1.0", "lambda: .nan"), "parameters.lambda"),
    (README_SEARCH.replace("F: 0.5", "F: 0.5, mutaton: rand-1"),
     "unknown key 'parameters.mutaton'"),
    (README_SEARCH.replace("density: 0.5", "densty: 0.5"),
     "merge.parameters.densty: unknown parameter for ties"),
])
def test_a_broken_recipe_is_caught(text: str, fault: str | None, tmp_path: Path) -> None:
    """The check above passes a good recipe and fails each broken one, naming the key."""
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    if fault is None:
        check_recipe_file(path)
        return
    with pytest.raises(RecipeError, match=re.escape(fault)):
        check_recipe_file(path)


def test_readme_is_short_and_keeps_the_ci_command() -> None:
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    lines = text.splitlines()
    command = lines[next(i for i, x in enumerate(lines) if x.startswith("# 2. ")) + 1]
    assert command == ('pip install torch==2.13.0 && pip install -e ".[test]" && pip install '
                       '--no-deps spikingjelly==2.0.0 loguru && python -m pytest -q')
    assert "mkdocs build --strict" in text


def test_every_method_is_in_the_readme_table_with_a_page() -> None:
    text = (REPO / "README.md").read_text()
    for method in all_methods():
        m = re.search(rf"^\| \[`{re.escape(method.name)}`\]\((docs/[^)#]+)\)", text, re.M)
        assert m, method.name
        assert (REPO / m.group(1)).is_file(), m.group(1)


def test_readme_links_reach_files_and_headings() -> None:
    """The README is read on the forge, outside the site: its links are checked here."""
    import markdown

    text = (REPO / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if "://" in link:
            continue
        target, _, anchor = link.partition("#")
        path = REPO / target
        assert path.is_file(), link
        if anchor:
            md = markdown.Markdown(extensions=["toc"])
            md.convert(path.read_text())
            ids: set[str] = set()
            stack = list(md.toc_tokens)  # type: ignore[attr-defined]
            while stack:
                token = stack.pop()
                ids.add(token["id"])
                stack += token["children"]
            assert anchor in ids, link
