"""Vocabulary alignment: the rows of vocabulary-indexed tensors re-ordered to the output
tokenizer before the merge method sees them, as mergekit 0.1.5 does.

When a recipe sets `tokenizer_source` or a `tokenizer:` block, the output tokenizer is built
first (`io.tokenizer`), and each model gets a permutation: output token id -> that model's
token id, or -1 where the model lacks the token (tokens are matched by their string).

Which tensors are vocabulary-indexed: the input embeddings and output heads, recognised by
name (VOCAB_SUFFIXES: the names transformers gives them in Llama, Mistral, Qwen, Gemma,
GPT-2, GPT-NeoX, BERT, RoBERTa, T5 and the like, as in mergekit's architecture tables),
with the token on their first axis. Every other tensor streams as before; an aligned
tensor is read and merged whole (it is one tensor per model).

A token a model lacks gets mergekit's default row, shared by every model lacking it:
- the `tokenizer.tokens` setting for that token, if any (`source`: a model's row for the
  token, `kind: model_token` a given row of a model, `kind: zero` zeros; with `force` every
  model takes it, even those that have the token);
- otherwise, the one model that has the token: its row; none has it: zeros; the base model
  has it: the base's row; else the mean of the rows of the models that have it.
`pad_to_multiple_of` adds rows up to a multiple, each the mean of that model's aligned rows.
Without it, models that all have more rows than the output has tokens keep their row count
(mergekit cuts them): the rows past the tokens are each model's own, by position.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mergekit_pcb.errors import CheckpointError, RecipeError
from mergekit_pcb.io.tokenizer import (
    TOKENIZER_MARKERS,
    add_missing_tokens,
    chat_template_text,
    config_vocab_size,
    has_tokenizer,
    load_tokenizer,
    strip_unused,
    union_tokenizer,
)
from mergekit_pcb.recipe.schema import MergeRecipe, ModelTokenSource, TokenEmbedding, ZeroSource

# Tensor names (their endings) indexed by token on axis 0.
VOCAB_SUFFIXES = (
    "embed_tokens.weight", "lm_head.weight", "lm_head.bias", "wte.weight",
    "word_embeddings.weight", "embed_in.weight", "embed_out.weight", "tok_embeddings.weight",
    "shared.weight", "vocab_projector.weight", "vocab_projector.bias",
    "lm_head.decoder.weight", "lm_head.linear.weight", "lm_head.linear.bias",
    "cls.predictions.bias", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias",
    "transformer.output_layer.weight", "backbone.embeddings.weight",
    "token_embedding.weight",  # CLIP's text tower
)
TOP_LEVEL_VOCAB = ("output.weight",)  # llama-style `output.weight` (only at the top level)

Rows = tuple[tuple[str, int], ...]  # (model key, row) pairs averaged; () is zeros


def is_vocabulary_tensor(name: str) -> bool:
    return name in TOP_LEVEL_VOCAB or name.endswith(VOCAB_SUFFIXES)


# --- the math: pure functions of tensors -------------------------------------------------

def default_row(tensors: Mapping[str, torch.Tensor], rows: Rows, like: torch.Tensor
                ) -> torch.Tensor:
    """The mean of `rows` ((model, row) pairs) summed in order, as mergekit sums them; zeros
    for no rows."""
    out = torch.zeros(like.shape[1:], dtype=like.dtype, device=like.device)
    if not rows:
        return out
    for key, row in rows:
        out = out + tensors[key][row]
    return out / len(rows)


def permute_rows(tensor: torch.Tensor, index: torch.Tensor, default_ids: torch.Tensor,
                 defaults: torch.Tensor, rows: int) -> torch.Tensor:
    """The rows of `tensor` (token on axis 0) in the output's order.

    Output row t is `tensor[index[t]]`, or where `index[t]` is -1 the row of `defaults` at
    t's position in `default_ids`; rows past `len(index)` (padding up to `rows`) are the
    mean of the rows before them.
    """
    tokens = index.shape[0]
    out = torch.zeros((rows, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    have = index >= 0
    out[:tokens][have] = tensor[index[have]]
    if default_ids.numel():
        gap = index[default_ids] < 0
        out[default_ids[gap]] = defaults[gap]
    missing = ~have
    missing[default_ids] = False
    if bool(missing.any()):
        raise ValueError(f"no row for output token {int(missing.nonzero()[0])}")
    if rows > tokens:
        out[tokens:] = torch.mean(out[:tokens], dim=0)
    return out


@dataclass
class Alignment:
    """How the rows of one group of models (those a tensor is merged from) become the
    output's rows."""

    keys: tuple[str, ...]  # the models, in mergekit's order (their rows feed the defaults)
    index: dict[str, torch.Tensor]  # model key -> [tokens] long: its row, or -1 (default)
    defaults: list[tuple[int, Rows]]  # output token id -> the rows its default averages
    rows: int  # output rows (tokens, padded)

    def needs_rows(self) -> dict[str, int]:
        """Model key -> how many rows its tensor must have."""
        need = {k: int(self.index[k].max()) + 1 if self.index[k].numel() else 0
                for k in self.keys}
        for _, rows in self.defaults:
            for key, row in rows:
                need[key] = max(need[key], row + 1)
        return need

    def is_identity(self, model_rows: Mapping[str, int]) -> bool:
        """True when aligning changes nothing: every model's rows already are the output's."""
        if self.defaults:
            return False
        arange = torch.arange(self.rows)
        return all(model_rows[k] == self.rows and self.index[k].shape[0] == self.rows
                   and torch.equal(self.index[k], arange) for k in self.keys)


