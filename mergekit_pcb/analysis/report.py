"""The analysis per layer, per model part and for the whole model; warnings; the report.

Every figure of a group is computed from the sums of its tensors' sufficient statistics
(`metrics.TensorStats`), so a layer's norm, cosine or distance is that of the layer's task
vectors concatenated, exactly. Spectral figures (effective rank, interference, alignment)
come from the group's 2-D tensors: the effective rank is their mean, the interference and
the aligned energy are sums.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_pcb.analysis.metrics import (
    ISO_EPSILON,
    NOISE_EPS,
    NORM_RATIO_LIMIT,
    Spectra,
    TensorStats,
    cosine_from_gram,
    effective_rank,
    norm_ratio,
)
from mergekit_pcb.analysis.run import Measured
from mergekit_pcb.engine.vocab import is_vocabulary_tensor
from mergekit_pcb.errors import OutputError
from mergekit_pcb.recipe.params import layer_index

# When a warning fires (also in the JSON, `thresholds`).
THRESHOLDS = {
    # Task-vector norms this far apart: spectral and sign-based merges collapse (WUDI on
    # ViT-B/32: 85.5 → 49.2 at 5–7×).
    "norm_ratio": NORM_RATIO_LIMIT,
    # ‖τᵢ‖/‖θ₀‖ below this: the model barely moved from the base.
    "barely_moved": 1e-4,
    # Share of the entries several tasks keep whose kept values disagree in sign.
    "sign_conflict": 0.4,
    # Share of the kept entries (elected by TIES, or kept by PCB) that one task holds.
    "dominant_share": 0.8,
}
PARTS = ("embeddings", "attention", "mlp", "norms", "head", "other")
_HEAD = ("lm_head", "embed_out", "output.weight", "decoder", "predictions", "vocab_projector",
         "output_layer", "classifier", "score.", "pooler", "qa_outputs")


def model_part(name: str) -> str:
    """Which part of a model a tensor belongs to, from its name."""
    n = name.lower()
    if "norm" in n or "ln_" in n or ".ln" in n or n.startswith("ln"):
        return "norms"
    if any(h in n for h in _HEAD) and (is_vocabulary_tensor(name) or layer_index(name) is None):
        return "head"
    if is_vocabulary_tensor(name) or "embed" in n or "wpe" in n or "wte" in n:
        return "embeddings"
    if any(a in n for a in ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj",
                            "query", "key", "value")):
        return "attention"
    if any(m in n for m in ("mlp", "ffn", "feed_forward", "intermediate", "fc", "up_proj",
                            "down_proj", "gate_proj", "output.dense", "w1", "w2", "w3")):
        return "mlp"
    return "other"


def group_of(name: str, layered: bool = True) -> str:
    """The layer a tensor belongs to (`layer N`), or its model part outside the layers; in
    a model without numbered layers (`layered` False: a small MLP), its module."""
    if not layered:
        return name.rsplit(".", 1)[0] if "." in name else name
    index = layer_index(name)
    return f"layer {index}" if index is not None else model_part(name)


@dataclass
class Group:
    """Summed statistics of a set of tensors."""

    name: str
    n: int
    tensors: int = 0
    numel: int = 0
    base_norm2: float = 0.0
    gram: torch.Tensor | None = None
    conflicts: int = 0
    used_by: list[int] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    elected: list[int] = field(default_factory=list)
    ranks: list[list[float]] = field(default_factory=list)  # per 2-D tensor, per task
    interference: float = 0.0
    interference_mass: float = 0.0
    merged_norm2: float | None = None
    distance2: list[float] | None = None
    aligned: list[float] | None = None  # energy inside the merged top-k (2-D tensors)
    aligned_of: list[float] | None = None  # the task energy of those same tensors
    merge_kept: list[int] | None = None

    def add(self, t: TensorStats) -> None:
        n = self.n
        self.tensors += 1
        self.numel += t.signs.numel
        self.base_norm2 += t.base_norm2
        self.gram = t.gram.clone() if self.gram is None else self.gram + t.gram
        self.conflicts += t.signs.conflicts
        self.used_by = _plus(self.used_by, t.signs.used_by, n + 1)
        self.kept = _plus(self.kept, t.signs.kept, n)
        self.elected = _plus(self.elected, t.signs.elected, n)
        if t.effective_rank is not None:
            self.ranks.append(t.effective_rank)
            self.interference += t.interference or 0.0
            self.interference_mass += t.interference_mass or 0.0
        if t.distance2 is not None and t.merged_norm2 is not None:
            self.merged_norm2 = (self.merged_norm2 or 0.0) + t.merged_norm2
            self.distance2 = _plus(self.distance2 or [], t.distance2, n)
        if t.aligned_energy is not None:
            self.aligned = _plus(self.aligned or [], t.aligned_energy, n)
            self.aligned_of = _plus(self.aligned_of or [], t.norm2, n)
        if t.merge_kept is not None:
            self.merge_kept = _plus(self.merge_kept or [], t.merge_kept, n)

    def summary(self, models: list[str]) -> dict[str, Any]:
        """Every figure of the group (JSON-ready: None where a figure is undefined)."""
        assert self.gram is not None
        norm2 = [float(x) for x in self.gram.diagonal()]
        norms = [math.sqrt(max(x, 0.0)) for x in norm2]
        overlap = sum(self.used_by[2:])
        out: dict[str, Any] = {
            "tensors": self.tensors,
            "numel": self.numel,
            "norms": norms,
            "relative_norms": [x / math.sqrt(self.base_norm2) if self.base_norm2 > 0 else None
                               for x in norms],
            "norm_ratio": norm_ratio(norms),
            "cosine": cosine_from_gram(self.gram).tolist(),
            "mean_cosine": _mean_pairs(cosine_from_gram(self.gram)),
            "sign_conflict": self.conflicts / overlap if overlap else None,
            "sign_conflict_of_entries": self.conflicts / self.numel if self.numel else None,
            "used_by": self.used_by,
            "used_by_share": [c / self.numel if self.numel else None for c in self.used_by],
            "kept": self.kept,
            "elected": self.elected,
            "elected_share": _shares(self.elected),
            "effective_rank": ([sum(r[i] for r in self.ranks) / len(self.ranks)
                                for i in range(self.n)] if self.ranks else None),
            "interference": self.interference if self.ranks else None,
            "interference_relative": (self.interference / self.interference_mass
                                      if self.interference_mass > 0 else None),
        }
        if self.distance2 is not None:
            out["relative_distance"] = [math.sqrt(d / x) if x > 0 else None
                                        for d, x in zip(self.distance2, norm2, strict=True)]
            out["merged_relative_norm"] = (math.sqrt((self.merged_norm2 or 0.0)
                                                     / self.base_norm2)
                                           if self.base_norm2 > 0 else None)
        if self.aligned is not None and self.aligned_of is not None:
            share = [a / x if x > 0 else None
                     for a, x in zip(self.aligned, self.aligned_of, strict=True)]
            out["energy_share"] = share
            out["alignment"] = [math.sqrt(s) if s is not None else None for s in share]
        favour = out.get("alignment") or [(-d if d is not None else None)
                                          for d in out.get("relative_distance") or []]
        if favour and any(f is not None for f in favour):
            best = max(range(self.n), key=lambda i: -math.inf if favour[i] is None
                       else favour[i])
            out["favoured"] = models[best]
        if self.merge_kept is not None:
            out["pcb_kept"] = self.merge_kept
            out["pcb_kept_share"] = _shares(self.merge_kept)
            out["pcb_kept_fraction"] = [k / self.numel if self.numel else None
                                        for k in self.merge_kept]
        return out


def _plus(a: list[Any], b: Iterable[Any], n: int) -> list[Any]:
    b = list(b)
    return [x + y for x, y in zip(a, b, strict=True)] if a else b[:n]


def _shares(counts: list[int]) -> list[float | None]:
    total = sum(counts)
    return [c / total if total else None for c in counts]


def _mean_pairs(cos: torch.Tensor) -> float | None:
    n = cos.shape[0]
    pairs = [float(cos[i, j]) for i in range(n) for j in range(i + 1, n)]
    return sum(pairs) / len(pairs) if pairs else None


def _layer_key(name: str) -> tuple[int, int]:
    """Layers in order, then the parts outside them in PARTS order."""
    if name.startswith("layer ") and name.split()[1].isdigit():
        return (1, int(name.split()[1]))
    return (0 if name == "embeddings" else 2, PARTS.index(name) if name in PARTS else 99)


def aggregate(measured: Measured) -> dict[str, Any]:
    """The whole analysis as one JSON-ready object."""
    n = len(measured.models)
    model = Group("model", n)
    layers: dict[str, Group] = {}
    parts: dict[str, Group] = {}
    tensors = []
    layered = any(layer_index(t.name) is not None for t in measured.tensors)
    for t in measured.tensors:
        model.add(t)
        layer, part = group_of(t.name, layered), model_part(t.name)
        layers.setdefault(layer, Group(layer, n)).add(t)
        parts.setdefault(part, Group(part, n)).add(t)
        one = Group(t.name, n)
        one.add(t)
        tensors.append({"name": t.name, "shape": t.shape, "group": layer, "part": part,
                        "density": t.density, "iso_rank": t.iso_rank,
                        **one.summary(measured.models)})
    report: dict[str, Any] = {
        "recipe": measured.recipe,
        "method": measured.method,
        "base": measured.base,
        "models": measured.models,
        "after": measured.after,
        "merged_dir": measured.merged_dir,
        "density_source": measured.density_source,
        "conv_matrix": measured.conv_matrix,
        "iso_epsilon": ISO_EPSILON,
        "thresholds": THRESHOLDS,
        "model": model.summary(measured.models),
        "layers": [{"name": k, **layers[k].summary(measured.models)}
                   for k in (sorted(layers, key=_layer_key) if layered else layers)],
        "parts": {k: parts[k].summary(measured.models) for k in PARTS if k in parts},
        "tensors": tensors,
        "spectrum": spectrum_json(measured.spectrum),
        "skipped": measured.skipped,
        "plan_warnings": measured.notes,
        "seconds": measured.seconds,
    }
    report["warnings"] = warnings(report, measured)
    report["suggestion"] = suggestion(report)
    return report


def spectrum_json(spectra: Spectra | None) -> dict[str, Any] | None:
    """The chosen matrix's singular values (descending, float64), as the JSON holds them."""
    if spectra is None:
        return None
    return {"tensor": spectra.name, "shape": spectra.shape, "matrix": spectra.matrix,
            "reason": spectra.reason,
            "singular_values": {"tasks": spectra.tasks, "sum": spectra.sum,
                                "merged": spectra.merged}}


