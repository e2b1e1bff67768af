"""Tokenizers for a merge: loading the inputs' (offline), building the output's vocabulary
(`base`, a model, or the `union` of all), adding tokens, chat templates, saving.

Everything goes through `transformers.AutoTokenizer`, so the output directory holds what
`AutoTokenizer.from_pretrained` writes and reads. transformers is imported only here and
only when a recipe asks for a tokenizer to be built.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergekit_pcb.errors import CheckpointError, RecipeError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Files whose presence means "this directory has a tokenizer" (one that fails to load is then
# an error; a directory without any borrows the base model's, as mergekit does).
TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                     "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")

# Chat templates by name (mergekit's names). Written for this project: the common formats.
NAMED_CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
        "+ message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}"
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'system' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}"
        "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "exaone": (
        "{% for message in messages %}"
        "{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


def has_tokenizer(root: Path) -> bool:
    return any((root / name).is_file() for name in TOKENIZER_MARKERS)


def _offline() -> None:
    # Local directories only: never reach for the Hub while building a merge.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def load_tokenizer(root: Path, what: str) -> PreTrainedTokenizerBase:
    """The tokenizer in directory `root` (fast where there is one), or a one-line
    CheckpointError naming `what` and the directory."""
    _offline()
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(root), use_fast=True)
    except Exception as e:  # transformers raises many kinds for a broken tokenizer
        raise CheckpointError(f"{what}: cannot load the tokenizer in {root} ({_reason(e)})"
                              ) from None


def config_vocab_size(root: Path) -> int | None:
    """`vocab_size` from `root/config.json` (or its `text_config`), None without one."""
    path = root / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    for where in (config, config.get("text_config")):
        if isinstance(where, dict) and isinstance(where.get("vocab_size"), int):
            return int(where["vocab_size"])
    return None


def copy_tokenizer(tok: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """An independent copy (saved and loaded again), so adding tokens leaves `tok` alone."""
    import transformers

    with tempfile.TemporaryDirectory() as d:
        tok.save_pretrained(d)
        return transformers.AutoTokenizer.from_pretrained(d, use_fast=True)


def strip_unused(tok: PreTrainedTokenizerBase, vocab_size: int, what: str
                 ) -> PreTrainedTokenizerBase:
    """`tok` without the tokens whose ids have no embedding row (id >= `vocab_size`), as
    mergekit strips the base tokenizer; only a fast BPE tokenizer can be edited so."""
    unused = {t for t, i in tok.get_vocab().items() if i >= vocab_size}
    if not unused:
        return tok
    import tokenizers

    backend = getattr(tok, "backend_tokenizer", None) if tok.is_fast else None
    spec = json.loads(backend.to_str()) if backend is not None else None
    if spec is None or spec.get("model", {}).get("type") != "BPE":
        raise CheckpointError(
            f"{what}: the tokenizer has {len(unused)} token(s) past the model's vocab_size "
            f"{vocab_size}; only a fast BPE tokenizer can be stripped of them")
    spec["added_tokens"] = [a for a in spec.get("added_tokens", []) if a["id"] < vocab_size]
    vocab = spec["model"]["vocab"]
    for t in unused:
        vocab.pop(t, None)

    def keep(merge: str | list[str]) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else merge
        return not any(p in unused for p in parts)

    spec["model"]["merges"] = [m for m in spec["model"].get("merges", []) if keep(m)]
    out = copy_tokenizer(tok)
    out._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(spec))
    return out


def union_tokenizer(base: PreTrainedTokenizerBase,
                    members: Sequence[tuple[PreTrainedTokenizerBase, int]]
                    ) -> PreTrainedTokenizerBase:
    """The base tokenizer plus every other token of `members` (tokenizer, vocab size), in
    order of the members, then of their ids: ordinary tokens first (as ordinary added
    tokens), then the members' added tokens with their first settings. Tokens past a
    member's vocab size are left out."""
    ordinary: dict[str, None] = {}
    added: dict[str, Any] = {}
    for tok, size in members:
        decoder = tok.added_tokens_decoder
        added_text = {info.content for info in decoder.values()}
        vocab = tok.get_vocab()  # in id order (mergekit's follows the dict's hash order)
        for text, idx in sorted(vocab.items(), key=lambda kv: kv[1]):
            if idx < size and text not in added_text:
                ordinary.setdefault(text, None)
        for idx, info in decoder.items():
            if idx < size:
                added.setdefault(info.content, info)
    out = copy_tokenizer(base)
    have = base.get_vocab()
    for text in ordinary:
        if text not in have and text not in added:
            out.add_tokens(text)
    for info in added.values():
        out.add_tokens(info)
    return out


