"""Parity with FusionBench 0.2.33: the spectral merges through FusionBench's functions and
ours, on the same small state dicts, tensor by tensor.

    python scripts/fusionbench_parity.py
    python scripts/fusionbench_parity.py --keep /tmp/fb-parity

Builds two seeded families of state dicts (`build_state_dicts`): a CLIP-like one (vision and
text towers, one layer each, the names of transformers' CLIPModel) merged over 3 tasks and a
Llama-like one (with `model.embed_tokens.weight` and `lm_head.weight`, which we recognise as
vocabulary matrices) over 4, so r = min(m, n) is not a multiple of T. Task matrices have a
decaying spectrum (sᵢ = 0.02·0.8ⁱ, random singular vectors), as fine-tunes' do: with the flat
spectrum of a Gaussian matrix, which top-k directions a method keeps would hang on rounding.
Each family is written in float32 and in float64 (the same values up to rounding) as
safetensors model directories.

FusionBench side: `scripts/fusionbench_side.py` runs in FusionBench's venv (default
`.bench/fusionbench-venv`, `pip install fusion-bench==0.2.33`) and calls FusionBench's
lowest-level function per method on the task vectors (`compute_and_sum_svd_mem_reduction`,
`iso_c`, `iso_cts`, `wudi_merging`; its docstring names the files). FusionBench 0.2.33 has no
CART, so `cart` has no row. Our side: the same inputs through `pcbmerge run`'s engine
(`merge_recipe_file`, in this process), once per choice.

Printed: per method, our choice and family, the largest relative difference per tensor kind,
‖ours − theirs‖_F / ‖theirs − W₀‖_F (the difference measured against the merge's own change
to the base), in float32 and, over all kinds, in float64. Where our default differs from
FusionBench on purpose (vocabulary matrices: `vocabulary: false`; WUDI's `matrices` and
`rest`), both choices run: the one that matches FusionBench is within the tolerance. The
last column says whether each row matched as its case expects; the exit code is 1 if any did
not.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from mergekit_parity import load_dir, run  # noqa: E402

from mergekit_pcb.engine import merge_recipe_file  # noqa: E402
from mergekit_pcb.engine.vocab import is_vocabulary_tensor  # noqa: E402
from mergekit_pcb.methods.spectral import is_attn_mlp  # noqa: E402

DEFAULT_VENV = REPO / ".bench" / "fusionbench-venv"
FUSIONBENCH_VERSION = "0.2.33"
StateDict = dict[str, torch.Tensor]

# The largest relative difference a matching choice may show on these inputs (measured
# up to 2.6e-6 and 5e-15: docs/benchmarks/fusionbench.md). Both tools run the same LAPACK
# here; the float32 differences are rounding (our sums and upcasts in another order), which
# the SVDs amplify by the inverse gaps of the spectrum.
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-12}
DECAY = 0.8  # ratio of consecutive singular values of a task matrix
DELTA_SCALE = 0.02  # its largest singular value; other tensors' Δ entries have this std / 2

# Tensor kinds, the table's columns.
KINDS = ("attn/mlp m=n", "attn/mlp m>n", "attn/mlp m<n", "other 2-D", "vocabulary",
         "not 2-D")


def family_shapes(family: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a family (one layer per tower)."""
    out: dict[str, tuple[int, ...]] = {}
    if family == "clip":
        hidden, mlp, proj = 20, 44, 12
        for tower, positions in (("vision_model", 10), ("text_model", 8)):
            layer = f"{tower}.encoder.layers.0"
            for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
                out[f"{layer}.self_attn.{p}.weight"] = (hidden, hidden)
                out[f"{layer}.self_attn.{p}.bias"] = (hidden,)
            out[f"{layer}.mlp.fc1.weight"] = (mlp, hidden)  # m > n
            out[f"{layer}.mlp.fc1.bias"] = (mlp,)
            out[f"{layer}.mlp.fc2.weight"] = (hidden, mlp)  # m < n
            out[f"{layer}.mlp.fc2.bias"] = (hidden,)
            for norm in ("layer_norm1", "layer_norm2"):
                out[f"{layer}.{norm}.weight"] = (hidden,)
                out[f"{layer}.{norm}.bias"] = (hidden,)
            out[f"{tower}.embeddings.position_embedding.weight"] = (positions, hidden)
        out["vision_model.embeddings.class_embedding"] = (hidden,)
        out["vision_model.embeddings.patch_embedding.weight"] = (hidden, 3, 4, 4)
        out["vision_model.pre_layrnorm.weight"] = (hidden,)  # transformers' spelling
        out["vision_model.post_layernorm.weight"] = (hidden,)
        out["text_model.embeddings.token_embedding.weight"] = (40, hidden)
        out["text_model.final_layer_norm.weight"] = (hidden,)
        out["visual_projection.weight"] = (proj, hidden)
        out["text_projection.weight"] = (proj, hidden)
    elif family == "llama":
        hidden, mlp, kv, vocab = 18, 30, 6, 40
        layer = "model.layers.0"
        out["model.embed_tokens.weight"] = (vocab, hidden)
        for p, rows in (("q_proj", hidden), ("k_proj", kv), ("v_proj", kv), ("o_proj", hidden)):
            out[f"{layer}.self_attn.{p}.weight"] = (rows, hidden)
        out[f"{layer}.mlp.gate_proj.weight"] = (mlp, hidden)
        out[f"{layer}.mlp.up_proj.weight"] = (mlp, hidden)
        out[f"{layer}.mlp.down_proj.weight"] = (hidden, mlp)
        out[f"{layer}.input_layernorm.weight"] = (hidden,)
        out[f"{layer}.post_attention_layernorm.weight"] = (hidden,)
        out["model.norm.weight"] = (hidden,)
        out["lm_head.weight"] = (vocab, hidden)
    else:
        raise ValueError(f"unknown family {family!r}")
    return out