def spectrum_lines(report: dict[str, Any]) -> list[tuple[str, str, list[float]]]:
    """The spectra as (kind, label, singular values): each task ("task", its short name),
    the sum ("sum") and the merged update ("merged") where measured."""
    values = report["spectrum"]["singular_values"]
    lines = [("task", name, sv) for name, sv in zip(short_names(report["models"]),
                                                     values["tasks"], strict=True)]
    lines.append(("sum", "sum", values["sum"]))
    if values["merged"] is not None:
        lines.append(("merged", "merged", values["merged"]))
    return lines


def spectrum_summary(report: dict[str, Any]) -> str:
    """One line for the terminal: the matrix, why it was chosen, each line's σ₁."""
    spec = report["spectrum"]
    tops = ", ".join(f"{label} {_fmt(s[0] if s else None)}"
                     for _, label, s in spectrum_lines(report))
    return f"spectrum of {spec['tensor']}, chosen as {spec['reason']}; σ₁: {tops}"


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}g}"


def warnings(report: dict[str, Any], measured: Measured) -> list[dict[str, str]]:
    """Each warning with its reason, one line: {"code", "message"}."""
    out: list[dict[str, str]] = []
    models = report["models"]
    whole = report["model"]

    def add(code: str, message: str) -> None:
        out.append({"code": code, "message": message})

    limit = THRESHOLDS["norm_ratio"]
    norms = whole["norms"]
    ratio = whole["norm_ratio"]
    if ratio is not None and ratio >= limit and len(norms) > 1:
        hi, lo = norms.index(max(norms)), norms.index(min(norms))
        add("norm_ratio", f"task-vector norms differ {ratio:.1f}× ({models[hi]} vs "
            f"{models[lo]}; threshold {limit:g}×): spectral and sign-based merges are known "
            "to collapse under such a mismatch; consider per-model weights that even them out")
    layer_hits = [g["name"] for g in report["layers"]
                  if g["norm_ratio"] is not None and g["norm_ratio"] >= limit]
    if layer_hits and not (ratio is not None and ratio >= limit):
        add("norm_ratio_layers", f"task-vector norms differ ≥ {limit:g}× in "
            f"{len(layer_hits)} group(s): {_listed(layer_hits)}")
    for name, rel in zip(models, whole["relative_norms"], strict=True):
        if rel is not None and rel < THRESHOLDS["barely_moved"]:
            add("barely_moved", f"{name} barely moved from the base (‖τ‖/‖θ₀‖ = {rel:.2g}, "
                f"threshold {THRESHOLDS['barely_moved']:g}): is it the right checkpoint?")
    if measured.tokenizers_differ:
        add("tokenizers_differ", f"tokenizers differ from the base's: "
            f"{', '.join(measured.tokenizers_differ)}; embedding rows of the same index are "
            "other tokens (set tokenizer_source)")
    limit = THRESHOLDS["sign_conflict"]
    conflict = [g for g in report["layers"]
                if g["sign_conflict"] is not None and g["sign_conflict"] >= limit]
    if conflict:
        worst = max(conflict, key=lambda g: g["sign_conflict"])
        add("sign_conflict", f"high sign conflict (≥ {limit:.0%} of the entries several tasks "
            f"keep) in {len(conflict)} group(s), worst {worst['name']} "
            f"{worst['sign_conflict']:.0%}: a sign election drops that much of the kept "
            "mass there")
    if len(models) > 1:
        for key, label in (("elected_share", "TIES-elected entries"),
                           ("pcb_kept_share", "entries PCB keeps")):
            limit = THRESHOLDS["dominant_share"]
            for g in report["layers"]:
                shares = g.get(key)
                if not shares or any(s is None for s in shares):
                    continue
                top = max(range(len(shares)), key=lambda i: shares[i])
                if shares[top] >= limit:
                    add("dominant_task", f"{g['name']}: {models[top]} holds "
                        f"{shares[top]:.0%} of the {label} (threshold {limit:.0%})")
    for key, label in (("elected", "no entry survives the TIES trim and sign election"),
                       ("pcb_kept", "PCB keeps no entry")):
        for g in report["layers"]:
            counts = g.get(key)
            if not counts:
                continue
            for name, c, x in zip(models, counts, g["norms"], strict=True):
                if c == 0 and x > 0:
                    add("task_dropped", f"{g['name']}: {name} is dropped entirely ({label} "
                        "at this density)")
    return out


