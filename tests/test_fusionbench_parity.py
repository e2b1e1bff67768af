"""The FusionBench peer check (scripts/fusionbench_parity.py): its own pieces (the seeded
state dicts, the tensor kinds, the relative-difference formula), and our merges against
FusionBench 0.2.33's outputs of the same inputs, stored in tests/data by the script (running
FusionBench itself needs its venv and is the script's job)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

import fusionbench_parity as fp  # noqa: E402

from mergekit_pcb.methods import REGISTRY  # noqa: E402


@pytest.mark.parametrize("family", sorted(fp.FAMILY_TASKS))
def test_state_dicts_are_seeded(family: str) -> None:
    tasks = fp.FAMILY_TASKS[family]
    base, models = fp.build_state_dicts(family, tasks, 3, torch.float32)
    again_base, again = fp.build_state_dicts(family, tasks, 3, torch.float32)
    other_base, other = fp.build_state_dicts(family, tasks, 4, torch.float32)
    assert len(models) == tasks
    for name, shape in fp.family_shapes(family).items():
        assert base[name].shape == shape and base[name].dtype == torch.float32
        assert torch.equal(base[name], again_base[name])
        assert not torch.equal(base[name], other_base[name])
        for m, m_again, m_other in zip(models, again, other, strict=True):
            assert torch.equal(m[name], m_again[name])
            assert not torch.equal(m[name], m_other[name])
    # float64 holds the same draw, float32 its rounding
    base64, models64 = fp.build_state_dicts(family, tasks, 3, torch.float64)
    for name in base:
        assert base64[name].dtype == torch.float64
        assert torch.equal(base64[name].float(), base[name])
        assert torch.equal(models64[0][name].float(), models[0][name])


@pytest.mark.parametrize("family", sorted(fp.FAMILY_TASKS))
def test_task_matrices_have_the_stated_spectrum(family: str) -> None:
    base, models = fp.build_state_dicts(family, fp.FAMILY_TASKS[family], 0, torch.float64)
    tasks_differ = False
    for name, b in base.items():
        if b.dim() != 2:
            continue
        deltas = [m[name] - b for m in models]
        r = min(b.shape)
        expected = fp.DELTA_SCALE * fp.DECAY ** torch.arange(r, dtype=torch.float64)
        for d in deltas:
            torch.testing.assert_close(torch.linalg.svdvals(d), expected, rtol=1e-9,
                                       atol=1e-12)
        tasks_differ |= not torch.allclose(deltas[0], deltas[1])
    assert tasks_differ  # same spectrum, different singular vectors


def test_families_cover_the_tensor_kinds() -> None:
    """Square, m > n and m < n attention/MLP matrices, other 2-D tensors and non-2-D ones in
    both families; vocabulary matrices (CLIP's token_embedding and text_projection) in both,
    other 2-D tensors in the CLIP one only."""
    for family in fp.FAMILY_TASKS:
        kinds = {fp.tensor_kind(n, s) for n, s in fp.family_shapes(family).items()}
        expected = set(fp.KINDS) - (set() if family == "clip" else {"other 2-D"})
        assert kinds == expected, family


def test_tensor_kind() -> None:
    assert fp.tensor_kind("vision_model.encoder.layers.0.mlp.fc1.weight", (44, 20)) \
        == "attn/mlp m>n"
    assert fp.tensor_kind("vision_model.encoder.layers.0.mlp.fc2.weight", (20, 44)) \
        == "attn/mlp m<n"
    assert fp.tensor_kind("text_model.encoder.layers.0.self_attn.q_proj.weight", (20, 20)) \
        == "attn/mlp m=n"
    assert fp.tensor_kind("text_model.encoder.layers.0.self_attn.q_proj.bias", (20,)) \
        == "not 2-D"
    assert fp.tensor_kind("visual_projection.weight", (12, 20)) == "other 2-D"
    assert fp.tensor_kind("lm_head.weight", (40, 18)) == "vocabulary"


def test_relative_difference_by_hand() -> None:
    base = torch.tensor([1.0, 1.0])
    theirs = torch.tensor([4.0, 5.0])  # theirs − base = (3, 4): norm 5
    ours = torch.tensor([4.0, 6.0])  # ours − theirs = (0, 1): norm 1
    assert fp.relative_difference(ours, theirs, base) == pytest.approx(0.2, abs=1e-15)
    assert fp.relative_difference(theirs, theirs, base) == 0.0
    assert fp.relative_difference(base, base, base) == 0.0  # both left the base alone
    assert fp.relative_difference(ours, base, base) == math.inf


def test_worst_by_kind_takes_the_largest_per_kind() -> None:
    base = {"a.mlp.fc1.weight": torch.zeros(3, 2), "b.mlp.fc1.weight": torch.zeros(3, 2),
            "norm.weight": torch.zeros(2)}
    theirs = {k: torch.ones_like(v) for k, v in base.items()}
    ours = dict(theirs)
    ours["a.mlp.fc1.weight"] = torch.ones(3, 2) * 1.5  # ‖0.5·1‖/‖1‖ = 0.5
    ours["b.mlp.fc1.weight"] = torch.ones(3, 2) * 1.25  # 0.25
    ours["norm.weight"] = torch.tensor([1.0, 1.1])  # 0.1/√2
    worst = fp.worst_by_kind(ours, theirs, base)
    assert worst == pytest.approx({"attn/mlp m>n": 0.5, "not 2-D": 0.1 / math.sqrt(2)})
    with pytest.raises(ValueError, match=r"norm\.weight"):
        fp.worst_by_kind({k: v for k, v in ours.items() if k != "norm.weight"}, theirs, base)


def test_cases_use_our_parameters() -> None:
    """Every case names one of our methods and only parameters that method has."""
    for case in fp.cases():
        names = {p.name for p in REGISTRY[case.method].params}
        assert set(case.ours) <= names, (case.method, set(case.ours) - names)
        assert set(case.differs) <= set(case.families) <= set(fp.FAMILY_TASKS)


def test_verdict_flags_the_unexpected() -> None:
    """A row within tolerance is expected unless its choice differs on purpose, and the
    other way round; only unexpected verdicts are marked (the script exits 1 on them)."""
    assert fp.verdict_of(True, False) == "yes"
    assert fp.verdict_of(False, True) == "no (on purpose)"
    assert fp.verdict_of(True, True).startswith("**")
    assert fp.verdict_of(False, False).startswith("**")


FIXTURE = Path(__file__).parent / "data" / "fusionbench_outputs.safetensors"


@pytest.mark.parametrize("case,family", fp.fixture_cases(),
                         ids=lambda v: v if isinstance(v, str) else f"{v.method}[{v.choice}]")
def test_our_merges_match_fusionbench_outputs(case: fp.Case, family: str,
                                              tmp_path: Path) -> None:
    """The README's claim without FusionBench installed: our merge of the seeded inputs
    against FusionBench 0.2.33's output of the same inputs, saved by
    `python scripts/fusionbench_parity.py --write-fixture tests/data/fusionbench_outputs.
    safetensors`."""
    from safetensors.torch import load_file

    stored = load_file(str(FIXTURE))
    prefix = fp.theirs_key(case, family, "float32") + "/"
    theirs = {k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)}
    assert theirs, f"no FusionBench output stored for {prefix}"
    paths = fp.write_family(tmp_path / "in", family, 0, torch.float32)
    ours = fp.our_merge(case, paths, "float32", tmp_path / "ours")
    base = fp.load_dir(paths["base"])
    worst = fp.worst_by_kind(ours, theirs, base)
    assert max(worst.values()) <= fp.TOLERANCE[torch.float32], worst