FAMILY_TASKS = {"clip": 3, "llama": 4}


def decaying_matrix(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """U·diag(s)·Vᵀ with random orthonormal U, V and s_j = DELTA_SCALE·DECAY^j (float64)."""
    r = min(rows, cols)
    u = torch.linalg.qr(torch.randn(rows, r, generator=generator, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(cols, r, generator=generator, dtype=torch.float64)).Q
    s = DELTA_SCALE * DECAY ** torch.arange(r, dtype=torch.float64)
    return (u * s) @ v.mT


def build_state_dicts(family: str, tasks: int, seed: int, dtype: torch.dtype
                      ) -> tuple[StateDict, list[StateDict]]:
    """(base, fine-tunes) of a family, drawn in float64 from `seed` and cast to `dtype`: the
    same seed gives the same values in every dtype, up to rounding."""
    g = torch.Generator().manual_seed(seed)
    shapes = family_shapes(family)
    base = {n: torch.randn(s, generator=g, dtype=torch.float64) * 0.1
            for n, s in shapes.items()}
    models = []
    for _ in range(tasks):
        tuned = {}
        for n, s in shapes.items():
            delta = (decaying_matrix(*s, g) if len(s) == 2
                     else torch.randn(s, generator=g, dtype=torch.float64) * DELTA_SCALE / 2)
            tuned[n] = (base[n] + delta).to(dtype)
        models.append(tuned)
    return {n: t.to(dtype) for n, t in base.items()}, models


def tensor_kind(name: str, shape: Sequence[int]) -> str:
    """The table column a tensor falls in (our own rules for which tensors are which)."""
    if len(shape) != 2:
        return "not 2-D"
    if is_vocabulary_tensor(name) or name.endswith("text_projection.weight"):
        return "vocabulary"
    if not is_attn_mlp(name):
        return "other 2-D"
    rows, cols = shape
    return "attn/mlp m=n" if rows == cols else "attn/mlp m>n" if rows > cols \
        else "attn/mlp m<n"


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor, base: torch.Tensor
                        ) -> float:
    """‖ours − theirs‖_F / ‖theirs − base‖_F in float64: the difference against the change
    FusionBench's merge made to the base (0 where both are the base)."""
    a, b, w = ours.double(), theirs.double(), base.double()
    num = float(torch.linalg.vector_norm(a - b))
    den = float(torch.linalg.vector_norm(b - w))
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def worst_by_kind(ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor],
                  base: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The largest relative difference per tensor kind (kinds the family lacks absent)."""
    if set(ours) != set(theirs):
        raise ValueError(f"tensor names differ: {sorted(set(ours) ^ set(theirs))}")
    out: dict[str, float] = {}
    for name, b in base.items():
        kind = tensor_kind(name, b.shape)
        out[kind] = max(out.get(kind, 0.0), relative_difference(ours[name], theirs[name], b))
    return out


@dataclass(frozen=True)
class Case:
    method: str
    choice: str  # our settings, in words
    ours: dict[str, Any] = field(default_factory=dict)  # our recipe's `parameters`
    theirs: dict[str, Any] = field(default_factory=dict)  # FusionBench function's kwargs
    scale: float = 1.0  # FusionBench's alpha / scaling_factor (1.0: WUDI has none)
    families: tuple[str, ...] = ("clip", "llama")
    # families where this choice differs from FusionBench's on purpose (which tensors)
    differs: tuple[str, ...] = ()


# Both families hold tensors our `vocabulary: false` sends to the fallback: Llama's
# embed_tokens and lm_head, CLIP's token_embedding and text_projection (the official code
# averages the latter; FusionBench decomposes both).
VOCAB_ONLY = ("clip", "llama")


def cases() -> list[Case]:
    fusionbench_wudi = {"matrices": "all_2d", "rest": "mean"}
    return [
        Case("tsv_m", "default (vocabulary: false)", {"alpha": 1.0}, differs=VOCAB_ONLY),
        Case("tsv_m", "vocabulary: true", {"alpha": 1.0, "vocabulary": True},
             families=VOCAB_ONLY),
        Case("iso_c", "default (vocabulary: false)", {"alpha": 1.0}, differs=VOCAB_ONLY),
        Case("iso_c", "vocabulary: true", {"alpha": 1.0, "vocabulary": True},
             families=VOCAB_ONLY),
        # our matmul-only path for the same result (no FusionBench counterpart)
        Case("iso_c", "solver: newton_schulz, vocabulary: true",
             {"alpha": 1.0, "solver": "newton_schulz", "vocabulary": True},
             families=("clip",)),
        Case("iso_cts", "default (vocabulary: false)", {"alpha": 1.0},
             {"common_space_fraction": 0.8}, differs=VOCAB_ONLY),
        Case("iso_cts", "vocabulary: true", {"alpha": 1.0, "vocabulary": True},
             {"common_space_fraction": 0.8}, families=VOCAB_ONLY),
        Case("wudi", "default (matrices: attn_mlp, rest: base)", {}, {"iter_num": 300},
             differs=("clip", "llama")),
        Case("wudi", "matrices: all_2d, rest: mean", fusionbench_wudi, {"iter_num": 300},
             differs=VOCAB_ONLY),
        Case("wudi", "all_2d, mean, vocabulary: true", {**fusionbench_wudi, "vocabulary": True},
             {"iter_num": 300}, families=VOCAB_ONLY),
        # FusionBench's shipped config (fusion_bench_config/method/wudi/wudi.yaml) takes
        # 400 steps, the official code 300.
        Case("wudi", "all_2d, mean, vocabulary: true, steps: 400",
             {**fusionbench_wudi, "vocabulary": True, "steps": 400}, {"iter_num": 400},
             families=VOCAB_ONLY),
    ]


DTYPES = {"float32": torch.float32, "float64": torch.float64}


def write_family(root: Path, family: str, seed: int, dtype: torch.dtype) -> dict[str, Any]:
    base, models = build_state_dicts(family, FAMILY_TASKS[family], seed, dtype)
    paths = {"base": root / "base", "models": [root / f"ft{i}" for i in range(len(models))]}
    for sd, d in zip([base, *models], [paths["base"], *paths["models"]], strict=True):
        d.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(d / "model.safetensors"))
    return paths


def theirs_key(case: Case, family: str, dtype: str) -> str:
    """FusionBench runs are shared by the cases that call the same function alike."""
    return (f"{family}-{dtype}-{case.method}-"
            + "-".join(f"{k}{v}" for k, v in sorted(case.theirs.items())) + f"-x{case.scale}")


def our_merge(case: Case, paths: Mapping[str, Any], dtype: str, out: Path) -> StateDict:
    recipe = {"merge_method": case.method, "base_model": str(paths["base"]),
              "models": [{"model": str(p)} for p in paths["models"]], "dtype": dtype}
    if case.ours:
        recipe["parameters"] = case.ours
    out.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    merge_recipe_file(path, out / "model", seed=0)
    return load_dir(out / "model")


def write_fixture(path: Path, outputs: Mapping[str, StateDict],
                  versions: Mapping[str, Any]) -> None:
    """FusionBench's merged tensors, `<run key>/<tensor>`, with the versions as metadata."""
    flat = {f"{key}/{name}": t.contiguous() for key, sd in outputs.items()
            for name, t in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(path), metadata={"versions": json.dumps(versions),
                                         "runs": json.dumps(sorted(outputs))})
    print(f"wrote {len(outputs)} FusionBench outputs to {path}")


def fixture_cases() -> list[tuple[Case, str]]:
    """(case, family) pairs whose choice is FusionBench's: what the fixture holds."""
    return [(case, f) for case in cases() for f in case.families if f not in case.differs]


def verdict_of(within: bool, differs: bool) -> str:
    """The last column: whether the row is within the tolerance, and whether that is what
    the case expects (a choice that differs on purpose must not match)."""
    if within:
        return "**yes, unexpected**" if differs else "yes"
    return "no (on purpose)" if differs else "**no, unexpected**"


def fmt(value: float | None) -> str:
    if value is None:
        return "—"
    return "0" if value == 0 else f"{value:.1e}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", type=Path, help="work directory to keep (default: a temp dir)")
    ap.add_argument("--fusionbench-venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    ap.add_argument("--write-fixture", type=Path,
                    help="also save FusionBench's float32 outputs of the matching cases here "
                         "(tests/data/fusionbench_outputs.safetensors: what the suite checks "
                         "our merges against without FusionBench installed)")
    args = ap.parse_args()
    python = args.fusionbench_venv / "bin" / "python"
    if not python.exists():
        print(f"error: no FusionBench venv at {args.fusionbench_venv} (create it: python -m "
              f"venv {args.fusionbench_venv}; {args.fusionbench_venv}/bin/pip install "
              f"fusion-bench=={FUSIONBENCH_VERSION})", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    work = args.keep or Path(tempfile.mkdtemp(prefix="fb-parity-"))
    work.mkdir(parents=True, exist_ok=True)

    families = {(f, d): write_family(work / "inputs" / f / d, f, args.seed, DTYPES[d])
                for f in FAMILY_TASKS for d in DTYPES}
    runs: dict[str, dict[str, Any]] = {}
    for case in cases():
        for f in case.families:
            for d in DTYPES:
                key = theirs_key(case, f, d)
                runs[key] = {"family": f"{f}-{d}", "method": case.method,
                             "kwargs": case.theirs, "scale": case.scale,
                             "out": str(work / "theirs" / key)}
    job = {"threads": args.threads, "runs": list(runs.values()), "families": {
        f"{f}-{d}": {"base": str(p["base"] / "model.safetensors"),
                     "models": [str(m / "model.safetensors") for m in p["models"]]}
        for (f, d), p in families.items()}}
    job_path = work / "theirs" / "job.json"
    job_path.parent.mkdir(parents=True, exist_ok=True)
    job_path.write_text(json.dumps(job, indent=1))
    rc = run([str(python), str(SCRIPTS / "fusionbench_side.py"), str(job_path)],
             work / "theirs" / "side.log")
    if rc != 0:
        print(f"error: FusionBench side exited {rc}; log: {work / 'theirs' / 'side.log'}",
              file=sys.stderr)
        return 1
    versions = json.loads((work / "theirs" / "versions.json").read_text())

    header = ["method", "our choice", "family (T)", *(f"{k}" for k in KINDS),
              "all kinds, float64", "matches FusionBench"]
    rows = []
    unexpected = 0
    for i, case in enumerate(cases()):
        for f in case.families:
            worst: dict[str, dict[str, float]] = {}
            for d in DTYPES:
                base = load_dir(families[(f, d)]["base"])
                ours = our_merge(case, families[(f, d)], d, work / "ours" / f"{i:02d}-{f}-{d}")
                theirs = load_dir(Path(runs[theirs_key(case, f, d)]["out"]))
                worst[d] = worst_by_kind(ours, theirs, base)
            ok = all(v <= TOLERANCE[DTYPES[d]] for d in DTYPES for v in worst[d].values())
            verdict = verdict_of(ok, f in case.differs)
            unexpected += verdict.startswith("**")
            row = [case.method, case.choice, f"{f} ({FAMILY_TASKS[f]})",
                   *(fmt(worst["float32"].get(k)) for k in KINDS),
                   fmt(max(worst["float64"].values())), verdict]
            rows.append(row)
            print(" | ".join(row), flush=True)

    print()
    print(f"FusionBench {versions['fusion_bench']} (torch {versions['torch']}); ours "
          f"mergekit_pcb {importlib.metadata.version('mergekit-pcb')} (torch "
          f"{torch.__version__}); threads {args.threads}, seed {args.seed}; tolerance "
          f"{TOLERANCE[torch.float32]:g} (float32), {TOLERANCE[torch.float64]:g} (float64)")
    for method, where in versions["functions"].items():
        print(f"  {method}: {where}")
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if args.write_fixture is not None and not unexpected:
        write_fixture(args.write_fixture, {
            theirs_key(case, f, "float32"): load_dir(Path(runs[theirs_key(case, f, "float32")]
                                                          ["out"]))
            for case, f in fixture_cases()}, versions)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    if unexpected:
        print(f"{unexpected} row(s) unexpected: see the last column", file=sys.stderr)
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