def _listed(names: list[str], most: int = 6) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def suggestion(report: dict[str, Any]) -> dict[str, str]:
    """A method family and density to try first, from the diagnostics: a suggestion, with
    its reason, never a measurement."""
    whole = report["model"]
    ratio, conflict, cos = whole["norm_ratio"], whole["sign_conflict"], whole["mean_cosine"]
    if ratio is not None and ratio >= THRESHOLDS["norm_ratio"]:
        return {"try": "task_arithmetic or ties with per-model weights ∝ 1/‖τᵢ‖",
                "reason": f"norms differ {ratio:.1f}×: one task would dominate the merged "
                          "update, and spectral methods collapse under such a mismatch"}
    if conflict is not None and conflict >= THRESHOLDS["sign_conflict"]:
        return {"try": "ties or pcb at density 0.1–0.2",
                "reason": f"{conflict:.0%} of the entries several tasks keep disagree in "
                          "sign: a sign election resolves them, a plain sum cancels them"}
    if cos is not None and cos >= 0.5:
        return {"try": "task_arithmetic or linear",
                "reason": f"the task vectors point the same way (mean cosine {cos:.2f}): "
                          "little to resolve, and sparsifying would drop shared signal"}
    return {"try": "ties at density 0.2 (the TIES default), then pcb",
            "reason": "no strong conflict or norm mismatch measured: the defaults are a fair "
                      "start"}