def align_rows(tensors: Mapping[str, torch.Tensor], alignment: Alignment
               ) -> dict[str, torch.Tensor]:
    """Each model's tensor (token on axis 0) with its rows in the output's order."""
    like = tensors[alignment.keys[0]]
    dtype = like.dtype
    for key in alignment.keys:
        dtype = torch.promote_types(dtype, tensors[key].dtype)
    values = {k: tensors[k].to(dtype) for k in alignment.keys}
    like = values[alignment.keys[0]]
    ids = torch.tensor([t for t, _ in alignment.defaults], dtype=torch.long)
    if alignment.defaults:
        defaults = torch.stack([default_row(values, rows, like)
                                for _, rows in alignment.defaults])
    else:
        defaults = like.new_zeros((0, *like.shape[1:]))
    return {key: permute_rows(values[key], alignment.index[key], ids, defaults, alignment.rows)
            for key in alignment.keys}


# --- the plan: output tokenizer, permutations, defaults ----------------------------------

@dataclass
class VocabPlan:
    source: str  # "union", "base" or a model
    tokenizer: Any  # transformers tokenizer of the output
    vocab: dict[str, int]  # output token -> id
    rows: int  # output rows: len(vocab), padded to pad_to_multiple_of
    perms: dict[str, torch.Tensor]  # model key -> [tokens] long: its id, or -1
    original_vocabs: dict[str, dict[str, int]]  # model key -> its tokenizer's vocabulary
    base_key: str
    tokens: dict[str, TokenEmbedding]
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    _alignments: dict[tuple[str, ...], Alignment] = field(default_factory=dict)

    def alignment(self, keys: Sequence[str]) -> Alignment:
        group = tuple(dict.fromkeys(keys))
        if group not in self._alignments:
            self._alignments[group] = self._align(group)
        return self._alignments[group]

    def _align(self, keys: tuple[str, ...]) -> Alignment:
        index = {k: self.perms[k].clone() for k in keys}
        defaults: list[tuple[int, Rows]] = []
        for token, tid in sorted(self.vocab.items(), key=lambda kv: kv[1]):
            present = [k for k in keys if int(self.perms[k][tid]) >= 0]
            cfg = self.tokens.get(token)
            if cfg is None or (not cfg.force and len(present) == len(keys)):
                if len(present) == len(keys):
                    continue
                if len(present) == 1:
                    rows: Rows = ((present[0], int(self.perms[present[0]][tid])),)
                elif not present:
                    rows = ()
                elif self.base_key in present:
                    rows = ((self.base_key, int(self.perms[self.base_key][tid])),)
                else:
                    rows = tuple((k, int(self.perms[k][tid])) for k in present)
            else:
                rows = self._configured(token, tid, cfg, keys)
                if cfg.force:
                    for k in keys:
                        index[k][tid] = -1
            defaults.append((tid, rows))
        return Alignment(keys, index, defaults, self.rows)

    def _configured(self, token: str, tid: int, cfg: TokenEmbedding, keys: tuple[str, ...]
                    ) -> Rows:
        where = f"tokenizer.tokens.{token!r}"
        source = cfg.source
        if isinstance(source, ZeroSource):
            return ()
        if source is None:
            lacking = next((k for k in keys if int(self.perms[k][tid]) < 0), keys[0])
            raise RecipeError(f"{where}: needs a 'source' (model {lacking} lacks the token)")
        model = source.model if isinstance(source, ModelTokenSource) else source
        if model not in keys:
            raise RecipeError(f"{where}.source: model {model} is not one of the models "
                              f"merged ({', '.join(keys)})")
        if isinstance(source, ModelTokenSource):
            if source.token_id is not None:
                return ((model, source.token_id),)
            vocab = self.original_vocabs[model]
            if source.token not in vocab:
                raise RecipeError(f"{where}.source.token: {source.token!r} is not in the "
                                  f"tokenizer of {model}")
            return ((model, vocab[source.token]),)
        row = int(self.perms[model][tid])
        if row < 0:
            raise RecipeError(f"{where}.source: model {model} does not have the token")
        return ((model, row),)

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "tokens": len(self.vocab), "rows": self.rows,
                "models": self.counts}

    def label(self) -> str:
        padded = ""
        if self.rows != len(self.vocab):
            extra = self.perms[self.base_key].shape[0] > len(self.vocab)
            padded = (f", keeping the models' {self.rows} rows (the rest by position)" if extra
                      else f", padded to {self.rows} rows")
        per_model = "; ".join(f"{k}: {c['remapped']} re-mapped, {c['new']} new"
                              + (f", {c['dropped']} dropped" if c["dropped"] else "")
                              for k, c in self.counts.items())
        return (f"vocabulary rows aligned to the {self.source} tokenizer "
                f"({len(self.vocab)} tokens{padded}) before merging: {per_model}")


