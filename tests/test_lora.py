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
from mergekit_pcb.io.checkpoints import open_checkpoint

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
    # DoRA: each row of W + ΔW rescaled to its learned magnitude
    "dora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], use_dora=True),
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


def test_inspect_reads_an_adapter_over_its_base(llama: tuple[torch.nn.Module, Path],
                                               tmp_path: Path) -> None:
    import json as json_

    base, _ = llama
    base_dir = save_hf(copy.deepcopy(base).to(torch.bfloat16), tmp_path / "bf16")
    make_adapter(base, tmp_path / "a", seed=2, r=2, target_modules=["q_proj"])
    proc = run_cli("inspect", f"{base_dir}+{tmp_path / 'a'}", "--json")
    assert proc.returncode == 0, proc.stderr
    dtypes = {t["name"]: t["dtype"] for t in json_.loads(proc.stdout)["tensors"]}
    # the adapted matrices read as float32 updates, the rest as the bf16 base holds them
    assert dtypes["model.layers.0.self_attn.q_proj.weight"] == "float32"
    assert dtypes["model.layers.0.self_attn.k_proj.weight"] == "bfloat16"
    assert len(dtypes) == len(base.state_dict())


def test_dora_embedding_is_refused(llama: tuple[torch.nn.Module, Path],
                                   tmp_path: Path) -> None:
    """DoRA on linear layers is read (see above); on an embedding it is refused."""
    base, base_dir = llama
    make_adapter(base, tmp_path / "dora", seed=1, r=4, target_modules=["embed_tokens"],
                 use_dora=True)
    with pytest.raises(CheckpointError, match="DoRA embedding"):
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


# ---------------------------------------------------------------------------------------
# KnOTS
# ---------------------------------------------------------------------------------------

