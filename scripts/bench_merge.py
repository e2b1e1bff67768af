"""Benchmark ``pcbmerge`` against mergekit on synthetic Llama checkpoints.

Run with the system python from the repository root::

    python scripts/bench_merge.py                       # ~30M params, linear,ties,task_arithmetic
    python scripts/bench_merge.py --params 120M --repeats 3 --json bench.json
    python scripts/bench_merge.py --methods ties --no-mergekit   # ours only
    python scripts/bench_merge.py --no-ours                      # mergekit only
    python scripts/bench_merge.py --methods ties,spectral --no-mergekit  # the spectral rows
    python scripts/bench_merge.py --params 128k --methods memory --no-arithmetic
                                        # the memory bound: a 128k-vocabulary embedding
    python scripts/bench_merge.py --methods postprocess --no-mergekit
                                        # ties and global pcb with and without LiNeS / SVC

What it does:

1. Builds a base and three fine-tuned ``LlamaForCausalLM`` checkpoints (random fp32
   weights; fine-tuned = base + seeded random deltas that share a common direction
   but disagree in sign often enough for TIES sign election to matter) and saves
   them sharded with ``save_pretrained(safe_serialization=True)``.
2. For every method writes ONE mergekit-style YAML recipe and runs it through
   ``pcbmerge run RECIPE -o OUT --force --quiet`` and through
   ``mergekit-yaml RECIPE OUT`` (from a dedicated venv, created on demand at
   ``.bench/mergekit-venv``), each as a child process.  Wall time and the child's
   peak RSS (``os.wait4`` rusage) are recorded; with ``--repeats N`` the best wall
   time and the lowest peak RSS are kept.
3. Compares the two outputs tensor by tensor and prints a markdown table (and
   optionally a JSON dump with ``--json``).

New rows are added by registering a recipe builder in ``RECIPES``; a recipe
that mergekit cannot run (e.g. ``pcb``) sets ``peer=False``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = REPO_ROOT / ".bench" / "mergekit-venv"
MERGEKIT_VERSION = "0.1.5"
TORCH_PIN = "torch==2.13.0"
TINY = 1e-30
N_FINETUNED = 3


# --------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """Llama dimensions for the synthetic checkpoints."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int
    heads: int

    def largest_tensor_bytes(self) -> int:
        """float32 bytes of the largest tensor (the embedding, an MLP or an attention
        matrix)."""
        return 4 * max(self.vocab * self.hidden, self.intermediate * self.hidden,
                       self.hidden * self.hidden)

    def param_count(self) -> int:
        """Parameters of an untied LlamaForCausalLM with these dimensions (MHA)."""
        attn = 4 * self.hidden * self.hidden
        mlp = 3 * self.hidden * self.intermediate
        norms = 2 * self.hidden
        embeddings = 2 * self.vocab * self.hidden
        return self.layers * (attn + mlp + norms) + embeddings + self.hidden


PRESETS: dict[str, ModelShape] = {
    "30M": ModelShape(hidden=512, layers=7, intermediate=1376, vocab=8192, heads=8),
    "120M": ModelShape(hidden=768, layers=13, intermediate=2048, vocab=16384, heads=12),
    "500M": ModelShape(hidden=1280, layers=21, intermediate=3456, vocab=32000, heads=20),
    "1B": ModelShape(hidden=2048, layers=16, intermediate=5632, vocab=32000, heads=16),
    # Llama 3's 128,256-token vocabulary on a narrow model: the embedding and lm_head
    # (32.8M entries, 131 MB in float32 each) dwarf every other tensor, as in an 8B model,
    # so the peak RSS shows how a merge scales with its largest tensor.
    "128k": ModelShape(hidden=256, layers=2, intermediate=688, vocab=128256, heads=4),
}


def build_checkpoints(
    shape: ModelShape, root: Path, shard_size: str, seed: int, delta_scale: float,
    save_dtype: str = "fp32",
) -> tuple[Path, list[Path]]:
    """Save ``base`` and ``ft0..ft2`` under ``root``; return their directories.

    Deltas are drawn one parameter at a time (from generators keyed by the parameter's
    position), so building a 1B model holds the model and one copy of its base, not four.
    """
    ft_dirs = [root / f"ft{index}" for index in range(N_FINETUNED)]
    # A kept work dir holding the same checkpoints is reused: a 1B build takes minutes.
    stamp = json.dumps({"shape": dataclasses.asdict(shape), "shard_size": shard_size,
                        "seed": seed, "delta_scale": delta_scale, "dtype": save_dtype})
    marker = root / "built.json"
    if marker.is_file() and marker.read_text(encoding="utf-8") == stamp:
        print(f"reusing the checkpoints in {root}", flush=True)
        return root / "base", ft_dirs
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    config = LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        vocab_size=shape.vocab,
        max_position_embeddings=512,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[save_dtype]
    model = LlamaForCausalLM(config).to(dtype)
    base_dir = root / "base"
    model.save_pretrained(base_dir, safe_serialization=True, max_shard_size=shard_size)
    base_state = {name: p.detach().clone() for name, p in model.named_parameters()}

    for index, ft_dir in enumerate(ft_dirs):
        with torch.no_grad():
            for k, (name, param) in enumerate(model.named_parameters()):
                # Shared direction + larger independent noise: signs agree on average but
                # disagree for a sizeable fraction of elements.
                common = _randn(param.shape, seed + 1, k)
                delta = 0.6 * common + _randn(param.shape, seed + 100 + index, k)
                param.copy_(base_state[name].float() + delta_scale * delta)
        model.save_pretrained(ft_dir, safe_serialization=True, max_shard_size=shard_size)
    marker.write_text(stamp, encoding="utf-8")
    return base_dir, ft_dirs


