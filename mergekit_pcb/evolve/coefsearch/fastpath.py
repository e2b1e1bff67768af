"""A merge split into what depends on the coefficients (`weight`, `lambda`) and what does
not, so that a candidate costs one weighted sum per tensor instead of a merge.

For every output tensor, and every slice the merge engine would process it in, the parts
are computed once, exactly as the method computes them inside its merge:
- `linear`: the models; `task_arithmetic`: base and task vectors;
- `ties`: base and the trimmed task vectors (per tensor, or by the whole-model thresholds);
- `dare_*`: base and the dropped, rescaled task vectors (the engine's seeded masks);
- `pcb`: base, the soft weights Sᵢ, the clipped task vectors τ̃ᵢ and max(ΣSᵢ, 1e-12) (the
  scores Bᵢ and every statistic are computed here, once).
A candidate then runs the tail of the method's own function on those parts
(`combine_task_vectors`, `linear_merge`, PCB's weighted mean in `pcb_combine`'s order), so
its tensors equal the engine's merge bit for bit; the tests check it with `torch.equal`.
Tensors the merge does not combine (copied buffers, running statistics, `take` rules)
are kept as outputs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_pcb.engine.plan import MergePlan, TensorTask
from mergekit_pcb.engine.rng import tensor_generator
from mergekit_pcb.engine.stream import all_finite, compute_part, gather_statistics, slices
from mergekit_pcb.errors import CheckpointError
from mergekit_pcb.methods import pcb as pcb_module
from mergekit_pcb.methods.linear import Linear, linear_merge
from mergekit_pcb.methods.ops import (
    COMBINE_CHUNK,
    combine_task_vectors,
    random_drop,
)
from mergekit_pcb.methods.pcb import PcbGlobalStats, RowStats, clip_indices, drop_index, minmax
from mergekit_pcb.methods.selection import kth_smallest
from mergekit_pcb.methods.ties import TiesGlobalStats, trim_task_vectors

from .config import COEFFICIENTS

SUPPORTED = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "pcb")


@dataclass
class Piece:
    """One slice [start, stop) of one output tensor (None, None: the whole tensor)."""

    start: int | None
    stop: int | None
    kind: str  # a method name, or "fixed" (the output itself)
    parts: dict[str, torch.Tensor]


@dataclass
class Parts:
    """Every tensor's pieces, and what they were made with (`structure`): a candidate whose
    non-coefficient parameters differ cannot use them."""

    structure: dict[str, str]
    pieces: dict[str, list[Piece]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for ps in self.pieces.values() for p in ps
                   for t in p.parts.values())

    def save(self, path: Path) -> None:
        """As safetensors plus a JSON index, each written to a temporary name and renamed
        (a killed run leaves the old file or none, never half of one)."""
        from safetensors.torch import save_file

        flat, index = {}, {}
        for name, pieces in self.pieces.items():
            entries = []
            for i, p in enumerate(pieces):
                keys = {}
                for part, t in p.parts.items():
                    key = f"{len(flat)}"
                    flat[key] = t.contiguous()
                    keys[part] = key
                entries.append({"start": p.start, "stop": p.stop, "kind": p.kind,
                                "parts": keys, "i": i})
            index[name] = entries
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(flat, str(tmp))
        tmp.replace(path)
        meta = path.with_suffix(".json")
        tmp_meta = meta.with_name(f".{meta.name}.tmp")
        tmp_meta.write_text(json.dumps({"structure": self.structure, "index": index}))
        tmp_meta.replace(meta)

    @classmethod
    def load(cls, path: Path) -> Parts:
        from safetensors.torch import load_file

        doc = json.loads(path.with_suffix(".json").read_text())
        flat = load_file(str(path))
        out = cls(doc["structure"])
        for name, entries in doc["index"].items():
            out.pieces[name] = [Piece(e["start"], e["stop"], e["kind"],
                                      {part: flat[k] for part, k in e["parts"].items()})
                                for e in entries]
        return out


def structure_of(plan: MergePlan, task: TensorTask) -> str:
    """What a tensor's parts depend on: everything but the coefficients."""
    route = task.route
    return json.dumps({
        "route": route.label, "kind": route.kind, "shape": list(task.shape),
        "out": str(task.out_dtype), "compute": str(task.compute_dtype), "seed": plan.seed,
        "params": {k: v for k, v in task.global_params.items() if k not in COEFFICIENTS},
        "models": [{k: v for k, v in p.items() if k not in COEFFICIENTS}
                   for p in task.model_params],
        "inputs": route.inputs,
    }, sort_keys=True, default=str)


