"""LoRA adapters in and out, checked against the `peft` package itself: adapters made with
peft on tiny transformers models, their updates compared with `merge_and_unload()`."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import run_cli, save_hf, tiny_model, write_recipe, write_tokenizer_files

from mergekit_pcb.errors import CheckpointError
from mergekit_pcb.io.reader import open_checkpoint

peft = pytest.importorskip("peft")


def make_adapter(base: torch.nn.Module, path: Path, seed: int, **config: Any
                 ) -> dict[str, torch.Tensor]:
    """Save a peft adapter of `base` with seeded random factors (peft starts B at zero, which
    would make every update zero) and return the state dict `merge_and_unload` gives."""
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(path)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    base = tiny_model("llama", seed=0)
    path = save_hf(base, tmp_path_factory.mktemp("lora") / "base")
    write_tokenizer_files(path)
    return base, path


CONFIGS = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora": dict(r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "o_proj"]),
    "rank_pattern": dict(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "up_proj"],
                         rank_pattern={"layers.1.self_attn.q_proj": 2, "up_proj": 6},
                         alpha_pattern={"k_proj": 3}),
    # an adapted embedding (saved with its base layer) and a head saved whole
    "embedding_and_head": dict(r=4, lora_alpha=16, target_modules=["embed_tokens", "v_proj"],
                               modules_to_save=["lm_head"]),
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_task_vectors_equal_peft_merge(llama: tuple[torch.nn.Module, Path], tmp_path: Path,
                                       kind: str) -> None:
    base, base_dir = llama
    merged = make_adapter(base, tmp_path / kind, seed=3, **CONFIGS[kind])
    base_sd = base.state_dict()
    changed = 0
    with open_checkpoint(f"{base_dir}+{tmp_path / kind}") as ckpt, \
            open_checkpoint(str(base_dir)) as b:
        assert sorted(ckpt.names()) == sorted(b.names())
        for name in ckpt.names():
            ours = ckpt.read(name).to(torch.float32) - b.read(name).to(torch.float32)
            theirs = merged[name] - base_sd[name]
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
            changed += bool(theirs.abs().max() > 0)
            # a slice of rows (the engine streams large tensors in slices) is the same
            flat = ckpt.read(name).reshape(-1)
            n = flat.numel()
            torch.testing.assert_close(ckpt.read(name, n // 3, n - 5), flat[n // 3:n - 5])
    assert changed >= 3  # the check compared real updates, not zeros


def test_dora_is_refused(llama: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    base, base_dir = llama
    make_adapter(base, tmp_path / "dora", seed=1, r=4, target_modules=["q_proj"],
                 use_dora=True)
    with pytest.raises(CheckpointError, match="DoRA"):
        open_checkpoint(f"{base_dir}+{tmp_path / 'dora'}")
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(base_dir),
        "models": [{"adapter": str(tmp_path / "dora"), "parameters": {"weight": 1.0}}]})
    proc = run_cli("run", recipe, "-o", tmp_path / "out", "--quiet")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "DoRA" in proc.stderr


def test_adapter_alone_is_refused(llama: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    base, _ = llama
    make_adapter(base, tmp_path / "a", seed=1, r=2, target_modules=["q_proj"])
    with pytest.raises(CheckpointError, match=r"PEFT adapter, not a model.*BASE\+"):
        open_checkpoint(str(tmp_path / "a"))


def _read_all(path: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(str(path)) as ckpt:
        return {n: ckpt.read(n).clone() for n in ckpt.names()}


def test_ties_over_adapters_equals_ties_over_merged(llama: tuple[torch.nn.Module, Path],
                                                    tmp_path: Path) -> None:
    base, base_dir = llama
    dense = []
    for i, kind in enumerate(["plain", "rank_pattern"]):
        merged = make_adapter(base, tmp_path / f"a{i}", seed=20 + i, **CONFIGS[kind])
        model = copy.deepcopy(base)
        model.load_state_dict(merged)
        dense.append(save_hf(model, tmp_path / f"m{i}"))
    params = {"density": 0.5, "weight": 1.0}

    def ties(models: list[dict[str, Any]], out: str) -> dict[str, torch.Tensor]:
        recipe = write_recipe(tmp_path / f"{out}.yaml", {
            "merge_method": "ties", "base_model": str(base_dir), "models": models,
            "parameters": {"normalize": True}, "dtype": "float32"})
        proc = run_cli("run", recipe, "-o", tmp_path / out, "--quiet")
        assert proc.returncode == 0, proc.stderr
        return _read_all(tmp_path / out)

    # one adapter written mergekit's way (BASE+ADAPTER), one with the adapter: key
    ours = ties([{"model": f"{base_dir}+{tmp_path / 'a0'}", "parameters": params},
                 {"adapter": str(tmp_path / "a1"), "parameters": params}], "ours")
    ref = ties([{"model": str(p), "parameters": params} for p in dense], "ref")
    assert ours.keys() == ref.keys()
    differs = 0
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=1e-5, atol=1e-6)
        differs += not torch.equal(ref[name], base.state_dict()[name])
    assert differs >= 4


def test_fan_in_fan_out_layers_equal_peft_merge(tmp_path: Path) -> None:
    """GPT-2's Conv1D weights are stored (in, out): peft's fan_in_fan_out updates them with
    (B·A)ᵀ."""
    base = tiny_model("gpt2", seed=0)
    base_dir = save_hf(base, tmp_path / "gpt2")
    merged = make_adapter(base, tmp_path / "a", seed=5, r=4, lora_alpha=8,
                          target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    base_sd = base.state_dict()
    with open_checkpoint(f"{base_dir}+{tmp_path / 'a'}") as ckpt:
        adapted = [n for n in ckpt.names() if "c_attn.weight" in n]
        assert adapted
        for name in adapted:
            torch.testing.assert_close(ckpt.read(name) - base_sd[name],
                                       merged[name] - base_sd[name], rtol=1e-5, atol=1e-6)