def add_missing_tokens(tok: PreTrainedTokenizerBase, tokens: Iterable[str]) -> None:
    """Add each of `tokens` the tokenizer lacks (the `tokenizer.tokens` keys)."""
    have = set(tok.get_vocab())
    for text in tokens:
        if text not in have:
            tok.add_tokens(text)
            have.add(text)


def chat_template_text(value: str, roots: Sequence[Path]) -> str | None:
    """`chat_template` as mergekit reads it: `auto` (the template most of the inputs in
    `roots` share; None when none has one), a name of NAMED_CHAT_TEMPLATES, or a Jinja
    template itself."""
    if value == "auto":
        found: list[str] = []
        for root in roots:
            if not has_tokenizer(root):
                continue
            template = load_tokenizer(root, "chat_template: auto").chat_template
            if isinstance(template, dict):
                template = template.get("default")
            if template:
                found.append(template.strip())
        # most common; the first seen wins a tie
        return max(found, key=found.count) if found else None
    if value in NAMED_CHAT_TEMPLATES:
        return NAMED_CHAT_TEMPLATES[value]
    if len(value) < 20 or "{" not in value:
        raise RecipeError(f"chat_template: '{value[:40]}' is neither 'auto', a template name "
                          f"({', '.join(NAMED_CHAT_TEMPLATES)}) nor a Jinja template")
    return value


# How a tokenizer was loaded, not what it is: transformers writes some of these into the
# tokenizer_config.json it saves (`local_files_only`, `is_local`), older versions others
# (`name_or_path`, `tokenizer_file` as paths of the machine that saved it).
LOAD_TIME_KEYS = frozenset({
    "local_files_only", "is_local", "cache_dir", "force_download", "resume_download",
    "proxies", "token", "use_auth_token", "revision", "subfolder", "_commit_hash",
    "_from_auto", "_from_pipeline", "trust_remote_code", "use_fast", "name_or_path",
    "device_map", "special_tokens_map_file", "tokenizer_file",
})
# An absolute path (POSIX, home-relative or Windows) with at least one directory in it.
_LOCAL_PATH = re.compile(r"^(/|~/|[A-Za-z]:[\\/])\S*[\\/]")


def clean_tokenizer_config(out: Path) -> None:
    """Rewrite `out/tokenizer_config.json` without load-time keys (LOAD_TIME_KEYS) and
    without any top-level value that is a local path: the file ships to the Hub as is."""
    path = out / "tokenizer_config.json"
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # not ours to repair: transformers reports it when the tokenizer is loaded
    if not isinstance(config, dict):
        return
    kept = {k: v for k, v in config.items() if k not in LOAD_TIME_KEYS
            and not (isinstance(v, str) and _LOCAL_PATH.match(v))}
    if len(kept) != len(config):
        path.write_text(json.dumps(kept, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def save_tokenizer(tok: PreTrainedTokenizerBase, out: Path, chat_template: str | None) -> None:
    """`tok` into `out`, with `chat_template` when given (`tok` itself is left as it was),
    its config cleaned (`clean_tokenizer_config`)."""
    old = tok.chat_template
    if chat_template is not None:
        tok.chat_template = chat_template
    try:
        tok.save_pretrained(str(out))
    finally:
        tok.chat_template = old
    clean_tokenizer_config(out)


__all__ = ["LOAD_TIME_KEYS", "NAMED_CHAT_TEMPLATES", "TOKENIZER_MARKERS", "add_missing_tokens",
           "chat_template_text", "clean_tokenizer_config", "config_vocab_size", "copy_tokenizer",
           "has_tokenizer", "load_tokenizer", "save_tokenizer", "strip_unused",
           "union_tokenizer"]