# Recent vocabulary plans by their inputs (files by size and mtime): a search builds the same
# recipe's plan once per member, and loading tokenizers is the slow part.
_RECENT: OrderedDict[tuple[Any, ...], VocabPlan] = OrderedDict()


def _fingerprint(recipe: MergeRecipe, roots: Mapping[str, Path], base_key: str,
                 source_root: Path | None) -> tuple[Any, ...]:
    files = []
    for root in [*roots.values(), *([source_root] if source_root else [])]:
        for name in (*TOKENIZER_MARKERS, "config.json", "special_tokens_map.json",
                     "added_tokens.json"):
            try:
                st = (root / name).stat()
            except OSError:
                continue
            files.append((str(root / name), st.st_mtime_ns, st.st_size))
    spec = recipe.tokenizer.model_dump_json() if recipe.tokenizer is not None else None
    return (recipe.tokenizer_source, spec, tuple(roots.items()), base_key, source_root,
            tuple(files))


def build_vocab_plan(recipe: MergeRecipe, roots: Mapping[str, Path], base_key: str,
                     source_root: Path | None) -> VocabPlan | None:
    """The output tokenizer and every model's permutation, or None when the recipe builds no
    tokenizer (no `tokenizer_source`, no `tokenizer:` block: the files are copied).

    `roots`: model key -> its directory; `source_root`: the directory of a `tokenizer_source`
    model that is not merged."""
    if recipe.vocabulary_source is None:
        return None
    key = _fingerprint(recipe, roots, base_key, source_root)
    if key in _RECENT:
        _RECENT.move_to_end(key)
        return _RECENT[key]
    plan = _build_vocab_plan(recipe, roots, base_key, source_root)
    _RECENT[key] = plan
    while len(_RECENT) > 4:
        _RECENT.popitem(last=False)
    return plan


