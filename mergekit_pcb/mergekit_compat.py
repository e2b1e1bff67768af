"""mergekit-yaml's command line, as `pcbmerge run` and our `mergekit-yaml` take it.

Every option of mergekit 0.1.5's `mergekit-yaml --help` is listed here with what it does
here: it maps onto one of our settings, it has nothing to change in a streamed merge (its
result is the same either way, and saying so is one note line), or it is refused with the
reason. The command line (`cli.py`) only collects the values and calls `translate`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from mergekit_pcb.errors import UserError

Effect = Literal["maps", "no-effect", "refused"]


@dataclass(frozen=True)
class MergekitFlag:
    """One option of `mergekit-yaml`: its spellings as its --help prints them, mergekit's
    default, and what a value other than that default does here."""

    field: str  # mergekit's MergeOptions field (our keyword in `translate`)
    decls: tuple[str, ...]
    default: Any
    effect: Effect
    why: str


# In the order of mergekit 0.1.5's `mergekit-yaml --help` (sections flattened).
MERGEKIT_YAML_FLAGS: tuple[MergekitFlag, ...] = (
    MergekitFlag("allow_crimes", ("--allow-crimes", "--no-allow-crimes"), False, "maps",
                 "merges models whose config.json name different architectures"),
    MergekitFlag("unsafe_truncate_embeddings",
                 ("--unsafe-truncate-embeddings", "--no-unsafe-truncate-embeddings"), False,
                 "refused", "embeddings of different vocabulary sizes are merged through a "
                 "`tokenizer:` section of the recipe here, never by dropping rows"),
    MergekitFlag("trust_remote_code", ("--trust-remote-code", "--no-trust-remote-code"), False,
                 "no-effect", "a merge reads config.json as data and never runs model code"),
    MergekitFlag("transformers_cache", ("--transformers-cache",), None, "maps",
                 "hub models are downloaded into (and read from) this folder"),
    MergekitFlag("lora_merge_cache", ("--lora-merge-cache",), None, "no-effect",
                 "LoRA inputs (model+lora) are read as base + B·A·scale tensor by tensor, "
                 "never merged into a model on disk, so nothing is cached"),
    MergekitFlag("lora_merge_dtype", ("--lora-merge-dtype",), None, "no-effect",
                 "a LoRA input's update B·A·scale is always formed in float32, so no LoRA is "
                 "applied in another dtype"),
    MergekitFlag("random_seed", ("--random-seed",), None, "maps", "= --seed"),
    MergekitFlag("verbosity", ("-v",), 0, "maps",
                 "Python logging at INFO (-v) or DEBUG (-vv), as in mergekit"),
    MergekitFlag("quiet", ("--quiet", "--no-quiet"), False, "maps", "no progress display"),
    MergekitFlag("cuda", ("--cuda", "--no-cuda"), False, "maps", "= --device cuda"),
    MergekitFlag("device", ("--device",), None, "maps",
                 "cpu, cuda, cuda:N or auto (cuda when available)"),
    MergekitFlag("low_cpu_memory", ("--low-cpu-memory", "--no-low-cpu-memory"), False,
                 "no-effect", "results are streamed to disk tensor by tensor, never held"),
    MergekitFlag("lazy_unpickle", ("--lazy-unpickle", "--no-lazy-unpickle"), False,
                 "no-effect", "pickled checkpoints (--allow-pickle) are memory-mapped already"),
    MergekitFlag("read_to_gpu", ("--read-to-gpu", "--no-read-to-gpu"), False, "no-effect",
                 "inputs are read to the CPU and moved to --device one tensor at a time"),
    MergekitFlag("multi_gpu", ("--multi-gpu", "--no-multi-gpu"), False, "maps",
                 "= --device cuda, on one GPU (the merge is streamed on one device)"),
    MergekitFlag("num_threads", ("-j", "--num-threads"), None, "maps", "= --threads"),
    MergekitFlag("gpu_rich", ("--gpu-rich",), False, "maps",
                 "= --device cuda (see --multi-gpu, --low-cpu-memory, --read-to-gpu)"),
    MergekitFlag("async_write", ("--async-write", "--no-async-write"), False, "no-effect",
                 "shards are always written by a thread behind the merge"),
    MergekitFlag("write_threads", ("--write-threads",), 1, "no-effect",
                 "one writer thread writes the shards behind the merge"),
    MergekitFlag("out_shard_size", ("--out-shard-size",), 5 * 10**9, "maps",
                 "= --shard-size; sizes read as mergekit reads them (5B: 5e9 bytes)"),
    MergekitFlag("copy_tokenizer", ("--copy-tokenizer", "--no-copy-tokenizer"), True, "maps",
                 "--no-copy-tokenizer: the inputs' tokenizer files are not copied"),
    MergekitFlag("clone_tensors", ("--clone-tensors", "--no-clone-tensors"), False,
                 "no-effect", "every output tensor is written as its own copy already"),
    MergekitFlag("write_model_card", ("--write-model-card", "--no-write-model-card"), True,
                 "maps", "--no-write-model-card: no README.md and no mergekit_config.yml"),
    MergekitFlag("safe_serialization", ("--safe-serialization", "--no-safe-serialization"),
                 True, "refused", "the output is written as safetensors only"),
)
FLAGS_BY_FIELD = {f.field: f for f in MERGEKIT_YAML_FLAGS}
# mergekit's flags that are second names of our own options (--random-seed is --seed, ...)
SHARED = {"random_seed": "--seed", "num_threads": "--threads", "out_shard_size": "--shard-size",
          "quiet": "--quiet", "device": "--device"}
# the others: `translate` reads them
MERGEKIT_ONLY = tuple(f.field for f in MERGEKIT_YAML_FLAGS if f.field not in SHARED)

# mergekit's `--device` takes any torch device; a merge here runs on the CPU or one GPU.
_DEVICE = re.compile(r"(cpu|cuda(:\d+)?|auto)")


@dataclass(frozen=True)
class Translated:
    """mergekit-yaml's values as our settings."""

    device: str | None = None  # None: none given
    notes: list[str] = field(default_factory=list)  # one line per flag with no effect here
    given: list[str] = field(default_factory=list)  # merge-only flags given a non-default