def _randn(shape: torch.Size, seed: int, position: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 100_003 + position)
    return torch.randn(shape, generator=generator, dtype=torch.float32)


# --------------------------------------------------------------------------- recipes


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One benchmark row: a YAML recipe and whether mergekit can run it."""

    method: str
    body: dict[str, Any]
    peer: bool = True


RecipeBuilder = Callable[[Path, list[Path]], Recipe]

WEIGHTS = (0.5, 0.3, 0.7)
DENSITIES = (0.5, 0.7, 0.3)


def _models(ft_dirs: list[Path], with_density: bool) -> list[dict[str, Any]]:
    entries = []
    for path, weight, density in zip(ft_dirs, WEIGHTS, DENSITIES, strict=True):
        params: dict[str, Any] = {"weight": weight}
        if with_density:
            params["density"] = density
        entries.append({"model": str(path), "parameters": params})
    return entries


def linear_recipe(base: Path, ft_dirs: list[Path]) -> Recipe:
    # No base_model: mergekit's linear would add the base as an extra input that
    # then lacks a weight (RuntimeError "Missing required parameter weight").
    body = {
        "merge_method": "linear",
        "models": _models(ft_dirs, with_density=False),
        "parameters": {"normalize": True},
        "dtype": "float32",
    }
    return Recipe("linear", body)


def ties_recipe(base: Path, ft_dirs: list[Path]) -> Recipe:
    body = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": _models(ft_dirs, with_density=True),
        "parameters": {"normalize": True},
        "dtype": "float32",
    }
    return Recipe("ties", body)


def task_arithmetic_recipe(base: Path, ft_dirs: list[Path]) -> Recipe:
    body = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": _models(ft_dirs, with_density=False),
        "parameters": {"normalize": False},
        "dtype": "float32",
    }
    return Recipe("task_arithmetic", body)


def ties_gradient_recipe(base: Path, ft_dirs: list[Path]) -> Recipe:
    """TIES with layer gradients and filtered values (exercises parameter resolution)."""
    models = []
    for index, path in enumerate(ft_dirs):
        weight = [0.2 + 0.1 * index, 0.9 - 0.1 * index]
        density = [{"filter": "mlp", "value": 0.4}, {"value": [0.3, 0.8]}]
        models.append({"model": str(path), "parameters": {"weight": weight, "density": density}})
    body = {
        "merge_method": "ties",
        "base_model": str(base),
        "models": models,
        "parameters": {"normalize": True},
        "dtype": "float32",
    }
    return Recipe("ties_gradient", body)


def pcb_recipe(base: Path, ft_dirs: list[Path], scope: str = "global") -> Recipe:
    """PCB at the paper's settings; mergekit has no PCB, so there is no peer."""
    body = {
        "merge_method": "pcb",
        "base_model": str(base),
        "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in ft_dirs],
        "parameters": {"density": 0.1, "lambda": 1.2, "clip": 0.01, "scope": scope},
        "dtype": "float32",
    }
    return Recipe("pcb" if scope == "global" else "pcb_tensor", body, peer=False)


def pcb_tensor_recipe(base: Path, ft_dirs: list[Path]) -> Recipe:
    return pcb_recipe(base, ft_dirs, scope="tensor")


def ties_global_recipe(base: Path, ft_dirs: list[Path]) -> Recipe:
    """TIES trimmed over the whole model (the paper's way); mergekit only trims per tensor."""
    recipe = ties_recipe(base, ft_dirs)
    body = {**recipe.body, "parameters": {"normalize": True, "scope": "global"}}
    return Recipe("ties_global", body, peer=False)


def dare_ties_recipe(base: Path, ft_dirs: list[Path]) -> Recipe:
    """DARE-TIES (random masks: ours are drawn from seeded generators, mergekit's from
    torch's global one, so the outputs differ; the row is for time and memory)."""
    recipe = ties_recipe(base, ft_dirs)
    return Recipe("dare_ties", {**recipe.body, "merge_method": "dare_ties"})


def breadcrumbs_recipe(base: Path, ft_dirs: list[Path]) -> Recipe:
    models = [{"model": str(p), "parameters": {"weight": w, "density": d, "gamma": 0.01}}
              for p, w, d in zip(ft_dirs, WEIGHTS, DENSITIES, strict=True)]
    body = {"merge_method": "breadcrumbs", "base_model": str(base), "models": models,
            "dtype": "float32"}
    return Recipe("breadcrumbs", body)


def della_recipe(base: Path, ft_dirs: list[Path]) -> Recipe:
    """DELLA (random masks, as dare_ties: compared for time and memory only)."""
    models = [{"model": str(p), "parameters": {"weight": w, "density": d, "epsilon": 0.1}}
              for p, w, d in zip(ft_dirs, WEIGHTS, (0.5, 0.7, 0.3), strict=True)]
    body = {"merge_method": "della", "base_model": str(base), "models": models,
            "parameters": {"normalize": True}, "dtype": "float32"}
    return Recipe("della", body)