def _build_vocab_plan(recipe: MergeRecipe, roots: Mapping[str, Path], base_key: str,
                      source_root: Path | None) -> VocabPlan:
    source = recipe.vocabulary_source
    assert source is not None
    spec = recipe.tokenizer
    token_cfg = dict(spec.tokens) if spec is not None else {}
    what = "tokenizer.source" if spec is not None else "tokenizer_source"
    sizes = {k: config_vocab_size(root) for k, root in roots.items()}
    named_root = None if source in ("base", "union") else (roots.get(source) or source_root)
    if has_tokenizer(roots[base_key]):
        base_tok = load_tokenizer(roots[base_key], f"model {base_key}")
        if sizes[base_key] is not None:
            base_tok = strip_unused(base_tok, sizes[base_key], f"model {base_key}")
    elif named_root is not None and has_tokenizer(named_root):
        # the base has no tokenizer files: the models without their own use the named one's
        base_tok = load_tokenizer(named_root, f"{what} {source}")
    else:
        raise CheckpointError(f"{what}: base model {base_key} has no tokenizer files in "
                              f"{roots[base_key]}")
    toks = {base_key: base_tok}
    for key, root in roots.items():
        if key != base_key and has_tokenizer(root):
            toks[key] = load_tokenizer(root, f"model {key}")
        # a model without tokenizer files has the base's (as mergekit assumes)

    if source == "base":
        out = base_tok
    elif source == "union":
        out = union_tokenizer(base_tok, [
            (tok, sizes[k] or len(tok.get_vocab())) for k, tok in toks.items()])
    else:
        if named_root is None or not has_tokenizer(named_root):
            raise CheckpointError(f"{what}: no tokenizer files for {source}")
        out = load_tokenizer(named_root, f"{what} {source}")
    if token_cfg:
        if out is base_tok:
            from mergekit_pcb.io.tokenizer import copy_tokenizer

            out = copy_tokenizer(base_tok)
        add_missing_tokens(out, token_cfg)
    vocab = dict(out.get_vocab())
    tokens = len(vocab)
    if sorted(vocab.values()) != list(range(tokens)):
        raise CheckpointError(f"{what}: the output tokenizer's ids are not 0..{tokens - 1}")
    pad = spec.pad_to_multiple_of if spec is not None else None
    rows = -(-tokens // pad) * pad if pad else tokens

    # mergekit cuts the embeddings to the tokenizer's size. When every model has more rows
    # than the output has tokens (padding: Qwen2.5 has 151,936 rows for 151,665 tokens),
    # the output keeps that row count instead, the rows past the tokens taken by position.
    common = set(sizes.values())
    kept = common.pop() if not pad and len(common) == 1 and None not in common else None
    kept = kept if kept is not None and kept > rows else None
    rows = kept or rows

    perms: dict[str, torch.Tensor] = {}
    counts: dict[str, dict[str, int]] = {}
    by_id = sorted(vocab, key=vocab.__getitem__)
    for key in roots:
        model_vocab = toks.get(key, base_tok).get_vocab()
        size = sizes[key] if sizes[key] is not None else len(model_vocab)
        perm = torch.tensor([model_vocab.get(t, -1) if model_vocab.get(t, -1) < size else -1
                             for t in by_id], dtype=torch.long)
        present = {int(i) for i in perm if i >= 0}
        counts[key] = {
            "remapped": int(((perm >= 0) & (perm != torch.arange(tokens))).sum()),
            "new": int((perm < 0).sum()),
            "dropped": sum(1 for i in model_vocab.values() if i < size and i not in present),
        }
        if kept is not None:
            perm = torch.cat([perm, torch.arange(tokens, kept)])
        perms[key] = perm
    for token, cfg in token_cfg.items():
        model = cfg.source.model if isinstance(cfg.source, ModelTokenSource) else cfg.source
        if isinstance(model, str) and model not in roots:
            raise RecipeError(f"tokenizer.tokens.{token!r}.source: model {model} is not in "
                              "the recipe")
    return VocabPlan(source, out, vocab, rows, perms,
                     {k: dict(toks.get(k, base_tok).get_vocab()) for k in roots}, base_key,
                     token_cfg,
                     counts)


def resolve_chat_template(recipe: MergeRecipe, roots: Sequence[Path]) -> str | None:
    return None if recipe.chat_template is None else chat_template_text(recipe.chat_template,
                                                                        roots)


__all__ = [
    "VOCAB_SUFFIXES",
    "Alignment",
    "VocabPlan",
    "align_rows",
    "build_vocab_plan",
    "default_row",
    "is_vocabulary_tensor",
    "permute_rows",
    "resolve_chat_template",
]
