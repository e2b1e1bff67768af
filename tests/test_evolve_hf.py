"""Hugging Face fitness: sequence classification (accuracy, macro-F1, loss) and causal-LM
loss/perplexity, checked against a direct computation with transformers; and a short
evolution scored by each."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml
from conftest import finetune_like, save_hf, tiny_model, write_tokenizer_files

from mergekit_pcb.evolve.run import evaluate_checkpoint, evolve


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(20)}" for _ in range(rng.randrange(2, 9)))
            for _ in range(n)]


@pytest.fixture
def bert(tmp_path: Path) -> tuple[Path, list[Path]]:
    base = tiny_model("bert", seed=0)
    base_dir = save_hf(base, tmp_path / "bert-base")
    write_tokenizer_files(base_dir)
    tuned = [save_hf(finetune_like(base, seed=10 + i, scale=0.2), tmp_path / f"bert-ft{i}")
             for i in range(2)]
    rows = ["text,label"] + [f"{t},{i % 3}" for i, t in enumerate(_texts(30, 1))]
    (tmp_path / "select.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "report.jsonl").write_text("\n".join(
        json.dumps({"text": t, "label": (i * 7) % 3}) for i, t in enumerate(_texts(20, 2))))
    return base_dir, tuned


def _fitness_file(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "fitness.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1", "loss"])
def test_hf_classification_matches_direct_computation(bert, tmp_path: Path,
                                                      metric: str) -> None:
    import transformers
    from sklearn.metrics import accuracy_score, f1_score

    base_dir, tuned = bert
    fit = _fitness_file(tmp_path, {"type": "hf-classification", "model": str(base_dir),
                                   "select": "select.csv", "report": "report.jsonl",
                                   "metric": metric, "batch_size": 8})
    got = evaluate_checkpoint(str(tuned[0]), fit)
    tok = transformers.AutoTokenizer.from_pretrained(base_dir)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tuned[0]).eval()
    import csv

    for split, records in (
        ("select", list(csv.DictReader((tmp_path / "select.csv").open()))),
        ("report", [json.loads(x) for x in (tmp_path / "report.jsonl").read_text().split("\n")]),
    ):
        preds, losses = [], []
        gold = [int(r["label"]) for r in records]
        with torch.no_grad():
            for r, y in zip(records, gold, strict=True):
                logits = model(**tok(r["text"], return_tensors="pt")).logits[0]
                preds.append(int(logits.argmax()))
                losses.append(float(torch.nn.functional.cross_entropy(logits[None],
                                                                       torch.tensor([y]))))
        expected = {"accuracy": accuracy_score(gold, preds),
                    "macro_f1": f1_score(gold, preds, average="macro"),
                    "loss": sum(losses) / len(losses)}[metric]
        assert got[split] == pytest.approx(expected, rel=1e-5, abs=1e-6), split


def test_causal_lm_loss_and_perplexity(hf_models, tmp_path: Path) -> None:
    import transformers

    base_dir, tuned = hf_models("llama")
    texts = _texts(12, 3)
    (tmp_path / "lm.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    (tmp_path / "lm.txt").write_text("\n".join(texts) + "\n")
    tok = transformers.AutoTokenizer.from_pretrained(base_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tuned[1]).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt")["input_ids"]
            out = model(input_ids=ids, labels=ids)
            nll += float(out.loss) * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    for data, metric, expected in (("lm.jsonl", "loss", nll / n),
                                   ("lm.txt", "perplexity", math.exp(nll / n))):
        fit = _fitness_file(tmp_path, {"type": "causal-lm", "model": str(base_dir),
                                       "select": data, "metric": metric, "batch_size": 5})
        got = evaluate_checkpoint(str(tuned[1]), fit, ("select",))
        assert got["select"] == pytest.approx(expected, rel=1e-5)


def test_evolution_scored_by_hf_fitness(bert, hf_models, tmp_path: Path) -> None:
    base_dir, tuned = bert
    recipe = {
        "merge_method": "evolver", "base_model": str(base_dir),
        "models": [{"model": str(t)} for t in tuned],
        "parameters": {"generations": 1, "mode": "standalone"},
        "fitness": {"type": "hf-classification", "select": "select.csv",
                    "report": "report.jsonl", "metric": "loss", "batch_size": 16},
    }
    path = tmp_path / "evolver.yaml"
    path.write_text(yaml.safe_dump(recipe))
    evolve(path, tmp_path / "out", trust_code=True)
    doc = json.loads((tmp_path / "out" / "evolution.json").read_text())
    assert doc["history"][-1]["best"] <= doc["history"][0]["best"]
    # HF-loadable output, config and tokenizer carried over
    import transformers

    transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "out")
    transformers.AutoTokenizer.from_pretrained(tmp_path / "out")

    llama_base, llama_tuned = hf_models("llama")
    (tmp_path / "lm.jsonl").write_text("\n".join(json.dumps({"text": t})
                                                 for t in _texts(10, 4)))
    recipe = {
        "merge_method": "evolver", "base_model": str(llama_base),
        "models": [{"model": str(t)} for t in llama_tuned],
        "parameters": {"generations": 1, "mode": "merged"},
        "merge": {"merge_method": "linear"},
        "fitness": {"type": "causal-lm", "select": "lm.jsonl", "metric": "perplexity"},
    }
    path.write_text(yaml.safe_dump(recipe))
    evolve(path, tmp_path / "lm-out", trust_code=True)
    doc = json.loads((tmp_path / "lm-out" / "evolution.json").read_text())
    assert doc["maximize"] is False
    assert doc["history"][-1]["objective"] <= doc["initial"]["merge_select"]
    transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lm-out")
