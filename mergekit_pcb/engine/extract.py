"""Adapters as outputs: a checkpoint's difference from its base written as a PEFT LoRA
adapter (`pcbmerge extract-lora`, and `pcbmerge run --as-lora` for a merge's result).

Each changed weight matrix gets the truncated SVD of its update, Δ ≈ U_k·diag(s_k)·V_kᵀ,
stored as lora_B = U_k·diag(√s_k) and lora_A = diag(√s_k)·V_kᵀ with scale 1 (lora_alpha =
r per module): exact for the rank (Eckart–Young), with the relative error
‖Δ − B·A‖_F / ‖Δ‖_F reported per matrix. The rank is `rank` for every matrix, or with an
energy share the smallest k whose singular values hold that share of ‖Δ‖²_F (at most
`rank`). Tensors that are not low rank by nature (input embeddings, norms, biases, any
other 1-D or N-D tensor) go whole into `modules_to_save`, with their module; a module with
a changed bias is saved whole rather than split between LoRA and a whole bias.

Tied embeddings: a base or fine-tuned model whose files hold no LM head (it is the input
embedding) is handled: a changed embedding is saved whole with `ensure_weight_tying`, so
peft keeps the head tied to it; a fine-tuned model that unties its head gets the head whole.

Memory: one matrix's update (and its SVD) at a time; the factors (the adapter's size) are
held until the file is written.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_pcb.errors import CheckpointError, UserError
from mergekit_pcb.io.checkpoints import open_checkpoint
from mergekit_pcb.io.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PEFT_PREFIX
from mergekit_pcb.io.reader import Checkpoint
from mergekit_pcb.io.resolve import model_paths
from mergekit_pcb.io.writer import OutputTensor, atomic_output_dir, write_safetensors
from mergekit_pcb.methods.spectral import default_rtol, thin_svd

REPORT_FILE = "lora_extraction.json"
# Input embeddings (indexed by token or position, not a matrix a layer multiplies by): whole.
_EMBEDDING = re.compile(r"(^|\.)(embed[^.]*|wte|wpe|word_embeddings|position_embeddings|"
                        r"token_type_embeddings|shared|tok_embeddings)\.weight$")
_HEAD = re.compile(r"(^|\.)lm_head\.weight$")
TIED_HEAD = "lm_head.weight"
# Model types whose linear layers are transformers' Conv1D (weights stored in × out): peft
# adapts them with fan_in_fan_out.
CONV1D_MODEL_TYPES = frozenset({"gpt2"})


@dataclass(frozen=True)
class MatrixResult:
    """One matrix of the adapter: its rank, its full rank, the relative error of B·A."""

    name: str
    rank: int
    full_rank: int
    relative_error: float


@dataclass
class Extraction:
    output: Path
    matrices: list[MatrixResult] = field(default_factory=list)
    whole: list[str] = field(default_factory=list)  # tensors saved whole
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        errors = [m.relative_error for m in self.matrices]
        return {
            "output": str(self.output), "matrices": len(self.matrices),
            "whole_tensors": len(self.whole),
            "max_rank": max((m.rank for m in self.matrices), default=0),
            "max_relative_error": max(errors, default=0.0),
            "seconds": round(self.seconds, 3),
        }

    def report(self) -> dict[str, Any]:
        """What `lora_extraction.json` holds: the summary and every matrix."""
        return {**self.summary(),
                "per_matrix": [{"name": m.name, "rank": m.rank, "full_rank": m.full_rank,
                                "relative_error": m.relative_error} for m in self.matrices],
                "whole": self.whole}


def choose_rank(s: torch.Tensor, rank: int, energy: float | None, rtol: float = 0.0) -> int:
    """The rank kept of singular values `s` (descending): `rank`, or the smallest k holding
    `energy` of Σs² (at most `rank`); never more than the numerical rank (values above
    rtol·s₀: below it a direction is the rounding of the weights the update came from)."""
    nonzero = int(((s > 0) & (s > rtol * (float(s[0]) if s.numel() else 0.0))).sum())
    if energy is None:
        return min(rank, nonzero)
    squares = s.double() ** 2
    total = float(squares.sum())
    if total == 0:
        return 0
    share = torch.cumsum(squares, 0) / total
    k = int((share < energy - 1e-12).sum()) + 1  # the first k reaching the share
    return min(k, rank, nonzero)


# Columns a sketch takes beyond the rank asked for (see `_thin_svd`).
SKETCH_OVERSAMPLE = 10


def _thin_svd(work: torch.Tensor, rank: int, rtol: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of `work`, or of its projection on a seeded sketch of its range when
    that loses nothing: an update of low rank (an adapter's, a merge of adapters') is found
    in O(m·n·p) instead of a full SVD's O(m·n·min(m, n)). The sketch is used only when
    ‖work − QQᵀwork‖_F ≤ rtol·s₀: every direction it misses is then below the rank rule's
    threshold (the full SVD would drop it too), and by Weyl's inequality the singular values
    it gives are the full SVD's to within that bound. A full-rank update takes the full SVD."""
    rows, cols = work.shape
    columns = rank + SKETCH_OVERSAMPLE
    if 2 * columns < min(rows, cols):
        g = torch.Generator().manual_seed(0)
        omega = torch.randn(cols, columns, generator=g, dtype=work.dtype).to(work.device)
        q = torch.linalg.qr(work @ omega).Q
        small = q.T @ work
        u, s, vh = thin_svd(small)
        missed = float(torch.linalg.matrix_norm(work - q @ small))
        if missed <= rtol * (float(s[0]) if s.numel() else 0.0):
            return q @ u, s, vh
    return thin_svd(work)  # float64 again where float32 does not converge