def supported(plan: MergePlan) -> bool:
    # the parts are read straight from the inputs: rows a tokenizer re-orders are not
    return all(r.method is None or r.method.name in SUPPORTED for r in plan.routes
               if r.kind == "merge") and all(t.vocab is None for t in plan.tasks)


def parts_bytes(plan: MergePlan) -> int:
    """What the parts of `plan` take in memory (and on disk): per merged element, the
    number of parts its method keeps, in its compute dtype."""
    total = 0
    for task in plan.tasks:
        numel = 1
        for d in task.shape:
            numel *= d
        route = task.route
        if route.kind != "merge" or route.method is None:
            total += numel * task.out_dtype.itemsize
            continue
        n = len(route.inputs)
        name = route.method.name
        count = n if name == "linear" else (2 * n + 2 if name == "pcb" else n + 1)
        size = 4 if name == "pcb" else task.compute_dtype.itemsize
        total += numel * count * size
        if name in ("ties", "dare_ties"):
            total += numel * n  # the int8 signs
    return total


def _read(plan: MergePlan, task: TensorTask, start: int | None, stop: int | None
          ) -> dict[str, torch.Tensor]:
    """The task's inputs as the engine reads them: checked finite, in the compute dtype."""
    values = {}
    for key in task.reads(plan.base_key):
        tensor = plan.checkpoints[key].read(task.name, start, stop)
        if plan.check_finite and not all_finite(tensor):
            raise CheckpointError(f"tensor '{task.name}' of model {key} contains NaN or Inf")
        values[key] = tensor.to(dtype=task.compute_dtype)
    return values


def build_parts(plan: MergePlan) -> Parts:
    """Every tensor's parts for `plan`'s non-coefficient parameters: the statistics passes
    run once here, the scores and trims once per tensor."""
    dev = torch.device("cpu")
    gather_statistics(plan, dev)
    out = Parts({t.name: structure_of(plan, t) for t in plan.tasks})
    for task in plan.tasks:
        pieces = []
        for a, b in slices(plan, task):
            route = task.route
            if route.kind != "merge":
                pieces.append(Piece(a, b, "fixed", {"out": compute_part(plan, task, dev, a, b)}))
                continue
            assert route.method is not None
            values = _read(plan, task, a, b)
            base = values.get(plan.base_key) if plan.base_key else None
            models = [values[k] for k in route.inputs]
            generators = None
            if route.method.uses_rng:  # the engine's masks: keyed by (seed, tensor, position)
                generators = [tensor_generator(plan.seed, task.name, str(i))
                              for i in range(len(route.inputs))]
            kind, parts = decompose(route.method.name, task, base, models, generators,
                                    route.stats)
            pieces.append(Piece(a, b, kind, parts))
        out.pieces[task.name] = pieces
    return out


def decompose(method: str, task: TensorTask, base: torch.Tensor | None,
              models: Sequence[torch.Tensor], generators: Sequence[torch.Generator] | None,
              stats: Any) -> tuple[str, dict[str, torch.Tensor]]:
    """The parts of one slice, computed by the same expressions as the method's merge."""
    params, mp = task.global_params, task.model_params
    if method == "linear":
        return method, {f"m{i}": m for i, m in enumerate(models)}
    assert base is not None
    if method == "pcb":
        return _pcb_parts(base, models, params, mp, stats)
    if method == "task_arithmetic":
        deltas = [m - base for m in models]
    elif method == "ties":
        if params["scope"] == "global":
            assert isinstance(stats, TiesGlobalStats)
            deltas = []
            for t, thr in zip(models, stats.thresholds, strict=True):
                delta = t - base
                deltas.append(delta * (delta.abs().float() >= thr).to(delta.dtype))
        else:
            deltas = trim_task_vectors([t - base for t in models],
                                       [p["density"] for p in mp], bool(params.get("rescale")))
    elif method in ("dare_linear", "dare_ties"):
        assert generators is not None
        deltas = [random_drop(t - base, p["density"], g, rescale=params["rescale"])
                  for t, p, g in zip(models, mp, generators, strict=True)]
    else:
        raise ValueError(f"no fast path for {method}")
    parts = {"base": base, **{f"d{i}": d for i, d in enumerate(deltas)}}
    if method in ("ties", "dare_ties"):  # the signs the election compares, one byte each
        parts.update({f"g{i}": d.sign().to(torch.int8) for i, d in enumerate(deltas)})
    return method, parts


