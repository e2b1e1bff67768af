"""PEFT LoRA adapters read as checkpoints: a `BASE+ADAPTER` model is the base with each
adapted matrix's update B·A·scale added, formed in float32 one tensor (or one slice of
rows) at a time, so every method and every search takes adapters as it takes checkpoints.

What an adapter holds (`adapter_model.safetensors`, keys under `base_model.model.`):
`<module>.lora_A.weight` (r × in) and `<module>.lora_B.weight` (out × r) per adapted
linear layer, `<module>.lora_embedding_A` (r × vocabulary) and `lora_embedding_B`
(dim × r) per adapted embedding, and whole tensors for `modules_to_save` (and an adapted
embedding's `base_layer`, which PEFT saves whole). The scale is `lora_alpha / r`, or
`lora_alpha / sqrt(r)` with rsLoRA; `rank_pattern` and `alpha_pattern` override r and alpha
per module, matched as PEFT matches them. DoRA (`use_dora`, linear layers) rescales each
output row of W + ΔW to its learned magnitude `lora_magnitude_vector`, as peft's merge does.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mergekit_pcb.errors import CheckpointError
from mergekit_pcb.io.reader import Checkpoint, open_plain_checkpoint
from mergekit_pcb.io.resolve import resolve_model_path
from mergekit_pcb.io.safetensors_format import TensorInfo, brief_repr, decode_json, open_regular

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Adapter configs are a few KB.
MAX_CONFIG_BYTES = 1 << 20
# An adapter key's tail -> (factor, whether the update is the transpose of B·A).
_FACTOR_KEYS = {".lora_A.weight": ("A", False), ".lora_B.weight": ("B", False),
                ".lora_magnitude_vector": ("M", False),
                ".lora_embedding_A": ("A", True), ".lora_embedding_B": ("B", True)}
# Saved copies of a wrapped module: `x.modules_to_save.<adapter>.weight` is `x.weight`,
# and an adapted embedding's `x.base_layer.weight` is `x.weight` before its update.
_WRAPPERS = re.compile(r"\.(modules_to_save\.[^.]+|base_layer|original_module)(?=\.[^.]+$)")


@dataclass(frozen=True)
class LoraFactors:
    """One matrix's update, `left @ right * scale` (left: out × r, right: r × in), float32."""

    left: torch.Tensor
    right: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def dense(self, rows: slice | None = None) -> torch.Tensor:
        """The update (or its rows `rows`): never more than those rows are formed."""
        left = self.left if rows is None else self.left[rows]
        return (left @ self.right) * self.scale


@dataclass(frozen=True)
class _Adapted:
    """How one base tensor is changed: replaced whole (`whole`), updated (`a`, `b`), or both
    (an adapted embedding saved with its base layer)."""

    whole: str | None = None  # adapter key of the tensor's new value
    a: str | None = None
    b: str | None = None
    transposed: bool = False  # embeddings and fan_in_fan_out layers: the update is (B·A)ᵀ
    scale: float = 1.0
    rank: int = 0  # the rank PEFT's config gives this module (checked against A)
    # DoRA: the adapter key of the magnitude vector m; the tensor is then
    # m / ‖W + ΔW‖_row · (W + ΔW), each output row rescaled to its learned norm
    magnitude: str | None = None


def read_adapter_config(ref: str, root: Path) -> dict[str, Any]:
    """The adapter's `adapter_config.json`, checked for what this reader supports: one line
    naming the adapter and the setting otherwise."""
    with open_regular(root / ADAPTER_CONFIG) as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)  # bounded: a hostile file cannot fill memory
    if len(raw) > MAX_CONFIG_BYTES:
        raise CheckpointError(f"adapter {ref}: {ADAPTER_CONFIG} is over {MAX_CONFIG_BYTES} "
                              "bytes")
    try:
        config = decode_json(raw)
    except ValueError as e:
        raise CheckpointError(f"adapter {ref}: {ADAPTER_CONFIG} {e}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"adapter {ref}: {ADAPTER_CONFIG} is not a JSON object")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise CheckpointError(f"adapter {ref}: peft_type {brief_repr(kind)} is not supported "
                              "(only LoRA adapters are read)")
    refused = {
        "lora_bias": "lora_bias adapters are not supported",
        "target_parameters": "LoRA on parameters (target_parameters) is not supported",
        "layer_replication": "layer_replication adapters are not supported",
        "trainable_token_indices": "trainable-token adapters are not supported",
    }
    for key, why in refused.items():
        if config.get(key):
            raise CheckpointError(f"adapter {ref}: {why}")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), int | float) or config[key] <= 0:
            raise CheckpointError(f"adapter {ref}: {ADAPTER_CONFIG} needs a positive {key!r}, "
                                  f"got {brief_repr(config.get(key))}")
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise CheckpointError(f"adapter {ref}: {key} must be a mapping")
    return config


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module override: the first pattern that matches the module's name at a
    dot boundary (`get_pattern_key`)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def module_scale(config: dict[str, Any], module: str) -> tuple[int, float]:
    """Module `module`'s rank and update scale as PEFT sets them."""
    r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    root = math.sqrt(r) if config.get("use_rslora") else r
    return int(r), float(alpha) / root


