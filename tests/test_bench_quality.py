"""scripts/bench_quality.py and scripts/quality_fitness.py on a tiny random BERT: splits,
recipes, the fitness and its cache, one grid run through `pcbmerge run`. No data packages,
no network; a few seconds."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_quality as bq  # noqa: E402
import quality_fitness as qf  # noqa: E402

# The paired-differences test reads the grid run's output: under pytest-xdist the module's
# tests stay in one worker, in order (a worker of its own would skip it).
pytestmark = pytest.mark.xdist_group("bench_quality")


def fake_tokenizer(texts: list[str], truncation: bool = True, max_length: int = 64) -> dict:
    return {"input_ids": [[2 + ord(c) % 90 for c in t[:max_length]] for t in texts]}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> bq.Work:
    import transformers as tf

    root = tmp_path_factory.mktemp("quality")
    args = argparse.Namespace(seed=0, select=8, test=8, generations=1, pop=4)
    w = bq.Work(root, args)
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64)
    base = tf.BertModel(cfg).eval()
    base.save_pretrained(w.base)
    for i, task in enumerate(bq.TASKS):
        torch.manual_seed(i + 1)
        tuned = tf.BertModel(cfg)
        tuned.load_state_dict(base.state_dict())
        with torch.no_grad():
            for name, p in tuned.named_parameters():
                if not name.startswith(("embeddings.", "pooler.")):
                    p.add_(0.05 * torch.randn_like(p))
        tuned.save_pretrained(w.model(task))
        head = torch.nn.Linear(32, 2)
        save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()},
                  str(w.head(task)))
    rng = torch.Generator().manual_seed(0)
    words = ["good", "bad", "plot", "news", "cats", "law", "food", "code"]
    splits = {t: {part: [[" ".join(words[int(j)] for j in torch.randint(8, (6,), generator=rng)),
                          k % 2] for k in range(8)] for part in ("select", "test")}
              for t in bq.TASKS}
    bq.write_eval_file(w.select, splits, "select", fake_tokenizer)
    bq.write_eval_file(w.test, splits, "test", fake_tokenizer)
    return w


def test_split_balanced_is_seeded_disjoint_and_balanced() -> None:
    classes = {"a": [f"a{i}" for i in range(50)], "b": [f"b{i}" for i in range(80)]}
    s1 = bq.split_balanced(classes, 10, 20, seed=3, train_cap=1000)
    s2 = bq.split_balanced(classes, 10, 20, seed=3, train_cap=1000)
    assert s1 == s2
    for part, n in (("select", 10), ("test", 20), ("train", 2 * 35)):
        assert len(s1[part]) == n
        assert sum(y for _, y in s1[part]) == n // 2
    texts = [set(t for t, _ in s1[p]) for p in ("select", "test", "train")]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])


def test_grid_and_recipe() -> None:
    specs = {s.slug: s for s in bq.method_specs([0.3, 1.0], [0.2, 0.5])}
    assert len(bq.grid_points(specs["average"])) == 1
    assert len(bq.grid_points(specs["task_arithmetic"])) == 2
    assert len(bq.grid_points(specs["pcb_global"])) == 4
    w = argparse.Namespace(base=Path("/b"), model=lambda t: Path(f"/m/{t}"),
                           args=argparse.Namespace(seed=0))
    r = bq.merge_recipe(w, "pcb", {"scope": "global", "lambda": 1.0, "density": 0.2})
    assert r["parameters"] == {"scope": "global", "lambda": 1.0}
    assert all(m["parameters"]["density"] == 0.2 for m in r["models"])
    assert r["tensors"] == bq.FROZEN_RULES


def test_fitness_scores_and_caches(work: bq.Work) -> None:
    state = qf.load_checkpoint(work.model("topic"))
    acc = qf.evaluate(state, work.select)
    assert set(acc) == set(bq.TASKS) and all(0 <= a <= 1 for a in acc.values())
    assert qf.score(state, work.select) == pytest.approx(sum(acc.values()) / 4)
    cached = list((work.root / "cache" / "eval").glob("*.json"))
    assert any(json.loads(c.read_text())["acc"] == acc for c in cached)
    other = dict(state)
    name = next(k for k in other if k.startswith("encoder."))
    other[name] = other[name] + 1.0
    assert qf.state_digest(other) != qf.state_digest(state)


def test_grid_runs_pcbmerge(work: bq.Work) -> None:
    spec = bq.MethodSpec("PCB (global)", "pcb_global", "pcb",
                         {"scope": "global", "clip": 0.01, "inter": "consensus"},
                         {"lambda": [1.0], "density": [0.5]})
    res = bq.run_grid(work, spec)
    assert res["chosen"] == {"lambda": 1.0, "density": 0.5}
    assert set(res["test"]) == set(bq.TASKS)
    recipe = yaml.safe_load(Path(res["recipe"]).read_text())
    assert recipe["merge_method"] == "pcb" and recipe["parameters"]["scope"] == "global"
    merged = qf.load_checkpoint(Path(res["output"]))
    base = qf.load_checkpoint(work.base)
    for name in merged:
        if name.startswith(("embeddings.", "pooler.")):
            assert torch.equal(merged[name], base[name])


def test_paired_differences_of_equal_models_are_zero(work: bq.Work) -> None:
    out = work.root / "merges" / "pcb_global" / "best"
    if not out.is_dir():
        pytest.skip("needs test_grid_runs_pcbmerge's output")
    rows = [{"label": "average", "output": str(out)}, {"label": "TIES", "output": str(out)}]
    lines, data = bq.paired_differences(work, rows, resamples=50)
    assert data["average"]["TIES"] == (0.0, 0.0, 0.0)
    assert any("Δ vs TIES" in line for line in lines)