def _pcb_parts(base: torch.Tensor, models: Sequence[torch.Tensor], params: Mapping[str, Any],
               mp: Sequence[Mapping[str, Any]], stats: Any
               ) -> tuple[str, dict[str, torch.Tensor]]:
    base = base.float()
    tau = [m.float() - base for m in models]
    if params["scope"] == "tensor":
        d = base.numel()
        if d == 0:
            return "fixed", {"out": base.clone()}
        lo_k, hi_k = clip_indices(d, params["clip"])
        rows = []
        for t in tau:
            a = t.abs()
            rows.append(RowStats(kth_smallest(a, lo_k, nonnegative=True),
                                 kth_smallest(a, hi_k, nonnegative=True),
                                 float(a.min()), float(a.max())))
        # module attribute, not a name imported here: a test counts the calls
        scores = pcb_module.pcb_scores(tau, rows, params["inter"])
        rows = [RowStats(s.clip_low, s.clip_high, s.abs_min, s.abs_max,
                         kth_smallest(b, drop_index(d, p["density"])), float(b.max()))
                for s, b, p in zip(rows, scores, mp, strict=True)]
    else:
        assert isinstance(stats, PcbGlobalStats)
        rows = stats.rows
        scores = pcb_module.pcb_scores(tau, rows, params["inter"])
    parts: dict[str, torch.Tensor] = {"base": base}
    denominator = torch.zeros_like(base)
    for i, (t, b, s) in enumerate(zip(tau, scores, rows, strict=True)):
        soft = minmax(b.clamp(min=s.drop_threshold), s.drop_threshold, s.score_max)
        parts[f"s{i}"] = soft
        parts[f"c{i}"] = t.sign() * t.abs().clamp(s.clip_low, s.clip_high)
        denominator += soft
    parts["den"] = denominator.clamp(min=1e-12)
    return "pcb", parts


def combine(piece: Piece, task: TensorTask) -> torch.Tensor:
    """The merged slice for the candidate's `task` (its weights and λ), in the output
    dtype: the method's own arithmetic on the cached parts."""
    p = piece.parts
    if piece.kind == "fixed":
        return p["out"]
    params, mp = task.global_params, task.model_params
    weights = [m["weight"] for m in mp]
    n = len(weights)
    if piece.kind == "linear":
        Linear.check_params(params, mp, task.name)
        out = linear_merge([p[f"m{i}"] for i in range(n)], weights, params["normalize"])
    elif piece.kind == "pcb":
        # pcb_combine's operations, in its order, on its cached operands
        base = p["base"]
        numerator = torch.zeros_like(base)
        for i, w in enumerate(weights):
            numerator += w * p[f"s{i}"] * p[f"c{i}"]
        out = base + params["lambda"] * numerator / p["den"]
    elif piece.kind in ("ties", "dare_ties") and "g0" in p and n <= FUSED_MAX_MODELS:
        out = consensus_combine(p["base"], [p[f"d{i}"] for i in range(n)],
                                [p[f"g{i}"] for i in range(n)], weights,
                                params["lambda"], params["normalize"])
    else:
        consensus = piece.kind in ("ties", "dare_ties")
        out = combine_task_vectors(p["base"], [p[f"d{i}"] for i in range(n)], weights,
                                   lambda_=params["lambda"], normalize=params["normalize"],
                                   sign_consensus=consensus)
    out = out.to(device="cpu", dtype=task.out_dtype)
    if not all_finite(out):
        raise CheckpointError(f"tensor '{task.name}': {task.route.label} gives NaN or Inf "
                              f"with weights {weights} and lambda {params.get('lambda')}")
    return out


# Up to this many models `consensus_combine` sums as torch's `sum` does (checked on random
# tensors); with more, torch's reduction orders the last entries of a chunk its own way.
FUSED_MAX_MODELS = 5


