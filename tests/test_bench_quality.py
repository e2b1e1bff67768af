"""The merge-quality benchmark's own pieces (scripts/bench_quality.py, quality_text.py,
quality_fitness.py) on a tiny random BERT family: splits, the selection rule, the
normalization, the paired intervals, the guard split. No data packages; a few seconds."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import bench_quality as bq  # noqa: E402
import quality_fitness as qf  # noqa: E402
import quality_text as qt  # noqa: E402
from quality_family import Family, paths  # noqa: E402

TASKS = ("alpha", "beta", "gamma")
# The module's tests share a tiny family built once (a module-scoped fixture): one worker.
pytestmark = pytest.mark.xdist_group("bench_quality")


def fake_tokenizer(texts: list[str], truncation: bool = True, max_length: int = 64) -> dict:
    return {"input_ids": [[2 + ord(c) % 90 for c in t[:max_length]] for t in texts]}


def tiny_family() -> Family:
    return Family(name="tiny", title="tiny BERT", tasks=TASKS,
                  task_titles={t: t for t in TASKS}, fitness="quality_fitness",
                  frozen_rules=({"filter": "pooler.", "take": "base"},),
                  prepare=lambda root, args: {}, describe=lambda args: "tiny")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> bq.Run:
    import transformers as tf

    root = tmp_path_factory.mktemp("quality")
    args = argparse.Namespace(seed=0, generations=1, pop=4, coef_budget=0)
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=64)
    base = tf.BertModel(cfg).eval()
    base.save_pretrained(paths(root)["base"])
    (root / "heads").mkdir()
    for i, task in enumerate(TASKS):
        torch.manual_seed(i + 1)
        tuned = tf.BertModel(cfg)
        tuned.load_state_dict(base.state_dict())
        with torch.no_grad():
            for name, p in tuned.named_parameters():
                if not name.startswith("pooler."):
                    p.add_(0.05 * torch.randn_like(p))
        tuned.save_pretrained(root / "models" / task)
        head = torch.nn.Linear(32, 2)
        save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()},
                  str(root / "heads" / f"{task}.safetensors"))
    rng = torch.Generator().manual_seed(0)
    words = ["good", "bad", "plot", "news", "cats", "law", "food", "code"]
    splits = {t: {part: [[" ".join(words[int(j)] for j in torch.randint(8, (6,), generator=rng)),
                          k % 2] for k in range(10)] for part in ("select", "test")}
              for t in TASKS}
    qt.write_eval_file(paths(root)["select"], splits, "select", fake_tokenizer)
    qt.write_eval_file(paths(root)["test"], splits, "test", fake_tokenizer)
    return bq.Run(tiny_family(), root, qf, args)


def test_split_balanced_is_seeded_disjoint_and_balanced() -> None:
    classes = {"a": [f"a{i}" for i in range(50)], "b": [f"b{i}" for i in range(80)]}
    s1 = qt.split_balanced(classes, 10, 20, seed=3, train_cap=1000)
    assert s1 == qt.split_balanced(classes, 10, 20, seed=3, train_cap=1000)
    assert s1 != qt.split_balanced(classes, 10, 20, seed=4, train_cap=1000)
    for part, n in (("select", 10), ("test", 20), ("train", 2 * 35)):
        assert len(s1[part]) == n
        assert sum(y for _, y in s1[part]) == n // 2
    texts = [{t for t, _ in s1[p]} for p in ("select", "test", "train")]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])


def test_build_splits_keeps_held_out_texts_out_of_other_tasks_training() -> None:
    shared = [f"review {i}" for i in range(100)]
    classes = {"one": {"x": shared[:50], "y": shared[50:]},
               "two": {"p": [f"plot {i}" for i in range(100)], "r": list(shared)}}
    tasks = qt.build_splits(classes, n_select=20, n_test=40, seed=0, train_cap=1000)
    held_one = {t for part in ("select", "test") for t, _ in tasks["one"][part]}
    assert held_one and not held_one & {t for t, _ in tasks["two"]["train"]}
    # the caps: at most 15 % / 30 % of the smallest class per class (50 -> 7 and 15)
    assert len(tasks["one"]["select"]) == 2 * 7 and len(tasks["one"]["test"]) == 2 * 15


def test_every_row_has_one_point_or_the_common_grid_size() -> None:
    specs = bq.method_specs()
    assert len({s.slug for s in specs}) == len(specs)
    from mergekit_pcb.methods import REGISTRY

    for spec in specs:
        assert spec.merge_method in REGISTRY
        assert len(bq.grid_points(spec)) in (1, bq.GRID_SIZE), spec.slug
    spec = next(s for s in specs if s.slug == "pcb_global")
    recipe = bq.merge_recipe(tiny_family(), Path("/r"), spec, {"lambda": 1.0, "density": 0.2}, 0)
    assert recipe["parameters"] == {"scope": "global", "clip": 0.01, "inter": "consensus",
                                    "lambda": 1.0}
    assert [m["parameters"] for m in recipe["models"]] == [{"weight": 1.0, "density": 0.2}] * 3
    assert recipe["tensors"] == [{"filter": "pooler.", "take": "base"}]


def test_post_processing_parameters_go_to_their_step() -> None:
    spec = next(s for s in bq.method_specs() if s.slug == "pcb_global_lines")
    recipe = bq.merge_recipe(tiny_family(), Path("/r"), spec, {"density": 0.1, "lines.b": 0.6}, 0)
    assert recipe["postprocess"] == [{"lines": {"b": 0.6}}]
    assert "lines.b" not in recipe["parameters"]
    assert spec.postprocess == ({"lines": {}},)  # the spec's own steps are left as they were
    svc = next(s for s in bq.method_specs() if s.slug == "pcb_global_svc")
    assert bq.merge_recipe(tiny_family(), Path("/r"), svc, {"lambda": 1.0, "density": 0.1},
                           0)["postprocess"] == [{"svc": {"alpha": 0.1}}]


def test_conv_variants_are_the_spectral_rows_with_conv_as_matrix() -> None:
    variants = {v.slug: v for v in bq.conv_variants(bq.method_specs())}
    assert set(variants) == {"tsv_m_conv", "iso_c_conv", "iso_cts_conv", "cart_conv",
                             "wudi_conv"}
    assert variants["tsv_m_conv"].fixed == {"conv": "matrix"}
    assert variants["wudi_conv"].fixed == {"conv": "matrix", "matrices": "all_2d"}
    assert variants["cart_conv"].grid == {"rank_ratio": [0.08, 0.16], "lambda": [1.5, 2.0]}


def test_all_2d_variants_are_cart_and_wudi() -> None:
    variants = {v.slug: v for v in bq.all_2d_variants(bq.method_specs())}
    assert set(variants) == {"cart_all2d", "wudi_all2d"}
    assert variants["wudi_all2d"].fixed == {"matrices": "all_2d"}


def test_normalized_average_by_hand() -> None:
    own = {"a": 0.8, "b": 0.5}
    assert bq.normalized({"a": 0.4, "b": 0.5}, own) == pytest.approx((0.5 + 1.0) / 2)


def test_fitness_scores_and_caches(run: bq.Run) -> None:
    state = qf.load_checkpoint(run.root / "models" / "beta")
    acc = qf.evaluate(state, run.select)
    right = qf.correctness(state, run.select)
    assert acc == {t: float(right[t].float().mean()) for t in TASKS}
    assert qf.score(state, run.select) == pytest.approx(sum(acc.values()) / 3)
    cached = list((run.root / "cache" / "eval").glob("*.json"))
    assert any(json.loads(c.read_text())["acc"] == acc for c in cached)


class Spy:
    """The fitness module, recording which data file each evaluation read."""

    def __init__(self) -> None:
        self.reads: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(qf, name)

    def evaluate_timed(self, state: Any, data: Path) -> Any:
        self.reads.append(Path(data).name)
        return qf.evaluate_timed(state, data)

    def evaluate(self, state: Any, data: Path) -> Any:
        self.reads.append(Path(data).name)
        return qf.evaluate(state, data)


def test_selection_reads_validation_only_then_test_once(run: bq.Run) -> None:
    spy = Spy()
    spied = bq.Run(run.fam, run.root, spy, run.args)  # type: ignore[arg-type]
    spec = bq.MethodSpec("TIES", "ties", "ties", {"normalize": True},
                         {"lambda": [0.5, 1.0], "density": [0.5]})
    res = bq.run_grid(spied, spec)
    assert spy.reads == ["select.safetensors"] * 2 + ["test.safetensors"]
    best = max(res["trials"], key=lambda tr: tr["select_mean"])
    assert res["chosen"] == best["params"]
    assert res["test"] == qf.evaluate(qf.load_checkpoint(Path(res["output"])), run.test)
    recipe = yaml.safe_load(Path(res["recipe"]).read_text())
    merged = qf.load_checkpoint(Path(res["output"]))
    base = qf.load_checkpoint(paths(run.root)["base"])
    assert recipe["merge_method"] == "ties"
    assert all(torch.equal(merged[n], base[n]) for n in merged if n.startswith("pooler."))


def test_paired_intervals(run: bq.Run, tmp_path: Path) -> None:
    import transformers as tf

    beta, gamma = run.root / "models" / "beta", tmp_path / "unrelated"
    torch.manual_seed(99)  # an encoder unrelated to the family's: other predictions
    tf.BertModel(tf.AutoConfig.from_pretrained(paths(run.root)["base"])).save_pretrained(gamma)
    rows = [{"label": "task arithmetic", "output": str(gamma)},
            {"label": "PCB (global)", "output": str(gamma)},
            {"label": "beta alone", "output": str(beta)}]
    own = {t: 0.5 for t in TASKS}
    paired = bq.paired_intervals(run, rows, own, resamples=200)
    assert paired["PCB (global)"]["task arithmetic"] == (0.0, 0.0, 0.0)
    a = qf.correctness(qf.load_checkpoint(beta), run.test)
    b = qf.correctness(qf.load_checkpoint(gamma), run.test)
    by_hand = sum(float((a[t].float() - b[t].float()).mean()) / 0.5 for t in TASKS) / 3
    point, lo, hi = paired["beta alone"]["task arithmetic"]
    assert point == pytest.approx(by_hand) and lo <= point <= hi
    assert by_hand != 0  # the two models differ on the test rows: the check has teeth


def test_guard_split_of_the_validation_file(run: bq.Run) -> None:
    from safetensors.torch import load_file

    fit_path, guard_path = bq.split_select(run)
    whole, fit, guard = (load_file(str(p)) for p in (run.select, fit_path, guard_path))
    for t in TASKS:
        n, nf, ng = (len(x[f"{t}/labels"]) for x in (whole, fit, guard))
        assert nf + ng == n and ng == 2 * round(bq.GUARD_FRACTION * n / 2)  # per label
        rows = [{tuple(r.tolist()) for r in x[f"{t}/input_ids"]} for x in (fit, guard, whole)]
        assert rows[0] | rows[1] == rows[2]
    assert qf.evaluate(qf.load_checkpoint(paths(run.root)["base"]), guard_path).keys() == \
        set(TASKS)