def lora_factors(delta: torch.Tensor, rank: int, energy: float | None
                 ) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """(B, A, relative error, full rank) of the truncated SVD of `delta` (float32 factors;
    the SVD in float64 for matrices small enough, float32 otherwise)."""
    work = delta.to(torch.float64 if delta.numel() <= 1 << 22 else torch.float32)
    # the update is a difference of float32 (or narrower) weights: float32's rank rule
    rtol = default_rtol(delta.shape, torch.float32)
    u, s, vh = _thin_svd(work, rank, rtol)
    k = choose_rank(s, rank, energy, rtol)
    total = float(torch.linalg.matrix_norm(work.double()) ** 2)
    kept = float((s[:k].double() ** 2).sum())
    error = math.sqrt(max(total - kept, 0.0) / total) if total > 0 else 0.0
    root = s[:k].sqrt()
    b = (u[:, :k] * root).to(torch.float32).contiguous()
    a = (root[:, None] * vh[:k]).to(torch.float32).contiguous()
    return b, a, error, min(delta.shape)


def _config(ckpt: Checkpoint) -> dict[str, Any]:
    path = ckpt.root / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0]


@dataclass
class _Plan:
    """What goes into the adapter, found in one pass over the tensors."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    results: dict[str, MatrixResult] = field(default_factory=dict)
    whole: dict[str, str] = field(default_factory=dict)  # output tensor -> fine-tuned source
    tied: bool = False


def _source_name(ft: Checkpoint, base: Checkpoint, name: str) -> str | None:
    """Where the fine-tuned model keeps base tensor `name`: itself, or for an LM head its
    files do not hold (tied), the input embedding of the same shape."""
    if name in ft:
        return name
    if _HEAD.search(name):
        shape = base.info(name).shape
        tied = [n for n in ft.names() if _EMBEDDING.search(n) and ft.info(n).shape == shape]
        if len(tied) == 1:
            return tied[0]
    return None


def _plan(ft: Checkpoint, base: Checkpoint, rank: int, energy: float | None,
          transpose: bool) -> _Plan:
    plan = _Plan()
    ft_tied = not any(_HEAD.search(n) for n in ft.names())
    for name in base.names():
        source = _source_name(ft, base, name)
        if source is None:
            raise CheckpointError(f"model {ft.ref} has no tensor '{name}', which the base "
                                  f"{base.ref} holds")
        b_info, f_info = base.info(name), ft.info(source)
        if b_info.shape != f_info.shape:
            raise CheckpointError(f"tensor '{name}': {ft.ref} has shape {list(f_info.shape)}, "
                                  f"the base {list(b_info.shape)}")
        new, old = ft.read(source), base.read(name)
        common = torch.promote_types(new.dtype, old.dtype)
        if torch.equal(new.to(common), old.to(common)):
            continue  # unchanged (a bf16 base's tensor written as float32 too): not in it
        if len(b_info.shape) == 2 and new.dtype.is_floating_point \
                and not _EMBEDDING.search(name):
            delta = new.to(torch.float32) - old.to(torch.float32)
            b, a, error, full = lora_factors(delta.T if transpose else delta, rank, energy)
            del delta
            if b.shape[1] == 0:
                continue
            plan.factors[name] = (b, a)
            plan.results[name] = MatrixResult(name, b.shape[1], full, error)
        else:
            plan.whole[name] = source
    # an adapter cannot add a tensor; a head the base ties but the fine-tuned model unties
    # is the exception: the base model has the module (tied), the adapter saves it whole
    for name in ft.names():
        if name in base:
            continue
        if not _HEAD.search(name):
            raise CheckpointError(f"model {ft.ref} has tensor '{name}', which the base "
                                  f"{base.ref} lacks: an adapter cannot add it")
        plan.whole[name] = name
    # a module with a whole-saved parameter (a changed bias) is saved whole altogether, with
    # every parameter it has: peft's copy of the module loads each one from the adapter
    whole_modules = {_module(n) for n in plan.whole}
    for name in ft.names():
        if _module(name) in whole_modules and name not in plan.whole:
            plan.factors.pop(name, None)
            plan.results.pop(name, None)
            plan.whole[name] = name
    base_tied = not any(_HEAD.search(n) for n in base.names())
    embeddings = [n for n in plan.whole if _EMBEDDING.search(n)]
    plan.tied = base_tied and ft_tied and bool(embeddings)
    if plan.tied:
        # peft ties the head's saved copy to the embedding's and loads both (the head is
        # `lm_head`: transformers' name for the tied output embedding)
        plan.whole[TIED_HEAD] = embeddings[0]
    return plan


def adapter_config(plan: _Plan, base_ref: str, transpose: bool) -> dict[str, Any]:
    """A PEFT LoraConfig as JSON: rank and alpha per module (alpha = rank: scale 1)."""
    ranks = {_module(n): r.rank for n, r in plan.results.items()}
    top = max(ranks.values(), default=1)
    pattern = {re.escape(m): k for m, k in ranks.items() if k != top}
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_ref,
        "r": top, "lora_alpha": top, "use_rslora": False, "use_dora": False,
        "target_modules": sorted(ranks) or None, "rank_pattern": pattern,
        "alpha_pattern": dict(pattern), "fan_in_fan_out": transpose, "bias": "none",
        "lora_dropout": 0.0, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": sorted({_module(n) for n in plan.whole
                                   if not (plan.tied and n == TIED_HEAD)}) or None,
        "ensure_weight_tying": plan.tied,
    }


def _layout(ft: Checkpoint, plan: _Plan) -> tuple[list[OutputTensor], list[tuple[str, str]]]:
    """The adapter file's tensors in order, and where each comes from: ('A'|'B', matrix) or
    ('whole', fine-tuned tensor)."""
    layout, sources = [], []
    for name, (b, a) in plan.factors.items():
        module = PEFT_PREFIX + _module(name)
        layout += [OutputTensor(f"{module}.lora_A.weight", a.dtype, tuple(a.shape)),
                   OutputTensor(f"{module}.lora_B.weight", b.dtype, tuple(b.shape))]
        sources += [("A", name), ("B", name)]
    for name, source in plan.whole.items():
        info = ft.info(source)
        layout.append(OutputTensor(PEFT_PREFIX + name, info.dtype, tuple(info.shape)))
        sources.append(("whole", source))
    return layout, sources


def extract_lora(finetuned: str, base: str, output: Path, *, rank: int,
                 energy: float | None = None, force: bool = False,
                 allow_pickle: bool = False, base_name: str | None = None) -> Extraction:
    """Write `finetuned` − `base` as a PEFT adapter in `output`; `base_name` is what the
    adapter's config names as its base (default: `base` as given)."""
    if rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    if energy is not None and not 0 < energy <= 1:
        raise UserError(f"--energy must be in (0, 1], got {energy}")
    start = time.perf_counter()
    inputs = [p for ref in (finetuned, base) for p in model_paths(ref, allow_pickle=True)]
    with open_checkpoint(finetuned, allow_pickle=allow_pickle) as ft, \
            open_checkpoint(base, allow_pickle=allow_pickle) as b:
        transpose = _config(ft).get("model_type") in CONV1D_MODEL_TYPES
        plan = _plan(ft, b, rank, energy, transpose)
        if not plan.factors and not plan.whole:
            raise UserError(f"model {finetuned} equals its base {base}: there is no update "
                            "to write as an adapter")
        layout, sources = _layout(ft, plan)

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            for spec, (what, name) in zip(layout, sources, strict=True):
                if what == "whole":
                    yield spec.name, ft.read(name)
                else:
                    yield spec.name, plan.factors[name][0 if what == "B" else 1]

        result = Extraction(output.resolve(), list(plan.results.values()),
                            list(plan.whole))
        with atomic_output_dir(output, force=force, inputs=inputs, kind="lora") as tmp:
            write_safetensors(tmp / ADAPTER_WEIGHTS, layout, tensors(), durable=True)
            config = adapter_config(plan, base_name or base, transpose)
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
            result.seconds = time.perf_counter() - start
            (tmp / REPORT_FILE).write_text(json.dumps(result.report(), indent=1) + "\n")
    return result


__all__ = ["Extraction", "MatrixResult", "adapter_config", "choose_rank", "extract_lora",
           "lora_factors"]