class AdapterCheckpoint(Checkpoint):
    """`base` with adapter `adapter`'s updates: names and shapes are the base's; an updated
    tensor reads as float32 (base + B·A·scale), anything else as the base (or the adapter's
    whole copy) holds it."""

    def __init__(self, ref: str, base: Checkpoint, adapter: Checkpoint,
                 config: dict[str, Any]) -> None:
        self._base = base
        self.base_ref = base.ref  # the model the updates apply to, as the recipe names it
        self._adapter = adapter
        self.config = config
        self._plan = _plan_adapter(ref, base, adapter, config)
        tensors = dict(base.tensors)
        for name, how in self._plan.items():
            info = base.info(name)
            if how.a is not None:  # the update is formed in float32
                tensors[name] = TensorInfo(name, torch.float32, info.shape, info.file, 0,
                                           info.numel * 4)
            else:
                tensors[name] = adapter.info(how.whole or "")
        super().__init__(ref, base.root, tensors)
        self.own_directory = base.own_directory

    @property
    def adapted(self) -> list[str]:
        """The base tensors an update B·A·scale changes."""
        return [n for n, how in self._plan.items() if how.a is not None]

    def factors(self, name: str) -> LoraFactors | None:
        """Tensor `name`'s update as factors, or None when the adapter does not update it."""
        how = self._plan.get(name)
        if how is None or how.a is None or how.b is None:
            return None
        a = self._adapter.read(how.a).to(torch.float32)
        b = self._adapter.read(how.b).to(torch.float32)
        if how.transposed:
            return LoraFactors(a.T.contiguous(), b.T.contiguous(), how.scale)
        return LoraFactors(b, a, how.scale)

    def update(self, name: str) -> LoraFactors | None:
        """Tensor `name` minus the base's own tensor as factors: None where the adapter does
        not update it or also replaces its base part (an embedding saved whole)."""
        how = self._plan.get(name)
        if how is None or how.whole is not None or how.magnitude is not None:
            return None  # DoRA rescales rows too: not an update B·A
        return self.factors(name)

    def read(self, name: str, start: int | None = None, stop: int | None = None
             ) -> torch.Tensor:
        how = self._plan.get(name)
        if how is None:
            return self._base.read(name, start, stop)
        source = self._adapter if how.whole is not None else self._base
        value = source.read(how.whole or name, start, stop)
        factors = self.factors(name)
        if factors is None:
            return value
        value = value.to(torch.float32)
        shape = self.tensors[name].shape
        if start is None and stop is None:
            return self._dora(how, value.reshape(shape) + factors.dense(), slice(None))
        cols = shape[1]
        first = start or 0
        last = self.tensors[name].numel if stop is None else stop
        rows = slice(first // cols, -(-last // cols))  # only the rows the slice touches
        offset = first - rows.start * cols
        if how.magnitude is not None:  # whole rows: DoRA rescales each row by its norm
            whole_rows = source.read(how.whole or name, rows.start * cols, rows.stop * cols)
            dense = self._dora(how, whole_rows.to(torch.float32).reshape(-1, cols)
                               + factors.dense(rows), rows)
            return dense.reshape(-1)[offset:offset + (last - first)]
        update = factors.dense(rows).reshape(-1)
        return value + update[offset:offset + (last - first)]

    def _dora(self, how: _Adapted, rows: torch.Tensor, which: slice) -> torch.Tensor:
        """DoRA's rows of W + ΔW scaled to the magnitudes m (as peft's merge: m / ‖row‖)."""
        if how.magnitude is None:
            return rows
        m = self._adapter.read(how.magnitude).to(torch.float32)[which]
        return rows * (m / torch.linalg.vector_norm(rows, dim=1))[:, None]

    @property
    def pickled(self) -> bool:
        return self._base.pickled

    def close(self) -> None:
        self._base.close()
        self._adapter.close()


def _target(base: Checkpoint, ref: str, key: str, tensor: str) -> str:
    """The base tensor an adapter key names: the same name, else the one base name that ends
    with it (a base saved with or without its task head's prefix)."""
    if tensor in base:
        return tensor
    matches = [n for n in base.tensors if n.endswith("." + tensor)]
    if len(matches) == 1:
        return matches[0]
    raise CheckpointError(f"adapter {ref}: tensor {brief_repr(key)} updates "
                          f"{brief_repr(tensor)}, which the base {base.ref} does not hold")


def _plan_adapter(ref: str, base: Checkpoint, adapter: Checkpoint,
                  config: dict[str, Any]) -> dict[str, _Adapted]:
    """Base tensor name -> how the adapter changes it; every adapter key placed or refused."""
    parts: dict[str, dict[str, Any]] = {}
    fan_in_fan_out = bool(config.get("fan_in_fan_out"))
    for key in adapter.names():
        name = key.removeprefix(PEFT_PREFIX)
        tail = next((t for t in _FACTOR_KEYS if name.endswith(t)), None)
        if tail is not None:
            module = name[:-len(tail)]
            factor, transposed = _FACTOR_KEYS[tail]
            target = _target(base, ref, key, module + ".weight")
            entry = parts.setdefault(target, {})
            entry["module"] = module
            entry[factor] = key
            if factor != "M":
                entry["transposed"] = transposed or fan_in_fan_out
            continue
        if ".lora_" in name:
            raise CheckpointError(f"adapter {ref}: tensor {brief_repr(key)} is a kind of LoRA "
                                  "weight this reader does not know (LoRA biases and "
                                  "convolutions are not supported)")
        tensor = _WRAPPERS.sub("", name)
        if tensor not in base and config.get("ensure_weight_tying") \
                and tensor.endswith("lm_head.weight"):
            continue  # the copy of a tied embedding, which the base's files do not hold
        target = _target(base, ref, key, tensor)
        parts.setdefault(target, {})["whole"] = key
    plan: dict[str, _Adapted] = {}
    for target, entry in parts.items():
        info = base.info(target)
        whole = entry.get("whole")
        if whole is not None and tuple(adapter.info(whole).shape) != tuple(info.shape):
            raise CheckpointError(f"adapter {ref}: tensor {brief_repr(whole)} has shape "
                                  f"{list(adapter.info(whole).shape)}, the base's "
                                  f"{target} {list(info.shape)}")
        if "A" not in entry and "B" not in entry:
            plan[target] = _Adapted(whole=whole)
            continue
        plan[target] = _factored(ref, adapter, config, target, info, entry)
    return plan


def _factored(ref: str, adapter: Checkpoint, config: dict[str, Any], target: str,
              info: TensorInfo, entry: dict[str, Any]) -> _Adapted:
    """An adapted matrix, its factors' shapes checked against the base tensor and config."""
    if "A" not in entry or "B" not in entry:
        missing = "lora_A" if "A" not in entry else "lora_B"
        raise CheckpointError(f"adapter {ref}: module {entry['module']} has no {missing}")
    a_shape = tuple(adapter.info(entry["A"]).shape)
    b_shape = tuple(adapter.info(entry["B"]).shape)
    if len(a_shape) != 2 or len(b_shape) != 2 or len(info.shape) != 2:
        raise CheckpointError(f"adapter {ref}: module {entry['module']} is not a matrix "
                              "(LoRA on convolutions is not supported)")
    rank, scale = module_scale(config, entry["module"])
    out, inp = (a_shape[1], b_shape[0]) if entry["transposed"] else (b_shape[0], a_shape[1])
    if a_shape[0] != rank or b_shape[1] != rank or (out, inp) != tuple(info.shape):
        raise CheckpointError(
            f"adapter {ref}: module {entry['module']} has lora_A {list(a_shape)} and lora_B "
            f"{list(b_shape)}, which do not make the rank-{rank} update of {target} "
            f"{list(info.shape)}")
    magnitude = entry.get("M")
    if magnitude is not None:
        if entry["transposed"]:
            raise CheckpointError(f"adapter {ref}: module {entry['module']} is a DoRA "
                                  "embedding or fan_in_fan_out layer, which is not supported "
                                  "(DoRA on linear layers is)")
        if tuple(adapter.info(magnitude).shape) != (out,):
            raise CheckpointError(f"adapter {ref}: {magnitude} has shape "
                                  f"{list(adapter.info(magnitude).shape)}, not [{out}]")
    return _Adapted(whole=entry.get("whole"), a=entry["A"], b=entry["B"],
                    transposed=entry["transposed"], scale=scale, rank=rank,
                    magnitude=magnitude)


def open_adapter(ref: str, base_ref: str, adapter_ref: str, *, allow_pickle: bool = False,
                 base_dir: Path | None = None) -> AdapterCheckpoint:
    """`BASE+ADAPTER` opened: the base as any checkpoint, the adapter's directory (local, or
    a hub id through the cache) read for its config and weights."""
    root = resolve_model_path(adapter_ref, base_dir=base_dir)
    if not root.is_dir() or not (root / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"model {ref}: {adapter_ref} is not a PEFT adapter directory "
                              f"(no {ADAPTER_CONFIG})")
    config = read_adapter_config(adapter_ref, root)
    weights = root / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"adapter {adapter_ref}: no {ADAPTER_WEIGHTS} (pickled "
                              "adapter_model.bin files are not read)")
    base = open_plain_checkpoint(base_ref, allow_pickle=allow_pickle, base_dir=base_dir)
    try:
        adapter = open_plain_checkpoint(str(weights))
        adapter.ref = adapter_ref
        return AdapterCheckpoint(ref, base, adapter, config)
    except BaseException:
        base.close()
        raise


__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "AdapterCheckpoint", "LoraFactors",
           "module_scale", "open_adapter", "read_adapter_config"]