# --- output ---------------------------------------------------------------------------------

def _per_task(values: list[float | None] | None, sep: str, digits: int = 3) -> str:
    return sep.join(_fmt(v, digits) for v in values) if values else "n/a"


COLUMNS: list[tuple[str, str]] = [
    ("relative_norms", "‖τ‖/‖θ₀‖"),
    ("norm_ratio", "ratio"),
    ("mean_cosine", "cos"),
    ("sign_conflict", "conflict"),
    ("effective_rank", "erank"),
    ("interference_relative", "interf."),
    ("alignment", "align"),
    ("relative_distance", "dist"),
    ("pcb_kept_share", "kept"),
    ("favoured", "favoured"),
]


def short_names(models: list[str]) -> list[str]:
    """Each model's last path component (its index where two share one)."""
    names = [Path(m).name or m for m in models]
    return names if len(set(names)) == len(names) else [f"#{i}" for i in range(len(models))]


def table_rows(report: dict[str, Any], sep: str = "\n") -> tuple[list[str], list[list[str]]]:
    """The summary table: one row per layer / part outside the layers, then the model;
    per-task figures joined by `sep`, in the models' order."""
    columns = [(k, label) for k, label in COLUMNS
               if any(g.get(k) is not None for g in report["layers"])]
    short = dict(zip(report["models"], short_names(report["models"]), strict=True))
    rows = []
    for g in [*report["layers"], {**report["model"], "name": "model"}]:
        row = [g["name"]]
        for key, _ in columns:
            v = g.get(key)
            row.append(short.get(v, v) if isinstance(v, str) else
                       _per_task(v, sep) if isinstance(v, list) else _fmt(v))
        rows.append(row)
    return ["group", *[label for _, label in columns]], rows