def consensus_combine(base: torch.Tensor, deltas: Sequence[torch.Tensor],
                      signs: Sequence[torch.Tensor], weights: Sequence[float], lambda_: float,
                      normalize: bool) -> torch.Tensor:
    """`combine_task_vectors(..., sign_consensus=True)` to the bit, with less work: the
    stored int8 signs stand in for `sign(wᵢτᵢ)`, the agreeing weights' sum is looked up by
    the pattern of agreeing models (the same float operations, done once per candidate for
    each of the 2ⁿ patterns), and the chunks stay in cache. Sums run in the order the
    reference's do (reduced-precision sums accumulate in float32 and round once, as torch's
    `sum` does). `verify` checks the equality before a run trusts it."""
    n, dtype = len(deltas), deltas[0].dtype
    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w = torch.tensor(list(weights), dtype=dtype)
    direction = [1 if x > 0 else (-1 if x < 0 else 0) for x in weights]
    # The reference's divisor for each agreement pattern, by its own expression on a
    # [models, patterns] tensor (so the sum over models runs as it runs over entries).
    patterns = torch.arange(1 << n)
    agree_all = ((patterns.unsqueeze(0) >> torch.arange(n).unsqueeze(1)) & 1).to(dtype)
    table = (w.reshape(n, 1) * agree_all).sum(dim=0)
    table[table == 0] = 1
    flat_base = base.reshape(-1)
    flat = [d.reshape(-1) for d in deltas]
    flat_signs = [g.reshape(-1) for g in signs]
    size = flat_base.numel()
    out = torch.empty(size, dtype=dtype)
    step = COMBINE_CHUNK * max(1, torch.get_num_threads())
    for start in range(0, size, step):
        cut = slice(start, min(size, start + step))
        weighted = [d[cut] * w[i] for i, d in enumerate(flat)]
        total = weighted[0].to(acc, copy=True)
        for x in weighted[1:]:
            total.add_(x.to(acc))
        # (bool tensors are viewed as uint8: torch's bool kernels are several times slower)
        majority = (total >= 0).view(torch.int8).mul(2).sub_(1)
        pattern: torch.Tensor | None = None
        mixed: torch.Tensor | None = None
        for i, x in enumerate(weighted):
            if direction[i] == 0:
                agree = torch.zeros(majority.shape, dtype=torch.uint8)
            else:
                agree = (flat_signs[i][cut] == (majority if direction[i] > 0 else -majority)
                         ).view(torch.uint8)
            pattern = agree.clone() if pattern is None else pattern.add_(agree, alpha=1 << i)
            term = x.mul_(agree).to(acc)
            # a sum starts from +0, so an all-zero sum is +0 whatever the zeros' signs
            mixed = term.add_(0.0) if mixed is None else mixed.add_(term)
        assert mixed is not None
        merged = mixed.to(dtype)
        if normalize:
            assert pattern is not None
            merged.div_(table.index_select(0, pattern.int()))
        if lambda_ != 1:
            merged.mul_(lambda_)
        out[cut] = merged.add_(flat_base[cut])
    return out.reshape(base.shape)


def matches(plan: MergePlan, parts: Parts) -> bool:
    """True when `plan` (a candidate's) differs from the parts' plan only in coefficients."""
    return all(parts.structure.get(t.name) == structure_of(plan, t) for t in plan.tasks) \
        and len(plan.tasks) == len(parts.structure)


def verify(plan: MergePlan, parts: Parts) -> str | None:
    """Compare the parts' merge of `plan` with the engine's, tensor by tensor; None when
    every tensor is equal bit for bit, else the first that is not. A run checks its default
    point this way before trusting the parts (a method changed since this module was
    written shows up here, and the run falls back to full merges)."""
    from mergekit_pcb.engine import merge_in_memory

    fast, engine = fast_merge(plan, parts), merge_in_memory(plan)
    for name, tensor in engine.items():
        other = fast.get(name)
        if other is None or other.dtype != tensor.dtype or not torch.equal(other, tensor):
            return name
    return None


def fast_merge(plan: MergePlan, parts: Parts) -> dict[str, torch.Tensor]:
    """The candidate `plan`'s merge from the cached parts, assembled as `merge_in_memory`
    assembles slices."""
    out: dict[str, torch.Tensor] = {}
    for task in plan.tasks:
        pieces = parts.pieces[task.name]
        if len(pieces) == 1:
            out[task.name] = combine(pieces[0], task).reshape(task.shape)
            continue
        merged = torch.empty(task.shape, dtype=task.out_dtype)
        flat = merged.view(-1)
        for piece in pieces:
            flat[piece.start:piece.stop] = combine(piece, task)
        out[task.name] = merged
    return out


__all__ = ["SUPPORTED", "Parts", "build_parts", "combine", "decompose", "fast_merge",
           "matches", "parts_bytes", "structure_of", "supported", "verify"]
