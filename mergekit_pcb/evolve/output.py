"""What an evolution run leaves behind: the model (written like a merge), `evolution.json`,
a model card, the fitness curve as a PNG, and the tables shown on the terminal."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.table import Table

from mergekit_pcb import __version__
from mergekit_pcb.io.artifacts import RECIPE_FILE, TOKENIZER_FILES
from mergekit_pcb.io.reader import iter_config_files
from mergekit_pcb.io.resolve import resolve_model_path

EVOLUTION_JSON = "evolution.json"
CURVE_PNG = "fitness.png"


@dataclass(frozen=True)
class ScoreRow:
    label: str
    model: str
    select: float | None
    report: float | None


def clean(value: Any) -> Any:
    """JSON without NaN/Infinity (null instead), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def fmt(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"


def model_dir(ref: str) -> Path:
    path = resolve_model_path(ref)
    return path if path.is_dir() else path.parent


def copy_artifacts(config_ref: str, tokenizer_ref: str | None, out: Path) -> None:
    """config.json / generation_config.json and tokenizer files, as a merge copies them."""
    src = model_dir(config_ref)
    for path in iter_config_files(src):
        shutil.copyfile(path, out / path.name)
    tok = model_dir(tokenizer_ref) if tokenizer_ref else src
    for name in TOKENIZER_FILES:
        if (tok / name).is_file():
            shutil.copyfile(tok / name, out / name)


def evolution_document(state: dict[str, Any], *, recipe_name: str | None, mode: str,
                       mutation: str, pop: int, seed: int, workers: int, metric: str,
                       maximize: bool, merge_method: str | None,
                       scores: Sequence[ScoreRow]) -> dict[str, Any]:
    history = state["history"]
    return clean({
        "method": "evolver", "name": recipe_name, "mode": mode, "mutation": mutation,
        "pop": pop, "generations": state["generation"], "seed": seed, "workers": workers,
        "merge_method": merge_method, "metric": metric, "maximize": maximize,
        "initial": state["initial"],
        "final": {"objective": state["objective"], "members": state["members"],
                  "fitness": state["fitness"]},
        "history": history,
        "scores": [{"label": r.label, "model": r.model, "select": r.select,
                    "report": r.report} for r in scores],
        "totals": {
            "evaluations": state["evaluations"],
            "speculative_discarded": state["discarded"],
            "fitness_s": state["fitness_s"],
            "wall_s": sum(h["wall_s"] for h in history),
        },
    })


def history_table(history: Sequence[dict[str, Any]], metric: str, title: str | None = None,
                  current: dict[str, Any] | None = None) -> Table:
    table = Table("gen", f"objective ({metric})", "best member", "mean member", "accepted",
                  "F", "CR", "wall s", title=title, title_justify="left")
    for h in history:
        acc = (f"{h['accepted']}/{h['evaluated']}" if h["generation"] else "initial")
        table.add_row(str(h["generation"]), fmt(h["objective"]), fmt(h["best"]),
                      fmt(h["mean"]), acc, fmt(h["F"]), fmt(h["CR"]), f"{h['wall_s']:.1f}")
    if current is not None:
        table.add_row(*[str(v) for v in current.values()], style="dim")
    return table


def scores_table(rows: Sequence[ScoreRow], metric: str, maximize: bool) -> Table:
    direction = "higher" if maximize else "lower"
    table = Table("model", f"select {metric}", f"report {metric}",
                  title=f"Scores ({direction} is better; the search saw only select)",
                  title_justify="left")
    for r in rows:
        table.add_row(r.label, fmt(r.select), fmt(r.report))
    return table


def write_curve(history: Sequence[dict[str, Any]], metric: str, path: Path) -> bool:
    """The fitness curve as a PNG; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    gens = [h["generation"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("objective", "-o"), ("best", "--"), ("mean", ":")):
        values = [h[key] if h[key] is not None else math.nan for h in history]
        ax.plot(gens, values, style, label=key)
    ax.set_xlabel("generation")
    ax.set_ylabel(f"select {metric}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def model_card(*, recipe_text: str, recipe_name: str | None, base_model: str | None,
               models: Sequence[str], mode: str, merge_method: str | None, seed: int,
               pop: int, generations: int, metric: str, scores: Sequence[ScoreRow],
               history: Sequence[dict[str, Any]]) -> str:
    front: dict[str, Any] = {"library_name": "transformers",
                             "tags": ["merge", "mergekit-pcb", "evolver"]}
    if base_model:
        front["base_model"] = [base_model]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", ""]
    lines.append(f"# {recipe_name or 'Evolved model'}")
    lines.append("")
    inner = f", inner merge **{merge_method}**" if merge_method else ""
    lines.append(f"Evolved with mergekit-pcb {__version__} using **evolver** (mode {mode}"
                 f"{inner}; population {pop}, {generations} generations, seed {seed}).")
    lines += ["", "## Inputs", ""]
    if base_model:
        lines.append(f"- base: `{base_model}`")
    lines += [f"- `{m}`" for m in models]
    lines += ["", f"## Scores ({metric})", "", "| model | select | report |", "|---|---|---|"]
    lines += [f"| {r.label} | {fmt(r.select)} | {fmt(r.report)} |" for r in scores]
    lines += ["", "Selection used only the `select` data; `report` was never seen by the "
              "search.", "", "## Fitness per generation", "",
              "| generation | objective | best | mean | accepted |", "|---|---|---|---|---|"]
    for h in history:
        lines.append(f"| {h['generation']} | {fmt(h['objective'])} | {fmt(h['best'])} | "
                     f"{fmt(h['mean'])} | {h['accepted']}/{h['evaluated']} |")
    lines += ["", "## Recipe", "", "```yaml", recipe_text.rstrip(), "```", ""]
    return "\n".join(lines)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


__all__ = ["CURVE_PNG", "EVOLUTION_JSON", "RECIPE_FILE", "ScoreRow", "copy_artifacts",
           "evolution_document", "history_table", "model_card", "scores_table",
           "write_curve", "write_json"]