def markdown(report: dict[str, Any]) -> str:
    header, rows = table_rows(report, sep=" / ")
    lines = [f"# pcbmerge analyze: {report['recipe']}", "",
             f"Method `{report['method']}`, base `{report['base']}`, models "
             + ", ".join(f"`{m}`" for m in report["models"])
             + " (per-task figures in this order, separated by /).", "",
             "Columns: ‖τ‖/‖θ₀‖ how far each model moved; ratio, the largest task-vector "
             "norm over the smallest; cos, the mean pairwise cosine; conflict, the sign "
             "conflict; erank, the effective rank; interf., TSV's interference over the "
             "summed singular values; align, Iso's alignment; dist, ‖Δ − τᵢ‖/‖τᵢ‖; kept, "
             "each task's share of the entries PCB keeps.", "",
             f"Densities: {report['density_source']}. After the merge: "
             + {"merge": "the recipe's own merge, computed in memory.",
                "merged": f"read from `{report['merged_dir']}`.",
                None: "not measured."}[report["after"]], "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", "## Warnings", ""]
    lines += [f"- {w['message']}" for w in report["warnings"]] or ["- none"]
    spec = report.get("spectrum")
    if spec is not None:
        lines += ["", f"## Spectrum of `{spec['tensor']}`", "",
                  f"Chosen as {spec['reason']}. Singular values (float64) of each task "
                  "vector τᵢ, of their sum Σᵢ τᵢ (task arithmetic at λ = 1)"
                  + (" and of the merged update Δ"
                     if spec["singular_values"]["merged"] is not None else "")
                  + ", of the matrix of shape "
                  f"{' × '.join(map(str, spec['matrix']))}; every value is in report.json "
                  "(`spectrum`), the plot in spectrum.png.", "",
                  "| | σ₁ | σ₂ | σ₃ | eff. rank |", "|---|---|---|---|---|"]
        for _, label, sv in spectrum_lines(report):
            top = [_fmt(sv[i]) if i < len(sv) else "" for i in range(3)]
            lines.append(f"| {label} | {' | '.join(top)} | "
                         f"{_fmt(effective_rank(torch.tensor(sv, dtype=torch.float64)))} |")
    s = report["suggestion"]
    lines += ["", "## Suggestion (not a measurement)", "", f"Try {s['try']}: {s['reason']}.",
              "", "## How to read it", "",
              "- *‖τ‖/‖θ₀‖*: how far each model moved from the base; *norm ratio*: the "
              "largest task-vector norm over the smallest.",
              "- *sign conflict*: of the entries two or more tasks keep at the density, the "
              "share kept with both signs (TIES, PCB).",
              "- *eff. rank*: effective rank of each task matrix (Roy & Vetterli); *TSV "
              "interf.*: task singular interference over the summed singular values.",
              "- *Iso align.*: the share of each task's norm inside the merged update's top "
              f"subspace (ε = {report['iso_epsilon']}); it tracks the accuracy a task keeps. "
              "*rel. dist.*: ‖Δ − τᵢ‖/‖τᵢ‖.", ""]
    return "\n".join(lines)