def _shown(flag: MergekitFlag, value: Any) -> str:
    """The spelling the user typed for `value` (`--no-copy-tokenizer`, `--write-threads 4`)."""
    if isinstance(value, bool) and len(flag.decls) == 2 and flag.decls[1].startswith("--no-"):
        return flag.decls[0] if value else flag.decls[1]
    return flag.decls[-1] if isinstance(value, bool) else f"{flag.decls[-1]} {value}"


def parse_device(text: str, flag: str = "--device") -> str:
    """A device name as mergekit's `--device` takes it, checked: one line if it is not one
    this tool runs on. 'auto' picks cuda when a GPU is present, as mergekit does."""
    value = text.strip().lower()
    if not _DEVICE.fullmatch(value):
        raise UserError(f"{flag}: {text!r} is not a device this tool merges on (cpu, cuda, "
                        "cuda:N or auto)")
    if value == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return value


def translate(values: Mapping[str, Any], *, device: str | None = None) -> Translated:
    """mergekit-yaml's options (keyed by mergekit's field names; an absent key is its
    default) -> our device and the note lines; a refused flag raises its one line.

    `device` is our own `--device` (mergekit's has the same name: both are that value)."""
    notes: list[str] = []
    given: list[str] = []
    for name, value in values.items():
        flag = FLAGS_BY_FIELD[name]
        if value is None or value == flag.default:
            continue  # mergekit's default: the same merge in both
        shown = _shown(flag, value)
        if flag.effect == "refused":
            raise UserError(f"{shown}: not supported ({flag.why})")
        if name == "write_threads" and value < 1:
            raise UserError(f"--write-threads must be at least 1, got {value}")
        if flag.effect == "no-effect":
            notes.append(f"note: {shown} changes nothing here ({flag.why})")
        given.append(shown)
    gpu = [name for name in ("cuda", "multi_gpu", "gpu_rich") if values.get(name)]
    if device is not None:
        device = parse_device(device)
    elif gpu:
        device = "cuda"
    if gpu and device == "cpu":
        raise UserError(f"{_shown(FLAGS_BY_FIELD[gpu[0]], True)} asks for a GPU but --device "
                        "is cpu: give one of them")
    if values.get("multi_gpu") or values.get("gpu_rich"):
        notes.append("note: --multi-gpu / --gpu-rich: the merge runs on one GPU")
    verbosity = values.get("verbosity") or 0
    if verbosity:
        # as mergekit's apply_global_options: -v INFO, -vv and more DEBUG; the root level is
        # set too, as basicConfig leaves a root logger that already has a handler alone
        level = logging.DEBUG if verbosity > 1 else logging.INFO
        logging.basicConfig(level=level)
        logging.getLogger().setLevel(level)
    return Translated(device=device, notes=notes, given=given)


__all__ = ["FLAGS_BY_FIELD", "MERGEKIT_ONLY", "MERGEKIT_YAML_FLAGS", "SHARED", "MergekitFlag",
           "Translated",
           "parse_device", "translate"]
