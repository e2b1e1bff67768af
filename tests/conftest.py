"""Fixtures: tiny Hugging Face checkpoints with random weights, built on the fly."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

ARCHS = ("llama", "bert", "gpt2")


def tiny_model(arch: str, seed: int) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=64)
        return tf.LlamaForCausalLM(cfg)
    if arch == "bert":
        cfg = tf.BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=64, num_labels=3)
        return tf.BertForSequenceClassification(cfg)
    if arch == "gpt2":
        cfg = tf.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
        return tf.GPT2LMHeadModel(cfg)
    raise ValueError(arch)


def finetune_like(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """A 'fine-tuned' copy: base plus a seeded random task vector on every float parameter."""
    import copy

    tuned = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return tuned


def save_hf(model: torch.nn.Module, path: Path, shard_size: str = "20KB") -> Path:
    model.save_pretrained(path, safe_serialization=True, max_shard_size=shard_size)
    return path


def write_tokenizer_files(path: Path) -> None:
    """A minimal word-level tokenizer, enough for AutoTokenizer and for the copy check. Its
    96 tokens cover the tiny models' 96 embedding rows: a recipe that builds the output
    tokenizer (`tokenizer_source`) keeps as many rows as the tokenizer has tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "[PAD]": 1, **{f"w{i}": i + 2 for i in range(94)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]", '
        '"pad_token": "[PAD]"}'
    )


@pytest.fixture
def hf_models(tmp_path: Path) -> Callable[[str, int], tuple[Path, list[Path]]]:
    """Build a sharded base and `n` fine-tuned copies of a tiny `arch` model."""

    def build(arch: str, n: int = 2) -> tuple[Path, list[Path]]:
        base = tiny_model(arch, seed=0)
        base_dir = save_hf(base, tmp_path / f"{arch}-base")
        write_tokenizer_files(base_dir)
        tuned_dirs = [save_hf(finetune_like(base, seed=10 + i), tmp_path / f"{arch}-ft{i}")
                      for i in range(n)]
        return base_dir, tuned_dirs

    return build


@pytest.fixture
def float32_svd_fails(monkeypatch: pytest.MonkeyPatch) -> list[torch.dtype]:
    """torch.linalg.svd raising LAPACK's non-convergence for float32 inputs (as gesdd did
    on a 2048×5632 Iso-CTS matrix of the 1B benchmark); the list of the dtypes it was
    called with, in order."""
    real = torch.linalg.svd
    calls: list[torch.dtype] = []

    def svd(m: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(m.dtype)
        if m.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(m, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", svd)
    return calls


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`pcbmerge ARGS` run in this process (a subprocess costs seconds of imports), with the
    exit code, stdout and stderr a subprocess would give. torch's thread count and the
    working directory are put back afterwards, so one call cannot change the next test."""
    import os

    from typer.testing import CliRunner

    from mergekit_pcb.cli import app

    argv = [str(a) for a in args]
    threads, here = torch.get_num_threads(), Path.cwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        result = CliRunner().invoke(app, argv, catch_exceptions=False)
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(argv, result.exit_code, result.stdout, result.stderr)