# The colour scale of the figures whose range is known (shares and ratios in [0, 1], the
# cosine in [−1, 1]), fixed, so that two close values do not span the whole colour map;
# None: the figure's own range (norms, distances, ranks are not bounded).
SHARE = (0.0, 1.0)
HEATMAPS: list[tuple[str, str, str, tuple[float, float] | None]] = [
    ("relative_norms", "‖τᵢ‖/‖θ₀‖", "task", None),
    ("alignment", "Iso alignment", "task", SHARE),
    ("relative_distance", "relative distance ‖Δ−τᵢ‖/‖τᵢ‖", "task", None),
    ("elected_share", "share of TIES-elected entries", "task", SHARE),
    ("pcb_kept_share", "share of the entries PCB keeps", "task", SHARE),
    ("effective_rank", "effective rank", "task", None),
    ("cosine", "pairwise cosine", "pair", (-1.0, 1.0)),
    ("sign_conflict", "sign conflict", "scalar", SHARE),
    ("interference_relative", "TSV interference (relative)", "scalar", None)]


ANNOTATED_CELLS = 120


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend, or None where it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def heatmaps(report: dict[str, Any], directory: Path) -> list[str]:
    """One PNG per metric, layers × tasks (or pairs): written where matplotlib is
    installed; the files' names."""
    plt = _pyplot()
    if plt is None:
        return []
    models = short_names(report["models"])
    layers = report["layers"]
    names = [g["name"] for g in layers]
    written = []
    for key, title, kind, scale in HEATMAPS:
        if not any(g.get(key) is not None for g in layers):
            continue
        if kind == "pair":
            pairs = [(i, j) for i in range(len(models)) for j in range(i + 1, len(models))]
            if not pairs:
                continue
            cols = [f"{models[i]}·{models[j]}" for i, j in pairs]
            grid = [[g[key][i][j] for i, j in pairs] for g in layers]
        elif kind == "task":
            cols = models
            grid = [g.get(key) or [None] * len(models) for g in layers]
        else:
            cols = [title]
            grid = [[g.get(key)] for g in layers]
        values = [[math.nan if v is None else float(v) for v in row] for row in grid]
        fig, ax = plt.subplots(figsize=(2 + 1.2 * len(cols), 1 + 0.35 * len(names)))
        lo, hi = scale or (None, None)
        image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=lo, vmax=hi)
        ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_title(title)
        if len(names) * len(cols) <= ANNOTATED_CELLS:  # the figures themselves, where legible
            for r, row in enumerate(values):
                for c, v in enumerate(row):
                    if not math.isnan(v):
                        ax.text(c, r, f"{v:.2g}", ha="center", va="center", fontsize=8,
                                color="black" if image.norm(v) > 0.6 else "white")
        fig.colorbar(image, ax=ax)
        path = directory / f"{key}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path.name)
    return written


SPECTRUM_PNG = "spectrum.png"