def slerp_recipe(base: Path, ft_dirs: list[Path]) -> Recipe:
    """slerp from the base to the first fine-tune (mergekit's two-model form), t = 0.4."""
    body = {"merge_method": "slerp", "base_model": str(base),
            "models": [{"model": str(base)}, {"model": str(ft_dirs[0])}],
            "parameters": {"t": 0.4}, "dtype": "float32"}
    return Recipe("slerp", body)


def spectral_recipe(method: str, row: str | None = None,
                    parameters: dict[str, Any] | None = None) -> RecipeBuilder:
    """A spectral method (tsv_m, iso_c, iso_cts, cart, wudi) at its defaults, or with
    ``parameters`` under the row name ``row``: mergekit has none, so it is timed against
    our own `ties` only."""

    def build(base: Path, ft_dirs: list[Path]) -> Recipe:
        body: dict[str, Any] = {"merge_method": method, "base_model": str(base),
                                "models": [{"model": str(p)} for p in ft_dirs],
                                "dtype": "float32"}
        if parameters:
            body["parameters"] = parameters
        return Recipe(row or method, body, peer=False)

    return build


SPECTRAL_METHODS = ("tsv_m", "iso_c", "iso_cts", "cart", "wudi")


def postprocessed(builder: RecipeBuilder, suffix: str, steps: list[Any]) -> RecipeBuilder:
    """A row's recipe with `postprocess:` steps after its merge (mergekit has none): its
    time and peak RSS against the plain row's show what the steps cost."""

    def build(base: Path, ft_dirs: list[Path]) -> Recipe:
        recipe = builder(base, ft_dirs)
        return Recipe(f"{recipe.method}_{suffix}", {**recipe.body, "postprocess": steps},
                      peer=False)

    return build


# LiNeS with the paper's a (a statistics pass: the merge once more) and b = 0.5; SVC at
# FusionBench's α (every matrix merged whole, its SVD in float64).
LINES_STEPS = [{"lines": {"b": 0.5}}]
SVC_STEPS = [{"svc": {"alpha": 0.1}}]

RECIPES: dict[str, RecipeBuilder] = {
    "linear": linear_recipe,
    "ties": ties_recipe,
    "task_arithmetic": task_arithmetic_recipe,
    "ties_gradient": ties_gradient_recipe,
    "ties_global": ties_global_recipe,
    "pcb": pcb_recipe,
    "pcb_tensor": pcb_tensor_recipe,
    "dare_ties": dare_ties_recipe,
    "breadcrumbs": breadcrumbs_recipe,
    "della": della_recipe,
    "slerp": slerp_recipe,
    **{m: spectral_recipe(m) for m in SPECTRAL_METHODS},
    # WUDI's closed form, a labelled solver option: the Adam solver's 300 steps per matrix
    # take hours at 1B on a CPU.
    "wudi_closed_form": spectral_recipe("wudi", "wudi_closed_form",
                                        {"solver": "closed_form"}),
    "ties_lines": postprocessed(ties_recipe, "lines", LINES_STEPS),
    "pcb_lines": postprocessed(pcb_recipe, "lines", LINES_STEPS),
    "ties_svc": postprocessed(ties_recipe, "svc", SVC_STEPS),
}
# `--methods memory`: every per-tensor method of the memory bound's table.
POSTPROCESS_METHODS = ("ties", "ties_lines", "ties_svc", "pcb", "pcb_lines")
MEMORY_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "breadcrumbs", "della",
                  "pcb_tensor", "slerp")


def write_recipe(recipe: Recipe, directory: Path, dtype: str | None = None) -> Path:
    """Write the recipe as YAML, optionally overriding its compute ``dtype`` ("none" drops
    the key)."""
    body = {**recipe.body, "dtype": dtype} if dtype else recipe.body
    if dtype == "none":
        body = {k: v for k, v in body.items() if k != "dtype"}
    path = directory / f"{recipe.method}.yml"
    path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- tools