def _low_rank(g: torch.Generator, out: int, inp: int, r: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(out, r, generator=g) * 0.3, torch.randn(r, inp, generator=g) * 0.3


def test_factor_svd_equals_dense_svd() -> None:
    from mergekit_pcb.methods.knots import shared_basis_dense, shared_basis_factors

    g = torch.Generator().manual_seed(0)
    factors = [_low_rank(g, 40, 24, r) for r in (3, 5, 4)]
    deltas = [left.double() @ right.double() for left, right in factors]
    u_f, x_f = shared_basis_factors(factors)
    u_d, x_d = shared_basis_dense(deltas)
    assert u_f.shape == u_d.shape == (40, 12)  # rank 3+5+4 (< 40, < 3·24)
    torch.testing.assert_close(u_f.T @ u_f, torch.eye(12, dtype=torch.float64))
    for i, delta in enumerate(deltas):
        # each task's update rebuilt from the shared basis, both ways
        torch.testing.assert_close(u_f @ x_f[i], delta.double(), rtol=0, atol=1e-12)
        torch.testing.assert_close(u_d @ x_d[i], delta.double(), rtol=0, atol=1e-12)
        # and the same rank-one terms (signs of singular vectors are arbitrary)
        for j in range(12):
            torch.testing.assert_close(torch.outer(u_f[:, j], x_f[i][j]),
                                       torch.outer(u_d[:, j], x_d[i][j]), rtol=0, atol=1e-11)


def _official_knots(deltas: dict[str, list[torch.Tensor]], top_k: float, scaling: float,
                    dare: dict[str, list[torch.Tensor]] | None = None
                    ) -> dict[str, torch.Tensor]:
    """The official KnOTS-TIES steps in float64, written from `task_merger.SVDMerger` and
    `masking_ops` (topK as a fraction): SVD of the concatenated updates keeping s > 1e-5,
    diag(s)·Vᵢ per task, (DARE), every key's coordinates flattened in sorted-key order,
    per-task kthvalue top-k, sign of the sum (zero -> majority), disjoint mean, ×scaling,
    U @ merged."""
    keys = sorted(deltas)
    u_of, coords = {}, {}
    for key in keys:
        joined = torch.cat([d.double() for d in deltas[key]], dim=1)
        u, s, v = torch.linalg.svd(joined, full_matrices=False)
        u, v, s = u[:, s > 1e-5], v[s > 1e-5], s[s > 1e-5]
        u_of[key] = u
        coords[key] = list(torch.split(torch.diag(s) @ v, v.shape[1] // len(deltas[key]),
                                       dim=1))
        if dare is not None:
            coords[key] = [x * m for x, m in zip(coords[key], dare[key], strict=True)]
    tasks = len(deltas[keys[0]])
    stacked = torch.vstack([torch.cat([coords[k][i].reshape(-1) for k in keys])
                            for i in range(tasks)])
    d = stacked.shape[1]
    if top_k < 1:
        kth = stacked.abs().kthvalue(d - int(d * top_k), dim=1, keepdim=True).values
        pruned = stacked * (stacked.abs() >= kth)
    else:
        pruned = stacked
    sign = torch.sign(pruned.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    agree = torch.where(sign[None] > 0, pruned > 0, pruned < 0)
    selected = pruned * agree * scaling
    merged = selected.sum(dim=0) / (selected != 0).sum(dim=0).clamp(min=1)
    out, first = {}, 0
    for key in keys:
        shape = coords[key][0].shape
        size = shape[0] * shape[1]
        out[key] = u_of[key] @ merged[first:first + size].reshape(shape)
        first += size
    return out


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_knots_equals_official_reference(scope: str) -> None:
    """In process, on LoRA factors and on dense updates alike: per matrix (the reference run
    on one key) or over the whole model (the engine's statistics passes: see the run test)."""
    from mergekit_pcb.methods.base import TensorInputs
    from mergekit_pcb.methods.knots import Knots, KnotsGlobalStats

    g = torch.Generator().manual_seed(1)
    shapes = {"a.weight": (24, 16), "b.weight": (16, 32)}
    factors = {k: [_low_rank(g, *shape, r) for r in (2, 3, 4)] for k, shape in shapes.items()}
    bases = {k: torch.randn(shape, generator=g) for k, shape in shapes.items()}
    params = {"density": 0.3, "lambda": 0.7, "dare": 0.0, "scope": scope, "vocabulary": False}
    method = Knots()

    def inputs(key: str, with_factors: bool, stats: object = None) -> TensorInputs:
        deltas = [left.double() @ right.double() for left, right in factors[key]]
        return TensorInputs(key, bases[key].double(), [bases[key].double() + d for d in deltas],
                            [{}] * 3, params, stats=stats,  # type: ignore[arg-type]
                            factors=factors[key] if with_factors else None)

    for with_factors in (True, False):
        stats = method.global_stats(3, 0, params, [{}] * 3)
        if stats is not None:
            for p in range(len(stats.pass_names)):
                for key in shapes:
                    stats.observe(p, inputs(key, with_factors))
                stats.finish(p)
            assert isinstance(stats, KnotsGlobalStats)
        groups = [list(shapes)] if scope == "global" else [[k] for k in shapes]
        for group in groups:
            ref = _official_knots({k: [a.double() @ b.double() for a, b in factors[k]]
                                   for k in group}, 0.3, 0.7)
            for key in group:
                ours = method.merge(inputs(key, with_factors, stats)) - bases[key].double()
                torch.testing.assert_close(ours, ref[key], rtol=1e-6, atol=1e-9)
                assert ours.abs().max() > 1e-3


def test_knots_dare_equals_official_reference() -> None:
    """DARE on the coordinates: the masks are our seeded generators' (the official code
    seeds torch's global generator), the rest the official steps."""
    from mergekit_pcb.engine.rng import tensor_generator
    from mergekit_pcb.methods.base import TensorInputs
    from mergekit_pcb.methods.knots import Knots

    g = torch.Generator().manual_seed(2)
    factors = [_low_rank(g, 20, 12, r) for r in (3, 3)]
    deltas = [a.double() @ b.double() for a, b in factors]
    params = {"density": 0.5, "lambda": 1.0, "dare": 0.4, "scope": "tensor",
              "vocabulary": False}
    base = torch.zeros(20, 12, dtype=torch.float64)
    gens = [tensor_generator(7, "w", str(i)) for i in range(2)]
    ours = Knots().merge(TensorInputs("w", base, [d.double() for d in deltas], [{}] * 2,
                                      params, generators=gens, factors=factors))
    gens = [tensor_generator(7, "w", str(i)) for i in range(2)]
    masks = [(torch.rand(6, 12, generator=gi) < 0.6).double() / 0.6 for gi in gens]
    ref = _official_knots({"w": deltas}, 0.5, 1.0, dare={"w": masks})["w"]
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-9)


def test_knots_run_over_adapters_equals_official(llama: tuple[torch.nn.Module, Path],
                                                 tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """`pcbmerge run` with knots over three adapters (global top-k through the statistics
    passes, the SVD through the factors) against the official steps on peft's merged
    models' updates."""
    from mergekit_pcb.methods import knots

    base, base_dir = llama
    target = ["q_proj", "v_proj", "down_proj"]
    merged = [make_adapter(base, tmp_path / f"a{i}", seed=40 + i, r=2 + i, lora_alpha=8,
                           target_modules=target) for i in range(3)]
    base_sd = base.state_dict()
    adapted = [n for n in base_sd if any(t in n for t in target)]
    calls = []
    real = knots.shared_basis_factors
    monkeypatch.setattr(knots, "shared_basis_factors",  # count the adapted matrices' calls
                        lambda f: calls.append(sum(x[0].shape[1] for x in f)) or real(f))
    monkeypatch.setattr(knots, "shared_basis_dense", lambda d: pytest.fail("a dense SVD ran"))
    recipe = write_recipe(tmp_path / "k.yaml", {
        "merge_method": "knots", "base_model": str(base_dir),
        "models": [{"adapter": str(tmp_path / f"a{i}")} for i in range(3)],
        "parameters": {"density": 0.2, "lambda": 0.6}})
    proc = run_cli("run", recipe, "-o", tmp_path / "out", "--quiet")
    assert proc.returncode == 0, proc.stderr
    # two statistics passes and the merge, each through the factors (the other matrices:
    # rank 0, no SVD of a dense zero update either)
    assert sum(c > 0 for c in calls) == 3 * len(adapted)
    ours = _read_all(tmp_path / "out")
    ref = _official_knots({n: [m[n] - base_sd[n] for m in merged] for n in adapted}, 0.2, 0.6)
    for name, value in ours.items():
        if name in ref:
            torch.testing.assert_close(value.double() - base_sd[name].double(), ref[name],
                                       rtol=1e-4, atol=2e-6)
        else:  # not adapted: no task vector, the base
            torch.testing.assert_close(value, base_sd[name])


# ---------------------------------------------------------------------------------------
# Adapters as outputs: extract-lora and run --as-lora
# ---------------------------------------------------------------------------------------

LOW_RANK = ("q_proj", "v_proj", "down_proj")


def lowrank_finetune(base: torch.nn.Module, seed: int, rank: int = 3,
                     norm: bool = True) -> torch.nn.Module:
    """A fine-tune whose attention/MLP updates have rank `rank`, plus a changed final norm
    (a 1-D tensor: saved whole)."""
    tuned = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if any(t in name for t in LOW_RANK):
                out, inp = p.shape
                p.add_(torch.randn(out, rank, generator=g) @ torch.randn(rank, inp, generator=g)
                       * 0.05)
            elif norm and name == "model.norm.weight":
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return tuned


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.arange(2, 26).reshape(2, 12) % 90 + 2
    with torch.no_grad():
        return model(input_ids=ids).logits


def _peft_logits(base_dir: Path, adapter: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                           adapter)
    return _logits(model.eval())


def test_extract_lora_loads_in_peft_and_matches(llama: tuple[torch.nn.Module, Path],
                                                tmp_path: Path) -> None:
    base, base_dir = llama
    tuned = lowrank_finetune(base, seed=1)
    tuned_dir = save_hf(tuned, tmp_path / "tuned")
    proc = run_cli("extract-lora", tuned_dir, "--base", base_dir, "--rank", "4", "-o",
                   tmp_path / "adapter", "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    report = json.loads(proc.stdout)
    assert report["matrices"] == 3 * 2  # three kinds of matrix in two layers
    assert all(m["rank"] == 3 and m["relative_error"] < 1e-5 for m in report["per_matrix"])
    assert report["whole"] == ["model.norm.weight"]
    torch.testing.assert_close(_peft_logits(base_dir, tmp_path / "adapter"),
                               _logits(tuned.eval()), rtol=1e-4, atol=1e-4)
    # not the base's logits: the check above has something to find
    assert (_logits(base.eval()) - _logits(tuned.eval())).abs().max() > 1e-2


def test_extraction_error_falls_with_rank_and_is_the_real_error(
        llama: tuple[torch.nn.Module, Path], tmp_path: Path) -> None:
    """Full-rank updates: the error reported for each matrix is what the adapter, read back
    over the base by our own reader, misses of the update; it falls as the rank grows; and
    it is the Eckart–Young tail of the update's singular values."""
    from conftest import finetune_like

    from mergekit_pcb.engine.extract import extract_lora

    base, base_dir = llama
    tuned_dir = save_hf(finetune_like(base, seed=4), tmp_path / "tuned")
    errors: dict[int, dict[str, float]] = {}
    with open_checkpoint(str(tuned_dir)) as t, open_checkpoint(str(base_dir)) as b:
        for rank in (1, 4, 16):
            out = tmp_path / f"r{rank}"
            result = extract_lora(str(tuned_dir), str(base_dir), out, rank=rank)
            errors[rank] = {m.name: m.relative_error for m in result.matrices}
            with open_checkpoint(f"{base_dir}+{out}") as adapted:
                for m in result.matrices:
                    delta = t.read(m.name).double() - b.read(m.name).double()
                    got = adapted.read(m.name).double() - b.read(m.name).double()
                    real = float((delta - got).norm() / delta.norm())
                    assert m.relative_error == pytest.approx(real, rel=1e-4, abs=1e-6)
                    s = torch.linalg.svdvals(delta)
                    tail = float((s[rank:] ** 2).sum().sqrt() / s.norm())
                    assert m.relative_error == pytest.approx(tail, rel=1e-4)
    assert errors[1].keys() == errors[16].keys() and len(errors[1]) >= 10
    for name in errors[1]:
        assert errors[1][name] > errors[4][name] > errors[16][name]


def test_energy_share_picks_each_rank(llama: tuple[torch.nn.Module, Path],
                                      tmp_path: Path) -> None:
    from conftest import finetune_like

    from mergekit_pcb.engine.extract import extract_lora

    base, base_dir = llama
    tuned = finetune_like(base, seed=6)
    tuned_dir = save_hf(tuned, tmp_path / "tuned")
    result = extract_lora(str(tuned_dir), str(base_dir), tmp_path / "e", rank=20, energy=0.6)
    sd, bsd = tuned.state_dict(), base.state_dict()
    for m in result.matrices:
        s = torch.linalg.svdvals((sd[m.name] - bsd[m.name]).double())
        share = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
        expect = min(20, int((share < 0.6).sum()) + 1)
        assert m.rank == expect, m.name
    assert len({m.rank for m in result.matrices}) > 1  # ranks differ: rank_pattern is used
    # peft reads the per-module ranks back (rank_pattern, alpha_pattern)
    from transformers import AutoModelForCausalLM

    model = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir),
                                           tmp_path / "e")
    for m in result.matrices:
        module = model.base_model.model.get_submodule(m.name.removesuffix(".weight"))
        assert module.r["default"] == m.rank and module.scaling["default"] == 1.0


def _tied_llama(tie: bool, seed: int = 0) -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=tie)
    return tf.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("untie", [False, True])
