"""What an evolution run leaves behind: the model (written like a merge), `evolution.json`,
a model card, the fitness curve as a PNG, and the tables shown on the terminal."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from mergekit_pcb.io.artifacts import model_card

EVOLUTION_JSON = "evolution.json"
CURVE_PNG = "fitness.png"


@dataclass(frozen=True)
class ScoreRow:
    label: str
    model: str
    select: float | None
    report: float | None
    guard: float | None = None  # with a guard split: what chose the result


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


def guard_test_detail(test: dict[str, Any]) -> str:
    """A committed guard test (the result against the best start) in words: the gain on
    the guard, the test's level and its interval (the population and coefficient searches'
    closing notes)."""
    return (f"{test['gain']:+.4f} on the guard, one-sided paired test at {test['level']:.0%} "
            f"(fitness.guard_level): {test['interval_level']:.0%} interval "
            f"[{test['low']:+.4f}, {test['high']:+.4f}] over {test['examples']} examples")


def evolution_document(state: dict[str, Any], *, recipe_name: str | None, method: str,
                       search: dict[str, Any], pop: int, seed: int, workers: int, metric: str,
                       maximize: bool, merge_method: str | None,
                       scores: Sequence[ScoreRow]) -> dict[str, Any]:
    """`evolution.json`; `search` is what the strategy says of itself (evolver: mode and
    mutation)."""
    history = state["history"]
    return clean({
        "method": method, "name": recipe_name, **search,
        "pop": pop, "generations": state["generation"], "seed": seed, "workers": workers,
        "merge_method": merge_method, "metric": metric, "maximize": maximize,
        "initial": state["initial"],
        "final": {"objective": state["objective"], "members": state["members"],
                  "fitness": state["fitness"],
                  # batched searches: every final member on the whole select data
                  **({"select": state["final_select"]} if "final_select" in state else {}),
                  **({"search_state": state["search"]} if "search" in state else {})},
        "history": history,
        "scores": [{"label": r.label, "model": r.model, "select": r.select,
                    **({"guard": r.guard} if "guard" in state else {}),
                    "report": r.report} for r in scores],
        **({"guard": state["guard"]} if "guard" in state else {}),
        # report(result) − report(best start), paired bootstrap over the report examples
        **({"report_interval": state["report_interval"]}
           if "report_interval" in state else {}),
        "totals": {
            "evaluations": state["evaluations"],
            "speculative_discarded": state["discarded"],
            "fitness_s": state["fitness_s"],
            "wall_s": sum(h["wall_s"] for h in history),
        },
    })


def history_table(history: Sequence[dict[str, Any]], metric: str, title: str | None = None,
                  current: dict[str, Any] | None = None, batched: bool = False) -> Table:
    # mini-batch searches score generation 0 on all of select, later ones on their batch
    objective = (f"objective ({metric}; gen 0: select, then each gen's batch)" if batched
                 else f"objective ({metric})")
    table = Table("gen", objective, "best member", "mean member", "accepted",
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
    guarded = any(r.guard is not None for r in rows)
    seen = ("trials saw only select, the guard chose the result" if guarded
            else "the search saw only select")
    columns = [f"select {metric}", *([f"guard {metric}"] if guarded else []),
               f"report {metric}"]
    table = Table("model", *columns, title=f"Scores ({direction} is better; {seen})",
                  title_justify="left")
    for r in rows:
        table.add_row(r.label, fmt(r.select), *([fmt(r.guard)] if guarded else []),
                      fmt(r.report))
    return table


Series = tuple[Sequence[float], str, str]  # values, matplotlib style, label
Reference = tuple[float, str]  # a score drawn across the plot (horizontal line), its label


def curve_figure(xs: Sequence[float], series: Sequence[Series], xlabel: str, ylabel: str,
                 references: Sequence[Reference] = ()) -> Any:
    """The matplotlib Figure of `series` against `xs`, with each reference score as a
    horizontal line; None when matplotlib is not installed. A bare Figure (no pyplot) so
    that nothing global changes and nothing needs closing."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for values, style, label in series:
        ax.plot(xs, values, style, label=label, **({"alpha": 0.5} if style == "." else {}))
    for value, label in references:
        if math.isfinite(value):  # a failed plain merge has no score to draw
            ax.axhline(value, linestyle="-.", color="gray", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_png(path: Path, xs: Sequence[float], series: Sequence[Series], xlabel: str,
             ylabel: str, references: Sequence[Reference] = ()) -> bool:
    """Line plots of `series` against `xs` as a PNG; False when matplotlib is not installed.
    Every search's curve goes through here."""
    fig = curve_figure(xs, series, xlabel, ylabel, references)
    if fig is None:
        return False
    fig.savefig(path, dpi=100)
    return True


def write_curve(history: Sequence[dict[str, Any]], metric: str, path: Path,
                plain_merge: Reference | None = None) -> bool:
    """The fitness curve as a PNG, with the plain merge of the inputs' select score as a
    reference line (what the search has to beat); False when matplotlib is not installed."""
    gens = [h["generation"] for h in history]
    series = [([h[key] if h[key] is not None else math.nan for h in history], style, key)
              for key, style in (("objective", "-o"), ("best", "--"), ("mean", ":"))]
    references = [plain_merge] if plain_merge is not None and plain_merge[0] is not None \
        else []
    return plot_png(path, gens, series, "generation", f"select {metric}", references)


def search_card(*, recipe_text: str, recipe_name: str | None, base_model: str | None,
                models: Sequence[str], method: str, mode: str, merge_method: str | None,
                seed: int, pop: int, generations: int, metric: str,
                scores: Sequence[ScoreRow], history: Sequence[dict[str, Any]],
                library_name: str = "transformers") -> str:
    inner = f", inner merge **{merge_method}**" if merge_method else ""
    inputs = ([f"- base: `{base_model}`"] if base_model else []) + [f"- `{m}`" for m in models]
    if any(r.guard is not None for r in scores):
        table = ["| model | select | guard | report |", "|---|---|---|---|"]
        table += [f"| {r.label} | {fmt(r.select)} | {fmt(r.guard)} | {fmt(r.report)} |"
                  for r in scores]
        table += ["", "Trials were kept on the `select` data; the result was chosen on the "
                  "`guard` data; `report` was never seen by the search."]
    else:
        table = ["| model | select | report |", "|---|---|---|"]
        table += [f"| {r.label} | {fmt(r.select)} | {fmt(r.report)} |" for r in scores]
        table += ["", "Selection used only the `select` data; `report` was never seen by "
                  "the search."]
    curve = ["| generation | objective | best | mean | accepted |", "|---|---|---|---|---|"]
    curve += [f"| {h['generation']} | {fmt(h['objective'])} | {fmt(h['best'])} | "
              f"{fmt(h['mean'])} | {h['accepted']}/{h['evaluated']} |" for h in history]
    return model_card(
        title=recipe_name or "Evolved model", tags=[method], base_model=base_model,
        summary=f"Evolved using **{method}** (mode {mode}{inner}; population {pop}, "
                f"{generations} generations, seed {seed})",
        sections=[("Inputs", inputs), (f"Scores ({metric})", table),
                  ("Fitness per generation", curve)],
        recipe_text=recipe_text, library_name=library_name)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


__all__ = [
    "CURVE_PNG",
    "EVOLUTION_JSON",
    "ScoreRow",
    "curve_figure",
    "evolution_document",
    "history_table",
    "plot_png",
    "scores_table",
    "search_card",
    "write_curve",
    "write_json",
]
