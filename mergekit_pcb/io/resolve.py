"""Model references -> local paths: a directory, a .safetensors file, or a Hugging Face hub id.

Relative paths resolve against the working directory, as in mergekit, so that mergekit
recipes run unchanged. Hub ids (`org/name` or `org/name@revision`) resolve through
huggingface_hub's cache; with `HF_HUB_OFFLINE=1` only the local cache is consulted.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mergekit_pcb.errors import CheckpointError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")

# What a merge needs from a hub repo: weights, configs and tokenizer files; never pickles
# unless asked for.
HUB_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
HUB_PICKLE_PATTERNS = ["*.bin", "*.pt", "*.pth"]


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def split_adapter_ref(ref: str, *, base_dir: Path | None = None) -> tuple[str, str] | None:
    """`BASE+ADAPTER` (mergekit's way to name a LoRA adapter over its base) as (base,
    adapter); None for any other reference, a path with a `+` in its name included."""
    if "+" not in ref or _exists(ref, base_dir):
        return None
    base, _, adapter = ref.partition("+")  # at the first '+', as mergekit splits it
    if not base or not adapter:
        raise CheckpointError(f"model {ref!r}: an adapter reference is BASE+ADAPTER, with "
                              "both parts named")
    return base, adapter


def _exists(ref: str, base_dir: Path | None) -> bool:
    candidate = Path(ref).expanduser()
    if not candidate.is_absolute() and base_dir is not None:
        candidate = base_dir / candidate
    try:
        return candidate.exists()
    except OSError:
        return False


def model_paths(ref: str, *, allow_pickle: bool = False) -> list[Path]:
    """Every local path model `ref` reads: its own, or a `BASE+ADAPTER`'s two."""
    parts = split_adapter_ref(ref)
    refs = list(parts) if parts else [ref]
    return [resolve_model_path(r, allow_pickle=allow_pickle) for r in refs]


def resolve_model_path(ref: str, *, base_dir: Path | None = None,
                       allow_pickle: bool = False) -> Path:
    """Return the local path holding model `ref`; raise CheckpointError if there is none.

    For `BASE+ADAPTER` it is the base's: where the config and tokenizer come from."""
    parts = split_adapter_ref(ref, base_dir=base_dir)
    if parts is not None:
        return resolve_model_path(parts[0], base_dir=base_dir, allow_pickle=allow_pickle)
    candidate = Path(ref).expanduser()
    if not candidate.is_absolute() and base_dir is not None:
        candidate = base_dir / candidate
    try:
        exists = candidate.exists()
    except OSError as e:  # a name too long for the file system, a loop of links
        shown = ref if len(ref) <= 80 else f"{ref[:60]}...({len(ref)} characters)"
        raise CheckpointError(f"model {shown!r}: not a usable path ({e.strerror or e})") from None
    if exists:
        return candidate
    if HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        return _resolve_hub(ref, allow_pickle=allow_pickle)
    raise CheckpointError(f"model not found: {ref} (no such file or directory)")


def _resolve_hub(ref: str, *, allow_pickle: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo_id, _, revision = ref.partition("@")
    offline = hub_offline()
    patterns = HUB_PATTERNS + (HUB_PICKLE_PATTERNS if allow_pickle else [])
    try:
        path = snapshot_download(
            repo_id,
            revision=revision or None,
            allow_patterns=patterns,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            local_files_only=offline,
        )
    except LocalEntryNotFoundError as e:
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise CheckpointError(
            f"model not found: {ref} is not a local path and is not in the Hugging Face cache "
            f"({why})"
        ) from e
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as e:
        raise CheckpointError(f"model not found on the Hugging Face hub: {ref}") from e
    except (HfHubHTTPError, OSError) as e:
        raise CheckpointError(f"cannot fetch model {ref} from the Hugging Face hub: {e}") from e
    return Path(path)


def hub_repo_id(ref: str) -> str | None:
    """The Hugging Face repo id `ref` names (`org/name`, without an `@revision`), or None
    when `ref` is a local path (as `resolve_model_path` would take it) or no hub id at all:
    what a model card's `base_model` metadata may hold."""
    try:
        local = Path(ref).expanduser().exists()
    except OSError:
        local = False
    if local or not HUB_ID.match(ref) or ref.startswith((".", "/", "~")):
        return None
    return ref.partition("@")[0]