def test_tied_embeddings(tmp_path: Path, untie: bool) -> None:
    """A base whose files hold no LM head (tied to the embedding): a fine-tune that keeps
    it tied and changes the embedding, or one that unties its head (mergekit-extract-lora's
    `KeyError: 'lm_head.weight'`), both come back through peft with their logits."""
    from mergekit_pcb.engine.extract import extract_lora

    base = _tied_llama(True)
    base_dir = save_hf(base, tmp_path / "base")
    with open_checkpoint(str(base_dir)) as b:
        assert "lm_head.weight" not in b
    if untie:
        tuned = _tied_llama(False)
        tuned.load_state_dict(base.state_dict(), strict=False)
        with torch.no_grad():
            tuned.lm_head.weight.copy_(base.model.embed_tokens.weight * 1.1)
    else:
        tuned = copy.deepcopy(base)
        with torch.no_grad():
            tuned.model.embed_tokens.weight.mul_(1.1)
    tuned = lowrank_finetune(tuned, seed=2, norm=False)
    tuned_dir = save_hf(tuned, tmp_path / "tuned")
    result = extract_lora(str(tuned_dir), str(base_dir), tmp_path / "a", rank=3)
    # tied: the embedding, and the head's copy peft loads beside it
    assert result.whole == (["lm_head.weight"] if untie
                            else ["model.embed_tokens.weight", "lm_head.weight"])
    torch.testing.assert_close(_peft_logits(base_dir, tmp_path / "a"),
                               _logits(tuned.eval()), rtol=1e-4, atol=1e-4)
    if not untie:  # our reader takes the tied adapter back (the head's copy is the tie's)
        with open_checkpoint(f"{base_dir}+{tmp_path / 'a'}") as read:
            assert "lm_head.weight" not in read
            torch.testing.assert_close(read.read("model.embed_tokens.weight"),
                                       tuned.model.embed_tokens.weight.detach())