def ensure_mergekit_venv(venv: Path) -> Path:
    """Return ``mergekit-yaml`` from ``venv``, creating the venv when it is missing."""
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    print(f"creating mergekit venv at {venv} (torch first, then mergekit)...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = str(venv / "bin" / "pip")
    subprocess.run([pip, "install", "-q", TORCH_PIN], check=True)
    subprocess.run([pip, "install", "-q", f"mergekit=={MERGEKIT_VERSION}"], check=True)
    return exe


def ours_command(recipe: Path, out: Path) -> list[str]:
    exe = Path(sys.executable).parent / "pcbmerge"
    prefix = [str(exe)] if exe.exists() else [sys.executable, "-m", "mergekit_pcb"]
    return [*prefix, "run", str(recipe), "-o", str(out), "--force", "--quiet"]


def mergekit_command(exe: Path, recipe: Path, out: Path, shard_size: str) -> list[str]:
    # --lazy-unpickle: mergekit's low-memory loader for pickled shards (its loader opens
    # .safetensors shards with safe_open before looking at the flag, so here it changes
    # nothing; passed so that mergekit runs as its docs advise for large models)
    return [
        str(exe),
        str(recipe),
        str(out),
        "--no-copy-tokenizer",
        "--lazy-unpickle",
        "--out-shard-size",
        shard_size,
        "--quiet",
    ]


@dataclasses.dataclass
class RunResult:
    wall_s: float
    peak_rss_mb: float
    cpu_s: float = 0.0


# A child's ru_maxrss starts at its parent's RSS at fork time (Linux keeps the old mm's
# high-water mark across exec), and this process holds torch plus the checkpoints it
# built.  So every tool is started by a tiny fresh interpreter that forks the real
# command, times it and reports wait4's rusage on its last stdout line.
LAUNCHER = """
import json, os, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.Popen(sys.argv[1:])
_, status, usage = os.wait4(proc.pid, 0)
wall = time.perf_counter() - start
code = os.waitstatus_to_exitcode(status)
cpu = usage.ru_utime + usage.ru_stime
report = {"code": code, "wall_s": wall, "cpu_s": cpu, "maxrss_kib": usage.ru_maxrss}
print("\\n" + json.dumps(report))
sys.exit(code if code >= 0 else 1)
"""


def run_measured(cmd: list[str], log: Path, timeout: float, extra_env: dict[str, str]) -> RunResult:
    """Run ``cmd`` via the launcher; return its wall time and peak RSS."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra_env}
    # Lets the `python -m mergekit_pcb` fallback work from any directory.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    launcher = [sys.executable, "-c", LAUNCHER, *cmd]
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            launcher, stdout=subprocess.PIPE, stderr=sink, env=env, start_new_session=True
        )
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise TimeoutError(f"timed out after {timeout}s: {' '.join(cmd)}") from None
    lines = stdout.decode(errors="replace").strip().splitlines()
    with log.open("a", encoding="utf-8") as sink:
        sink.write("\n".join(lines[:-1]))
    report = _launcher_report(lines[-1] if lines else "", proc.returncode)
    if report["code"] != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"command failed ({report['code']}): {' '.join(cmd)}\n{tail}")
    # Linux reports ru_maxrss in KiB.
    return RunResult(
        wall_s=report["wall_s"], peak_rss_mb=report["maxrss_kib"] / 1024, cpu_s=report["cpu_s"]
    )


def _launcher_report(line: str, returncode: int) -> dict[str, Any]:
    try:
        report = json.loads(line)
    except json.JSONDecodeError:
        return {"code": returncode or 1}
    return report if isinstance(report, dict) and "code" in report else {"code": returncode or 1}


def summarize(results: list[RunResult]) -> RunResult | None:
    """Best wall time, lowest peak RSS and lowest CPU time over repeated runs."""
    if not results:
        return None
    return RunResult(
        wall_s=min(r.wall_s for r in results),
        peak_rss_mb=min(r.peak_rss_mb for r in results),
        cpu_s=min(r.cpu_s for r in results),
    )


# --------------------------------------------------------------------------- compare


@dataclasses.dataclass
class Comparison:
    max_rel_diff: float
    worst_tensor: str | None
    tensors: int
    identical: int
    missing: list[str]
    extra: list[str]
    dtype_mismatch: list[str]


def tensor_files(directory: Path) -> dict[str, Path]:
    """Map tensor name -> shard file for every ``*.safetensors`` in ``directory``."""
    from safetensors import safe_open

    where: dict[str, Path] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), shard))
    return where


def iter_pairs(
    ours: dict[str, Path], peer: dict[str, Path]
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    from safetensors import safe_open

    for name in sorted(ours.keys() & peer.keys()):
        with safe_open(str(ours[name]), framework="pt") as a_file:
            a = a_file.get_tensor(name)
        with safe_open(str(peer[name]), framework="pt") as b_file:
            b = b_file.get_tensor(name)
        yield name, a, b


def relative_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a - b| / max(max|b|, TINY), computed in float64."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    if a64.shape != b64.shape:
        return math.inf
    if a64.numel() == 0:
        return 0.0
    return (a64 - b64).abs().max().item() / max(b64.abs().max().item(), TINY)


def compare_outputs(ours_dir: Path, peer_dir: Path) -> Comparison:
    ours, peer = tensor_files(ours_dir), tensor_files(peer_dir)
    worst, worst_name, identical, mismatched = 0.0, None, 0, []
    for name, a, b in iter_pairs(ours, peer):
        if a.dtype != b.dtype:
            mismatched.append(f"{name}: {a.dtype} vs {b.dtype}")
        if a.dtype == b.dtype and torch.equal(a, b):
            identical += 1
            continue
        diff = relative_diff(a, b)
        if diff > worst or worst_name is None:
            worst, worst_name = diff, name
    return Comparison(
        max_rel_diff=worst,
        worst_tensor=worst_name,
        tensors=len(ours.keys() & peer.keys()),
        identical=identical,
        missing=sorted(peer.keys() - ours.keys()),
        extra=sorted(ours.keys() - peer.keys()),
        dtype_mismatch=mismatched,
    )


# --------------------------------------------------------------------------- report


@dataclasses.dataclass
class Row:
    method: str
    ours: RunResult | None = None
    mergekit: RunResult | None = None
    comparison: Comparison | None = None
    runs: dict[str, list[RunResult]] = dataclasses.field(default_factory=dict)
    floor_s: float | None = None  # read the inputs once + write one output
    startup_s: float | None = None  # start Python and import torch and the engine
    arithmetic_s: float | None = None  # the merge's own compute, inputs in memory

    def bound_ratio(self) -> float | None:
        """Our wall time over floor + start-up + arithmetic (the issue's bound: ≤ 1.5)."""
        parts = (self.floor_s, self.startup_s, self.arithmetic_s)
        if self.ours is None or any(p is None for p in parts):
            return None
        return self.ours.wall_s / sum(p for p in parts if p is not None)

    def speedup(self) -> float | None:
        if self.ours and self.mergekit:
            return self.mergekit.wall_s / self.ours.wall_s
        return None

    def rss_ratio(self) -> float | None:
        if self.ours and self.mergekit:
            return self.ours.peak_rss_mb / self.mergekit.peak_rss_mb
        return None


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def render_table(rows: list[Row]) -> str:
    header = (
        "| method | ours wall s | mergekit wall s | speed-up (mk/ours) | ours peak RSS MB "
        "| mergekit peak RSS MB | RSS ratio (ours/mk) "
        "| max rel diff: max over tensors of max abs(ours-mk) / max abs(mk) | identical tensors "
        "| ours wall / ours ties wall | floor s (read inputs once, write output) "
        "| ours wall / floor | start-up s | arithmetic s (inputs in memory) "
        "| ours wall / (floor + start-up + arithmetic) |"
    )
    lines = [header, "|" + "---|" * 15]
    ties = next((r.ours for r in rows if r.method == "ties" and r.ours), None)
    for row in rows:
        vs_ties = row.ours.wall_s / ties.wall_s if row.ours and ties else None
        cmp = row.comparison
        lines.append(
            "| "
            + " | ".join(
                [
                    row.method,
                    _fmt(row.ours.wall_s if row.ours else None, ".2f"),
                    _fmt(row.mergekit.wall_s if row.mergekit else None, ".2f"),
                    _fmt(row.speedup(), ".2f") + ("x" if row.speedup() else ""),
                    _fmt(row.ours.peak_rss_mb if row.ours else None, ".0f"),
                    _fmt(row.mergekit.peak_rss_mb if row.mergekit else None, ".0f"),
                    _fmt(row.rss_ratio(), ".2f"),
                    _fmt(cmp.max_rel_diff if cmp else None, ".3g"),
                    f"{cmp.identical}/{cmp.tensors}" if cmp else "n/a",
                    _fmt(vs_ties, ".2f"),
                    _fmt(row.floor_s, ".2f"),
                    _fmt(row.ours.wall_s / row.floor_s if row.ours and row.floor_s else None,
                         ".2f"),
                    _fmt(row.startup_s, ".2f"),
                    _fmt(row.arithmetic_s, ".2f"),
                    _fmt(row.bound_ratio(), ".2f"),
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def measure_baseline_rss(env: dict[str, str], workdir: Path) -> float:
    """Peak RSS (MB) of a process that only imports torch and the engine: the part of a
    merge's peak that does not depend on the model."""
    return run_measured([sys.executable, "-c", STARTUP_CODE], workdir / "baseline.log",
                        300.0, env).peak_rss_mb


def render_memory_table(rows: list[Row], largest_bytes: int, baseline_mb: float) -> str:
    """The memory bound: each method's peak RSS against its largest tensor's float32 size,
    the process baseline taken off (`(peak - baseline) / largest`), beside mergekit's."""
    largest_mb = largest_bytes / 2**20
    lines = [f"process baseline (python, torch and the engine imported): {baseline_mb:.0f} "
             f"MiB; largest tensor: {largest_mb:.0f} MiB in float32 (MiB throughout)",
             "| method | ours wall s | ours peak RSS | largest tensor (float32) "
             "| (ours peak - baseline) / largest | mergekit wall s | mergekit peak RSS "
             "| (mergekit peak - baseline) / largest |",
             "|" + "---|" * 8]
    for row in rows:
        ours, peer = row.ours, row.mergekit
        lines.append("| " + " | ".join([
            row.method,
            _fmt(ours.wall_s if ours else None, ".1f"),
            _fmt(ours.peak_rss_mb if ours else None, ".0f"),
            f"{largest_mb:.0f}",
            _fmt((ours.peak_rss_mb - baseline_mb) / largest_mb if ours else None, ".1f"),
            _fmt(peer.wall_s if peer else None, ".1f"),
            _fmt(peer.peak_rss_mb if peer else None, ".0f"),
            _fmt((peer.peak_rss_mb - baseline_mb) / largest_mb if peer else None, ".1f"),
        ]) + " |")
    return "\n".join(lines)


def report_details(rows: list[Row]) -> str:
    notes = []
    for row in rows:
        cmp = row.comparison
        if cmp is None:
            continue
        if cmp.worst_tensor and cmp.max_rel_diff > 0:
            notes.append(f"{row.method}: worst tensor {cmp.worst_tensor} ({cmp.max_rel_diff:.3g})")
        for label, items in (
            ("missing from ours", cmp.missing),
            ("extra in ours", cmp.extra),
            ("dtype mismatch", cmp.dtype_mismatch),
        ):
            if items:
                notes.append(f"{row.method}: {label}: {', '.join(items[:8])}")
    return "\n".join(notes)


def dump_json(path: Path, rows: list[Row], meta: dict[str, Any]) -> None:
    payload = {
        "meta": meta,
        "rows": [
            {
                **dataclasses.asdict(row),
                "speedup": row.speedup(),
                "rss_ratio": row.rss_ratio(),
            }
            for row in rows
        ],
    }
    path.write_text(json.dumps(payload, indent=2), encoding="utf-8")


# --------------------------------------------------------------------------- size sweep


def dense_pcb_command(recipe: Path, out: Path) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "scripts" / "pcb_dense.py"), str(recipe), "-o",
            str(out)]


def dense_estimate_gb(params: int, models: int) -> float:
    """Peak of the flatten-everything PCB: the loaded models, the [n, D] rows, a sort's
    values and int64 indices, and a few same-size temporaries."""
    return ((models + 1) * params * 4 + models * params * (4 * 5 + 8)) / 1e9


@dataclasses.dataclass
class SweepRow:
    size: str
    params: int
    runs: dict[str, RunResult | None]
    dense_note: str = ""
    dense_rel_diff: float | None = None


SWEEP_TOOLS = ("pcb global", "pcb tensor", "ties", "dense PCB")


def run_sweep(args: argparse.Namespace, workdir: Path) -> list[SweepRow]:
    rows = []
    for size in _split(args.sweep):
        shape = PRESETS[size]
        root = workdir / f"sweep-{size}"
        print(f"sweep {size}: {shape.param_count() / 1e6:.0f}M params", flush=True)
        base, ft_dirs = build_checkpoints(shape, root / "models", args.shard_size, args.seed,
                                          args.delta_scale)
        recipes = {"pcb global": pcb_recipe(base, ft_dirs),
                   "pcb tensor": pcb_tensor_recipe(base, ft_dirs),
                   "ties": ties_recipe(base, ft_dirs)}
        runs: dict[str, RunResult | None] = {}
        for tool, recipe in recipes.items():
            path = write_recipe(recipe, root)
            out = root / f"out-{recipe.method}"
            print(f"  {tool}...", flush=True)
            runs[tool] = run_measured(ours_command(path, out), root / f"{recipe.method}.log",
                                      args.timeout, thread_env(args))
            if tool != "pcb global":
                shutil.rmtree(out, ignore_errors=True)
        row = SweepRow(size, shape.param_count(), runs)
        estimate = dense_estimate_gb(shape.param_count(), len(ft_dirs))
        if estimate > args.dense_max_gb:
            runs["dense PCB"] = None
            row.dense_note = f"skipped: needs about {estimate:.0f} GB (> --dense-max-gb)"
        else:
            print("  dense PCB...", flush=True)
            dense_out = root / "out-dense"
            runs["dense PCB"] = run_measured(
                dense_pcb_command(write_recipe(recipes["pcb global"], root), dense_out),
                root / "dense.log", args.timeout, thread_env(args))
            row.dense_rel_diff = compare_outputs(root / "out-pcb", dense_out).max_rel_diff
        rows.append(row)
        shutil.rmtree(root, ignore_errors=True)  # the largest size needs the disk back
    return rows


def render_sweep(rows: list[SweepRow]) -> str:
    tools = " | ".join(f"{tool} wall s | {tool} peak RSS MB" for tool in SWEEP_TOOLS)
    header = f"| size | params | {tools} | pcb global vs dense max rel diff |"
    lines = [header, "|" + "---|" * (3 + 2 * len(SWEEP_TOOLS))]
    for row in rows:
        cells = [row.size, f"{row.params / 1e6:.0f}M"]
        for tool in SWEEP_TOOLS:
            run = row.runs.get(tool)
            cells += [_fmt(run.wall_s if run else None, ".1f"),
                      _fmt(run.peak_rss_mb if run else None, ".0f")]
        cells.append(_fmt(row.dense_rel_diff, ".2g") if row.dense_rel_diff is not None
                     else row.dense_note or "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    first, last = rows[0].runs, rows[-1].runs
    for tool in SWEEP_TOOLS:
        a, b = first.get(tool), last.get(tool)
        if a and b:
            lines.append(f"\n{tool}: peak RSS {rows[-1].size} / {rows[0].size} = "
                         f"{b.peak_rss_mb / a.peak_rss_mb:.2f}x")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", choices=sorted(PRESETS), default="30M")
    parser.add_argument("--hidden", type=int, help="override the preset's hidden size")
    parser.add_argument("--layers", type=int, help="override the preset's layer count")
    parser.add_argument("--intermediate", type=int, help="override the MLP width")
    parser.add_argument("--vocab", type=int, help="override the vocabulary size")
    parser.add_argument("--heads", type=int, help="override the attention head count")
    parser.add_argument(
        "--methods",
        default="linear,ties,task_arithmetic,ties_global,pcb,pcb_tensor",
        help=f"comma-separated recipes to run; known: {', '.join(RECIPES)}; memory and "
        "spectral name groups of them",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per tool; best wall time is reported"
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16", "none"],
        help="override the recipes' dtype (default: float32 as written by each recipe; "
        "none: no dtype key, so each tool computes in the inputs' dtype as mergekit does)",
    )
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both tools")
    parser.add_argument("--workdir", type=Path, help="default: a fresh temp dir")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument("--shard-size", default="50MB", help="input shard size")
    parser.add_argument("--out-shard-size", default="5B", help="mergekit --out-shard-size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                        help="dtype the checkpoints are stored in (1B runs use bf16)")
    parser.add_argument("--no-arithmetic", dest="arithmetic", action="store_false",
                        help="skip timing start-up and the merge's compute alone")
    parser.add_argument("--busy", action="store_true",
                        help="keep one core at 100 %% with another process during the runs")
    parser.add_argument("--cache", choices=["warm", "cold", "asis"], default="warm",
                        help="page cache before each timed run and the floor: inputs read "
                        "once (warm), dropped (cold, needs root), or left as the last run "
                        "left it (asis)")
    parser.add_argument("--delta-scale", type=float, default=0.005)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--mergekit-venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--no-mergekit", action="store_true", help="skip the mergekit runs")
    parser.add_argument("--no-ours", action="store_true", help="skip the pcbmerge runs")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    parser.add_argument("--sweep", help="instead: PCB memory sweep over sizes, e.g. 30M,120M,500M")
    parser.add_argument("--dense-max-gb", type=float, default=16.0,
                        help="skip the dense PCB peer when it would need more memory")
    args = parser.parse_args(argv)
    unknown = [m for m in _split(args.methods) if m not in RECIPES]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {sorted(RECIPES)}")
    return args


def _split(methods: str) -> list[str]:
    names = [m.strip() for m in methods.split(",") if m.strip()]
    groups = {"memory": MEMORY_METHODS, "spectral": SPECTRAL_METHODS,
              "postprocess": POSTPROCESS_METHODS}
    return [n for m in names for n in groups.get(m, (m,))]


def resolve_shape(args: argparse.Namespace) -> ModelShape:
    preset = PRESETS[args.params]
    overrides = {
        field: getattr(args, field)
        for field in ("hidden", "layers", "intermediate", "vocab", "heads")
        if getattr(args, field) is not None
    }
    return dataclasses.replace(preset, **overrides)


def thread_env(args: argparse.Namespace) -> dict[str, str]:
    """Pin both tools' intra-op thread count when ``--threads`` is given."""
    if args.threads is None:
        return {}
    value = str(args.threads)
    return {"OMP_NUM_THREADS": value, "MKL_NUM_THREADS": value}


@dataclasses.dataclass(frozen=True)
class Job:
    """One tool's command for one recipe."""

    cmd: list[str]
    out: Path
    log: Path


def bench_method(
    recipe: Recipe, workdir: Path, args: argparse.Namespace, mergekit: Path | None
) -> Row:
    """Run both tools ``args.repeats`` times, interleaved, and compare their outputs."""
    recipe_path = write_recipe(recipe, workdir, args.dtype)
    jobs: dict[str, Job] = {}
    if not args.no_ours:
        out = workdir / f"out-ours-{recipe.method}"
        log = workdir / f"ours-{recipe.method}.log"
        jobs["ours"] = Job(ours_command(recipe_path, out), out, log)
    if mergekit is not None and recipe.peer:
        out = workdir / f"out-mergekit-{recipe.method}"
        log = workdir / f"mergekit-{recipe.method}.log"
        jobs["mergekit"] = Job(
            mergekit_command(mergekit, recipe_path, out, args.out_shard_size), out, log
        )
    results: dict[str, list[RunResult]] = {tool: [] for tool in jobs}
    floors: list[float] = []
    inputs = [Path(m["model"]) for m in recipe.body["models"]]
    if recipe.body.get("base_model"):
        inputs.append(Path(recipe.body["base_model"]))
    with BusyCore(args.busy):
        for _ in range(args.repeats):
            for tool, job in jobs.items():
                shutil.rmtree(job.out, ignore_errors=True)
                prepare_page_cache(inputs, args.cache)
                results[tool].append(run_measured(job.cmd, job.log, args.timeout,
                                                  thread_env(args)))
            any_out = next((j.out for j in jobs.values() if j.out.is_dir()), None)
            if any_out is not None:
                prepare_page_cache(inputs, args.cache)
                floors.append(measure_floor(inputs, any_out, workdir))
        startup = arithmetic = None
        if not args.no_ours and args.arithmetic:
            startup = measure_startup(thread_env(args))
            arithmetic = measure_arithmetic(recipe_path, thread_env(args), args.timeout)
    row = Row(
        recipe.method,
        summarize(results.get("ours", [])),
        summarize(results.get("mergekit", [])),
        runs=results,
        floor_s=min(floors) if floors else None,
        startup_s=startup,
        arithmetic_s=arithmetic,
    )
    if row.ours and row.mergekit:
        row.comparison = compare_outputs(jobs["ours"].out, jobs["mergekit"].out)
    return row


def _read_all(inputs: list[Path]) -> None:
    block = memoryview(bytearray(16 << 20))
    for directory in inputs:
        for path in sorted(directory.glob("*.safetensors")):
            with open(path, "rb", buffering=0) as f:
                while f.readinto(block):
                    pass


def prepare_page_cache(inputs: list[Path], mode: str) -> None:
    """Give every timed run the same start (`--cache`): the inputs read once beforehand
    (warm), or the page cache dropped (cold; needs root). Without it, whichever tool runs
    after a peer that used most of RAM reads its inputs from disk and the other does not."""
    if mode == "warm":
        _read_all(inputs)
    elif mode == "cold":
        os.sync()
        try:
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
        except OSError as exc:
            raise SystemExit(f"--cache cold: cannot drop the page cache ({exc})") from None


def measure_floor(inputs: list[Path], output: Path, workdir: Path) -> float:
    """Seconds to read every input file once and write (and fsync) one file the size of
    the output: what any merge of these models must at least spend on I/O."""
    block = bytearray(16 << 20)
    view = memoryview(block)
    start = time.perf_counter()
    _read_all(inputs)
    out_bytes = sum(p.stat().st_size for p in output.glob("*.safetensors"))
    target = workdir / "floor.bin"
    with open(target, "wb", buffering=0) as f:
        left = out_bytes
        while left > 0:
            n = min(left, len(block))
            f.write(view[:n])
            left -= n
        os.fsync(f.fileno())
    elapsed = time.perf_counter() - start
    target.unlink()
    return elapsed


STARTUP_CODE = "import torch, safetensors.torch, mergekit_pcb.engine.stream"

# The merge's own compute: the engine's statistics passes and every part's merge, as
# `pcbmerge run` does them (the same thread policy and part workers), on inputs already in
# the page cache, results dropped unwritten.
ARITHMETIC_CODE = """
import sys, time
from mergekit_pcb.engine.plan import build_plan
from mergekit_pcb.engine.stream import ThreadPolicy, gather_statistics, merge_parts
from mergekit_pcb.recipe.schema import load_recipe
import torch
plan = build_plan(load_recipe(sys.argv[1]), "")
dev = torch.device("cpu")
for task in plan.tasks:  # warm the page cache, untimed
    for key in task.reads(plan.base_key):
        plan.checkpoints[key].read(task.source(key))
policy = ThreadPolicy()
start = time.perf_counter()
gather_statistics(plan, dev, pipeline=True, threads=policy)
with policy.workers(dev, True) as workers:
    merge_parts(plan, dev, True, policy, workers, lambda part, out: None)
print(time.perf_counter() - start)
"""


def measure_startup(env: dict[str, str], repeats: int = 3) -> float:
    """Best wall time of a Python process that imports torch and the engine, then exits."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", STARTUP_CODE], check=True,
                       env={**os.environ, **env})
        times.append(time.perf_counter() - start)
    return min(times)


def measure_arithmetic(recipe: Path, env: dict[str, str], timeout: float) -> float:
    """Seconds of the merge's compute alone (`ARITHMETIC_CODE`), in a fresh process."""
    done = subprocess.run([sys.executable, "-c", ARITHMETIC_CODE, str(recipe)], check=True,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **env})
    return float(done.stdout.strip().splitlines()[-1])


class BusyCore:
    """A child process that keeps one core at 100 % while the block runs (`--busy`)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> BusyCore:
        if self.enabled:
            self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def bench_meta(args: argparse.Namespace, shape: ModelShape, load_before: float) -> dict[str, Any]:
    return {
        "shape": dataclasses.asdict(shape),
        "params": shape.param_count(),
        "repeats": args.repeats,
        "threads": args.threads,
        "dtype": args.dtype,
        "save_dtype": args.save_dtype,
        "busy": args.busy,
        "cache": args.cache,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg()[0],
    }


def run_benchmark(
    args: argparse.Namespace, shape: ModelShape, workdir: Path, mergekit: Path | None
) -> list[Row]:
    start = time.perf_counter()
    base, ft_dirs = build_checkpoints(
        shape, workdir / "models", args.shard_size, args.seed, args.delta_scale,
        args.save_dtype,
    )
    print(f"checkpoints built in {time.perf_counter() - start:.1f}s", flush=True)
    rows = []
    for method in _split(args.methods):
        recipe = RECIPES[method](base, ft_dirs)
        print(f"running {method}...", flush=True)
        try:
            row = bench_method(recipe, workdir, args, mergekit)
        except TimeoutError as exc:
            # One slow row must not lose the rows measured before it (a 1B run is hours).
            print(f"  {method}: {exc}; the row is left out", flush=True)
            continue
        rows.append(row)
        print("  " + row_summary(row), flush=True)
    return rows


def row_summary(row: Row) -> str:
    """One progress line per finished row, so a later failure loses no figure."""
    parts = [f"{tool} {r.wall_s:.1f} s, peak RSS {r.peak_rss_mb:.0f} MB"
             for tool, r in (("ours", row.ours), ("mergekit", row.mergekit)) if r]
    return f"{row.method}: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    shape = resolve_shape(args)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-merge-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        try:
            print(render_sweep(run_sweep(args, workdir)))
        finally:
            if not (args.keep or args.workdir):
                shutil.rmtree(workdir, ignore_errors=True)
        return 0
    mergekit = None if args.no_mergekit else ensure_mergekit_venv(args.mergekit_venv)
    print(f"workdir {workdir}; {shape} = {shape.param_count() / 1e6:.1f}M params", flush=True)
    load_before = os.getloadavg()[0]
    if load_before > 0.5:
        print(f"note: 1-min load average is {load_before:.2f}; timings may be noisy", flush=True)
    try:
        rows = run_benchmark(args, shape, workdir, mergekit)
        print(f"\npage cache before each run: {args.cache}; busy core: {args.busy}")
        print(render_table(rows))
        baseline = measure_baseline_rss(thread_env(args), workdir)
        print("\n" + render_memory_table(rows, shape.largest_tensor_bytes(), baseline))
        details = report_details(rows)
        if details:
            print("\n" + details)
        if args.json:
            dump_json(args.json, rows, bench_meta(args, shape, load_before))
    finally:
        if args.keep or args.workdir:
            print(f"\nkept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