def spectrum_figure(report: dict[str, Any], directory: Path) -> str | None:
    """The chosen matrix's singular values on a log scale, a line per task, the sum and
    the merged update (`SPECTRUM_PNG`); None without a spectrum or matplotlib."""
    plt = _pyplot() if report.get("spectrum") is not None else None
    if plt is None:
        return None
    spec = report["spectrum"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = spectrum_lines(report)
    for kind, label, sv in lines:
        style = ({"color": "dimgray", "linestyle": "--", "linewidth": 1.8} if kind == "sum"
                 else {"color": "black", "linewidth": 2.2} if kind == "merged"
                 else {"linewidth": 1})
        escaped = label.replace("$", r"\$")  # ($ opens mathtext)
        name = {"sum": r"sum $\Sigma_i\,\tau_i$ (task arithmetic)",
                "merged": r"merged update $\Delta$"}.get(kind, r"$\tau$ " + escaped)
        ax.plot(range(1, len(sv) + 1), sv, label=name, **style)
    top = max((x for *_, sv in lines for x in sv), default=0.0)
    if top > 0:
        ax.set_yscale("log")
        # Below the float32 rank threshold (the inputs' precision) the values are rounding
        # noise, down to 1e-18 in float64: cut there, or the noise takes the whole axis.
        floor = top * NOISE_EPS * max(spec["matrix"])
        if min((x for *_, sv in lines for x in sv if x > 0), default=top) < floor:
            ax.set_ylim(bottom=floor)
            ax.axhline(floor, color="gray", linestyle=":", linewidth=1,
                       label="float32 noise floor (values below cut off)")
    ax.set_xlabel("index i")
    ax.set_ylabel(r"singular value $\sigma_i$")
    tensor = spec["tensor"].replace("$", r"\$")
    ax.set_title(f"spectra of {tensor} ({' × '.join(map(str, spec['matrix']))})", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(True, which="major", alpha=0.3)
    path = directory / SPECTRUM_PNG
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path.name


NO_FIGURES = "<p>No heat maps: matplotlib is not installed.</p>"


def _embedded(directory: Path, names: list[str]) -> str:
    """The PNGs as <figure>s whose images are data: URLs."""
    return "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode((directory / name).read_bytes()).decode()}"></figure>'
        for name in names)


def html_page(report: dict[str, Any], directory: Path, images: list[str],
              spectrum_image: str | None = None) -> str:
    """A self-contained page: the table, the warnings, the chosen matrix's spectra, the
    suggestion and the heat maps (embedded as data: URLs, so nothing is fetched when it is
    viewed)."""
    esc = html.escape
    header, rows = table_rows(report, sep="<br>")
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{'<br>'.join(esc(x) for x in cell.split('<br>'))}"
                                    "</td>" for cell in row) + "</tr>" for row in rows)
    warned = "".join(f"<li>{esc(w['message'])}</li>" for w in report["warnings"]) \
        or "<li>none</li>"
    figures = _embedded(directory, images)
    spec = report.get("spectrum")
    spectrum = "" if spec is None else (
        f"<h2>Spectrum of <code>{esc(spec['tensor'])}</code></h2><p>Chosen as "
        f"{esc(spec['reason'])}. Singular values of each task vector, of their sum (task "
        "arithmetic) and of the merged update, on a log scale; the numbers are in "
        "report.json (<code>spectrum</code>).</p>"
        + (_embedded(directory, [spectrum_image]) if spectrum_image else
           f"<p>{esc(spectrum_summary(report))}</p>"))
    s = report["suggestion"]
    return (
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>pcbmerge analyze: {esc(report['recipe'])}</title><style>"
        "body{font-family:sans-serif;margin:1em 2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #999;padding:2px 6px;text-align:right;vertical-align:top}"
        "figure{display:inline-block;margin:0.5em}</style></head><body>"
        f"<h1>pcbmerge analyze: {esc(report['recipe'])}</h1>"
        f"<p>Method <code>{esc(report['method'])}</code> over "
        f"{esc(', '.join(report['models']))} (per-task figures in this order).</p>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
        f"<h2>Warnings</h2><ul>{warned}</ul>{spectrum}"
        f"<h2>Suggestion (not a measurement)</h2><p>Try {esc(s['try'])}: "
        f"{esc(s['reason'])}.</p><h2>Heat maps</h2>{figures or NO_FIGURES}</body></html>")


def write_report(report: dict[str, Any], directory: Path) -> list[str]:
    """report.json, report.md, the heat maps and report.html (the rest in one page) into
    `directory`; the files' names."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "report.json").write_text(json.dumps(report, indent=1))
        (directory / "report.md").write_text(markdown(report))
        images = heatmaps(report, directory)
        spectrum = spectrum_figure(report, directory)
        (directory / "report.html").write_text(html_page(report, directory, images,
                                                         spectrum))
        return ["report.json", "report.md", "report.html", *images,
                *([spectrum] if spectrum else [])]
    except OSError as e:
        raise OutputError(f"--output {directory}: {e.strerror or e}") from None


__all__ = ["HEATMAPS", "PARTS", "THRESHOLDS", "aggregate", "group_of", "heatmaps",
           "markdown", "model_part", "spectrum_figure", "spectrum_json", "spectrum_summary",
           "suggestion", "table_rows", "warnings", "write_report"]
