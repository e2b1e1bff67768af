"""scripts/bench_analyze_quality.py on a fake quality benchmark (a base, four tasks, three
cached rows, one of them a search): the rows read from their caches in the table's order,
each task's alignment against a float64 numpy reference (per group, then the mean over
groups, conv kernels as matrices), the accuracy kept against the references, Spearman's ρ
against ranks computed here, and the per-row cache."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import write_recipe
from safetensors.torch import save_file

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_analyze_quality as baq  # noqa: E402
from quality_family import Family  # noqa: E402

TASKS = ("alpha", "beta", "gamma", "delta")
SHAPES = {"layers.0.w": (8, 6), "layers.1.w": (6, 8), "layers.1.conv": (4, 2, 3, 3),
          "layers.1.bias": (6,)}


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    path.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    return path


def _row(root: Path, slug: str, method: str, coef: list[float], taus: list[dict],
         base: dict, test: list[float], search: bool = False) -> dict[str, Any]:
    """A cached row whose scored merge is base + Σ cᵢ τᵢ (any merge will do: the script
    reads it with --merged)."""
    out = _save({k: base[k] + sum(c * t[k] for c, t in zip(coef, taus, strict=True))
                 for k in base}, root / "merges" / slug / "best")
    recipe = write_recipe(root / f"{slug}.yaml", {
        "merge_method": method, "base_model": str(root / "models" / "base"),
        "models": [{"model": str(root / "models" / t),
                    "parameters": {"weight": 1.0, "density": 0.5} if method == "ties" else {}}
                   for t in TASKS],
        "dtype": "float32"})
    row = {"label": slug.replace("_", " "), "slug": slug, "chosen": {},
           "test": dict(zip(TASKS, test, strict=True)), "recipe": str(recipe),
           "output": str(out), "coef": coef}
    if not search:
        row["trials"] = [{}]
    cache = root / "merges" / (f"{slug}.row" if search else slug) / "row.json"
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"key": "k", "row": row}))
    return row


@pytest.fixture
def bench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
          ) -> tuple[Path, dict, list[dict], dict[str, float]]:
    g = torch.Generator().manual_seed(0)
    root = tmp_path / "work" / "tiny"
    base = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    _save(base, root / "models" / "base")
    taus = []
    for i, t in enumerate(TASKS):
        tau = {k: (0.05 + 0.05 * i) * torch.randn(s, generator=g) for k, s in SHAPES.items()}
        _save({k: base[k] + tau[k] for k in base}, root / "models" / t)
        taus.append(tau)
    own = {"alpha": 0.9, "beta": 0.8, "gamma": 0.95, "delta": 0.7}
    rows = [_row(root, "task_arithmetic", "task_arithmetic", [0.5, 0.2, 0.4, 0.1], taus, base,
                 [0.6, 0.7, 0.5, 0.65]),
            _row(root, "pcb_global", "ties", [0.9, 0.3, 0.1, 0.6], taus, base,
                 [0.85, 0.4, 0.9, 0.3]),
            _row(root, "evolver_pcb", "evolver", [0.3, 0.3, 0.8, 0.2], taus, base,
                 [0.5, 0.7, 0.8, 0.6], search=True),
            # a merge that leaves every matrix at the base: alignment 0 for every task
            _row(root, "wudi", "task_arithmetic", [0.0] * 4, taus, base, [0.4, 0.5, 0.6, 0.3])]
    # the table's order, from results.json (not the caches' order on disk)
    (tmp_path / "work" / "results.json").write_text(json.dumps({"families": {"tiny": {
        "references": {"own": own},
        "methods": [{"slug": r["slug"]} for r in rows] + [{"slug": "never_cached"}]}}}))
    family = Family(name="tiny", title="tiny", tasks=TASKS, task_titles={t: t for t in TASKS},
                    fitness="quality_fitness", frozen_rules=(), prepare=lambda r, a: {},
                    describe=lambda a: "tiny")
    monkeypatch.setattr(baq, "load_family", lambda name: family)
    return tmp_path, {"base": base, "taus": taus}, rows, own


def _ref_alignment(base: dict, taus: list[dict], coef: list[float]) -> list[float]:
    """Per task: the mean over the layers of sqrt(Σ energy inside the merged update's top-k
    left subspace / Σ energy), over each layer's matrices (the conv kernel as 4 × 18)."""
    layers: dict[str, list[str]] = {"layer 0": ["layers.0.w"],
                                    "layer 1": ["layers.1.w", "layers.1.conv"]}
    out = []
    for i in range(len(taus)):
        per_layer = []
        for names in layers.values():
            inside = total = 0.0
            for n in names:
                rows = SHAPES[n][0]
                t = [tau[n].double().numpy().reshape(rows, -1) for tau in taus]
                update = sum(c * m for c, m in zip(coef, t, strict=True))
                u, s, _ = np.linalg.svd(update, full_matrices=False)
                k = next(k for k in range(1, len(s) + 1)
                         if (s[k:] ** 2).sum() <= 0.05 ** 2 * (s ** 2).sum())
                inside += float(((u[:, :k].T @ t[i]) ** 2).sum())
                total += float((t[i] ** 2).sum())
            per_layer.append(math.sqrt(inside / total))
        out.append(sum(per_layer) / len(per_layer))
    return out


def _spearman(x: list[float], y: list[float]) -> float:
    """Pearson's r of the ranks, tied values at their mean rank."""
    def ranks(v: list[float]) -> list[float]:
        return [sum(w < a for w in v) + (sum(w == a for w in v) + 1) / 2 for a in v]

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


def test_alignment_beside_accuracy(bench: tuple[Path, dict, list[dict], dict[str, float]],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    tmp_path, model, rows, own = bench
    out = tmp_path / "out"
    table = baq.family_table("tiny", tmp_path / "work", out)
    assert [m["slug"] for m in table["methods"]] == [r["slug"] for r in rows]
    ranked = table["methods"][:3]
    for m, r in zip(ranked, rows[:3], strict=True):
        assert m["kept"] == pytest.approx([r["test"][t] / own[t] for t in TASKS])
        ref = _ref_alignment(model["base"], model["taus"], r["coef"])
        assert m["alignment"] == pytest.approx(ref, rel=1e-5)
        assert m["rho"] == pytest.approx(_spearman(ref, m["kept"]))
    assert table["methods"][3]["alignment"] == [0.0] * 4
    assert math.isnan(table["methods"][3]["rho"])  # no order: n/a, out of the pooled figures
    pooled = _spearman([a for m in ranked for a in m["alignment"]],
                       [k for m in ranked for k in m["kept"]])
    assert table["pooled"][0] == pytest.approx(pooled)
    assert table["between_methods"][0] == pytest.approx(_spearman(
        [sum(m["alignment"]) for m in ranked], [sum(m["kept"]) for m in ranked]))
    for i, (rho, _) in enumerate(table["per_task"]):
        assert rho == pytest.approx(_spearman([m["alignment"][i] for m in ranked],
                                              [m["kept"][i] for m in ranked]))
    text = "\n".join(baq.render(table))
    assert f"{ranked[0]['rho']:+.2f}" in text and "Pooled over the 12" in text
    assert "| wudi | — | 0.00 (44) |" in text and "n/a: wudi" in text

    # a second run reads every row's figures from the cache, analyzing nothing
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("analyzed again")

    monkeypatch.setattr(baq, "analyze_recipe_file", refuse)
    again = baq.family_table("tiny", tmp_path / "work", out)
    assert again["methods"] == table["methods"]