def test_run_as_lora_matches_the_dense_merge(llama: tuple[torch.nn.Module, Path],
                                             tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base, base_dir = llama
    tuned = [save_hf(lowrank_finetune(base, seed=30 + i, rank=2), tmp_path / f"t{i}")
             for i in range(2)]
    recipe = write_recipe(tmp_path / "ta.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(base_dir),
        "models": [{"model": str(t), "parameters": {"weight": 0.7}} for t in tuned]})
    proc = run_cli("run", recipe, "-o", tmp_path / "dense", "--quiet")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("run", recipe, "-o", tmp_path / "lora", "--as-lora", "4")
    assert proc.returncode == 0, proc.stderr
    assert "wrote adapter" in proc.stderr
    assert not list(tmp_path.glob(".lora.merged-*"))  # the full merge is gone
    dense = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval())
    torch.testing.assert_close(_peft_logits(base_dir, tmp_path / "lora"), dense,
                               rtol=1e-4, atol=1e-4)
    # the rank matters: rank 1 cannot hold the rank-4 updates
    proc = run_cli("run", recipe, "-o", tmp_path / "lora1", "--as-lora", "1", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert (_peft_logits(base_dir, tmp_path / "lora1") - dense).abs().max() > 1e-3


def test_bad_adapter_outputs_get_one_line(llama: tuple[torch.nn.Module, Path],
                                         tmp_path: Path) -> None:
    base, base_dir = llama
    other = save_hf(tiny_model("gpt2", seed=0), tmp_path / "gpt2")
    proc = run_cli("extract-lora", other, "--base", base_dir, "--rank", "2", "-o",
                   tmp_path / "x")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "has no tensor 'model.embed_tokens.weight'" in proc.stderr
    proc = run_cli("extract-lora", base_dir, "--base", base_dir, "--rank", "2", "-o",
                   tmp_path / "y")
    assert proc.returncode == 2 and "no update" in proc.stderr
    recipe = write_recipe(tmp_path / "lin.yaml", {
        "merge_method": "linear",
        "models": [{"model": str(base_dir)}, {"model": str(save_hf(base, tmp_path / "c"))}]})
    proc = run_cli("run", recipe, "-o", tmp_path / "z", "--as-lora", "2")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "--as-lora: the recipe needs a base_model" in proc.stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def test_evolution_over_adapters_of_a_bf16_base(tmp_path: Path) -> None:
    """A search takes adapters too: over a bf16 base, adapters of different modules read
    their adapted tensors as float32 and the rest as bf16; the population holds the wider
    type, so a member is exactly base + B·A·scale."""
    import json as json_

    import yaml

    from mergekit_pcb.evolve.run import evolve

    base = tiny_model("llama", seed=0).to(torch.bfloat16)
    base_dir = save_hf(base, tmp_path / "base")
    write_tokenizer_files(base_dir)
    targets = [["q_proj"], ["v_proj", "up_proj"]]
    for i, target in enumerate(targets):
        make_adapter(base.float(), tmp_path / f"a{i}", seed=50 + i, r=2, lora_alpha=4,
                     target_modules=target)
    (tmp_path / "lm.jsonl").write_text("\n".join(
        json_.dumps({"text": " ".join(f"w{(i * 7 + j) % 20}" for j in range(6))})
        for i in range(6)))
    recipe = {
        "merge_method": "evolver", "base_model": str(base_dir),
        "models": [{"adapter": str(tmp_path / f"a{i}")} for i in range(2)],
        "parameters": {"generations": 1, "mode": "standalone"},
        "fitness": {"type": "causal-lm", "select": "lm.jsonl", "metric": "loss"},
        "seed": 1,
    }
    path = tmp_path / "evolver.yaml"
    path.write_text(yaml.safe_dump(recipe))
    evolve(path, tmp_path / "out", trust_code=True)
    members = sorted(tmp_path.rglob("init-000.safetensors"))
    assert members
    with open_checkpoint(str(members[0])) as m, \
            open_checkpoint(f"{base_dir}+{tmp_path / 'a0'}") as a:
        q = "model.layers.0.self_attn.q_proj.weight"
        assert m.info(q).dtype == torch.float32
        assert torch.equal(m.read(q), a.read(q))
        assert not torch.equal(m.read(q), a.read(q).to(torch.bfloat16).float())


def test_as_lora_over_a_bf16_base_keeps_the_update_exact(tmp_path: Path) -> None:
    """The merge behind --as-lora is written in float32: over a bf16 base an adapter passed
    through task_arithmetic comes back with its own update, not the bf16 rounding of
    base + update (which is full rank)."""
    import json as json_

    base = tiny_model("llama", seed=0).to(torch.bfloat16)
    base_dir = save_hf(base, tmp_path / "base")
    make_adapter(base.float(), tmp_path / "a", seed=8, r=2, lora_alpha=4,
                 target_modules=["q_proj"])
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(base_dir),
        "models": [{"adapter": str(tmp_path / "a"), "parameters": {"weight": 1.0}}]})
    proc = run_cli("run", recipe, "-o", tmp_path / "out", "--as-lora", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    lora = json_.loads(proc.stdout)["lora"]
    assert lora["max_relative_error"] < 1e-6
    # the merge is written in float32 over the bf16 base: tensors it left as they were are
    # still unchanged (not whole copies, nor rank-0 matrices)
    assert lora["matrices"] == 2 and lora["whole_tensors"] == 0
    with open_checkpoint(f"{base_dir}+{tmp_path / 'a'}") as want, \
            open_checkpoint(f"{base_dir}+{tmp_path / 'out'}") as got:
        for name in want.adapted:
            torch.testing.assert_close(got.read(name), want.read(name), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["model.norm.weight", "model.embed_tokens.weight"])
def test_knots_tensors_it_does_not_decompose_get_ties(name: str) -> None:
    """1-D tensors and vocabulary matrices: TIES per tensor with knots' density and λ."""
    from mergekit_pcb.methods.base import TensorInputs
    from mergekit_pcb.methods.knots import Knots
    from mergekit_pcb.methods.ties import ties_merge

    g = torch.Generator().manual_seed(3)
    shape = (40,) if name.endswith("norm.weight") else (30, 8)
    base = torch.randn(shape, generator=g)
    models = [base + torch.randn(shape, generator=g) for _ in range(3)]
    params = {"density": 0.4, "lambda": 0.6, "dare": 0.0, "scope": "tensor",
              "vocabulary": False}
    ours = Knots().merge(TensorInputs(name, base, models, [{}] * 3, params,
                                      vocabulary="embed" in name))
    expect = ties_merge(base, models, [1.0] * 3, [0.4] * 3, lambda_=0.6)
    torch.testing.assert_close(ours, expect)
    assert not torch.equal(ours, base)


def test_low_rank_updates_skip_the_full_svd(monkeypatch: pytest.MonkeyPatch) -> None:
    """An update of rank 5 asked at rank 8: found through a sketch of its range (no SVD of
    the whole matrix) with the full SVD's factors; a full-rank one takes the full SVD."""
    from mergekit_pcb.engine import extract

    g = torch.Generator().manual_seed(0)
    low = torch.randn(300, 5, generator=g) @ torch.randn(5, 200, generator=g)
    full_svd = torch.linalg.svd
    shapes: list[tuple[int, ...]] = []

    def spy(m: torch.Tensor, **kw: Any) -> Any:
        shapes.append(tuple(m.shape))
        return full_svd(m, **kw)

    monkeypatch.setattr(torch.linalg, "svd", spy)
    b, a, error, full = extract.lora_factors(low, 8, None)
    assert (300, 200) not in shapes and b.shape == (300, 5) and full == 200
    u, s, vh = full_svd(low.double(), full_matrices=False)
    torch.testing.assert_close((b @ a).double(), (u[:, :5] * s[:5]) @ vh[:5],
                               rtol=1e-5, atol=1e-5)
    assert error < 1e-6
    noisy = low + torch.randn(300, 200, generator=g)
    shapes.clear()
    b, a, error, _ = extract.lora_factors(noisy, 8, None)
    assert (300, 200) in shapes and b.shape == (300, 8)
    s = full_svd(noisy.double(), full_matrices=False)[1]
    assert error == pytest.approx(float((s[8:] ** 2).sum().sqrt() / s.norm()), rel=1e-6)



def test_a_float32_svd_that_does_not_converge_is_redone_in_float64(
        float32_svd_fails: list[torch.dtype]) -> None:
    """Updates over 4M entries are decomposed in float32, where LAPACK's gesdd can fail to
    converge (it did on a 2048×5632 matrix): that SVD is redone in float64, and the factors
    are the float64 SVD's."""
    from mergekit_pcb.engine import extract

    g = torch.Generator().manual_seed(1)
    delta = torch.randn(2100, 6, generator=g) @ torch.randn(6, 2000, generator=g)
    assert delta.numel() > 1 << 22  # the float32 path
    b, a, error, _ = extract.lora_factors(delta, 8, None)
    assert float32_svd_fails == [torch.float32, torch.float64] and b.shape == (2100, 6)
    torch.testing.assert_close(b @ a, delta, rtol=1e-4, atol=1e-4)
    # √(1 − kept/total) of float32 sums: ~1e-4 where the exact error is 0
    assert error < 1e-3

def test_adapter_by_hub_id_from_the_offline_cache(llama: tuple[torch.nn.Module, Path],
                                                  tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """`BASE+org/adapter` and `adapter: org/adapter` read the adapter from the Hugging Face
    cache layout (blobs, refs, snapshot symlinks), offline, as a local directory reads."""
    from test_io import make_hub_cache

    base, base_dir = llama
    local = tmp_path / "adapter"
    make_adapter(base, local, seed=5, r=2, lora_alpha=4, target_modules=["q_proj"])
    cache = tmp_path / "hf-cache"
    make_hub_cache(cache, "tiny-org/adapter",
                   {p.name: p.read_bytes() for p in local.iterdir() if p.is_file()})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "model.layers.0.self_attn.q_proj.weight"
    with open_checkpoint(f"{base_dir}+{local}") as by_path, \
            open_checkpoint(f"{base_dir}+tiny-org/adapter") as by_id:
        assert torch.equal(by_id.read(name), by_path.read(name))
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(base_dir),
        "models": [{"adapter": "tiny-org/adapter", "parameters": {"weight": 1.0}}],
        "dtype": "float32"})
    proc = run_cli("run", recipe, "-o", tmp_path / "out", "--quiet")
    assert proc.returncode == 0, proc.stderr
    with open_checkpoint(f"{base_dir}+{local}") as by_path, \
            open_checkpoint(str(tmp_path / "out")) as out:
        torch.testing.assert_close(out.read(name), by_path.read(name).float())
