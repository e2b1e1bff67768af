"""Tokenizers as mergekit 0.1.5 does them: embedding and lm_head rows aligned by token string
to the output tokenizer (`tokenizer_source: base | <model> | union`, the `tokenizer:` block),
mergekit's defaults for missing tokens, `pad_to_multiple_of`, `chat_template`.

Three tiny Llamas with real word-level tokenizers: B gives "hello" and "world" each other's
ids and has two tokens A lacks (so its vocabulary is larger); C lacks "world", has a token of
its own, and every shared word sits one id lower than in A. Expected embeddings come from a
dense reference written here from the rules (token strings, not ids), and from mergekit
itself where its virtualenv exists.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergekit_pcb.cli import app
from mergekit_pcb.engine.vocab import permute_rows
from mergekit_pcb.methods.ties import ties_merge

REPO = Path(__file__).resolve().parent.parent
MERGEKIT = REPO / ".bench" / "mergekit-venv" / "bin" / "mergekit-yaml"
WORDS = [f"w{i}" for i in range(36)]
VOCABS = {
    "a": ["[UNK]", "[PAD]", "hello", "world", *WORDS],  # 40 tokens
    "b": ["[UNK]", "[PAD]", "world", "hello", *WORDS, "bee1", "bee2"],  # 42
    "c": ["[UNK]", "[PAD]", "hello", *WORDS, "cee1"],  # 39: no "world"
}
EMBEDS = ("model.embed_tokens.weight", "lm_head.weight")

Models = dict[str, Path]


def make_model(path: Path, tokens: list[str], seed: int, rows: int | None = None) -> Path:
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=rows or len(tokens), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=32, tie_word_embeddings=False)
    tf.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                               pad_token="[PAD]").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    root = tmp_path_factory.mktemp("tok-models")
    return {k: make_model(root / k, v, seed) for (k, v), seed in zip(VOCABS.items(), (0, 1, 2),
                                                                      strict=True)}


def state(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def run_ours(tmp_path: Path, recipe: dict, name: str = "ours") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = tmp_path / name
    result = CliRunner().invoke(app, ["run", str(path), "-o", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    return out


def out_vocab(out: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(out).get_vocab())


# --- the dense reference: the rules, by token string ---------------------------------------

def aligned_reference(models: Models, keys: list[str], base: str | None, vocab: dict[str, int],
                      name: str, tokens: dict | None = None, pad: int | None = None
                      ) -> dict[str, torch.Tensor]:
    """Each model's `name` rows in the output order: its own row for a token it has (unless
    forced); else the token's setting, or the one model that has it, zeros when none does,
    the base's row, or the mean of those that have it; padding rows the mean row."""
    tokens = tokens or {}
    rows = {k: state(models[k])[name] for k in keys}
    ids = {k: {t: i for i, t in enumerate(VOCABS[k])} for k in keys}
    size = len(vocab) if not pad else -(-len(vocab) // pad) * pad
    out = {k: torch.zeros(size, rows[k].shape[1]) for k in keys}
    for tok, i in vocab.items():
        have = [k for k in keys if tok in ids[k]]
        cfg = tokens.get(tok, {})
        src = cfg.get("source")
        if isinstance(src, dict) and src["kind"] == "zero":
            default = torch.zeros(rows[keys[0]].shape[1])
        elif isinstance(src, dict):
            default = rows[src["model"]][ids[src["model"]][src["token"]]]
        elif src is not None:
            default = rows[src][ids[src][tok]]
        elif len(have) == 1:
            default = rows[have[0]][ids[have[0]][tok]]
        elif not have:
            default = torch.zeros(rows[keys[0]].shape[1])
        elif base in have:
            default = rows[base][ids[base][tok]]
        else:
            default = sum(rows[k][ids[k][tok]] for k in have) / len(have)
        for k in keys:
            own = tok in ids[k] and not cfg.get("force")
            out[k][i] = rows[k][ids[k][tok]] if own else default
    for k in keys:
        out[k][len(vocab):] = out[k][:len(vocab)].mean(dim=0)
    return out


def recipe_of(method: str, models: Models, names: list[str], base: str | None = None,
              weights: list[float] | None = None, **extra: object) -> dict:
    weights = weights or [1.0] * len(names)
    recipe: dict = {"merge_method": method, "dtype": "float32", "models": [
        {"model": str(models[k]), "parameters": {"weight": w, **(
            {"density": 0.6} if method == "ties" else {})}}
        for k, w in zip(names, weights, strict=True)]}
    if base is not None:
        recipe["base_model"] = str(models[base])
    recipe.update(extra)
    return recipe


def merged_reference(method: str, aligned: dict[str, torch.Tensor], names: list[str],
                     base: str | None, weights: list[float]) -> torch.Tensor:
    if method == "linear":
        return sum(w * aligned[k] for k, w in zip(names, weights, strict=True)) / sum(weights)
    assert base is not None
    tuned = [aligned[k] for k in names if k != base]
    ws = [w for k, w in zip(names, weights, strict=True) if k != base]
    if method == "task_arithmetic":
        return aligned[base] + sum(w * (t - aligned[base]) for w, t in zip(ws, tuned,
                                                                           strict=True))
    return ties_merge(aligned[base], tuned, ws, [0.6] * len(tuned), lambda_=1.0,
                      normalize=True)


def check_output(out: Path, expect_vocab: dict[str, int], rows: int) -> None:
    """Loads with transformers; tokenizer, config and embedding shapes agree."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert dict(tok.get_vocab()) == expect_vocab
    assert tok("hello w3")["input_ids"] == [expect_vocab["hello"], expect_vocab["w3"]]
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape[0] == rows


# --- the pure function ----------------------------------------------------------------------

def test_permute_rows_moves_fills_and_pads() -> None:
    t = torch.arange(12.0).reshape(4, 3)
    defaults = torch.full((1, 3), -1.0)
    out = permute_rows(t, torch.tensor([2, -1, 0]), torch.tensor([1]), defaults, rows=4)
    assert torch.equal(out[:3], torch.stack([t[2], defaults[0], t[0]]))
    assert torch.equal(out[3], out[:3].mean(dim=0))
    # a default is used only where the model lacks the token
    kept = permute_rows(t, torch.tensor([1, 3]), torch.tensor([0]), defaults, rows=2)
    assert torch.equal(kept, t[[1, 3]])
    with pytest.raises(ValueError, match="no row for output token 1"):
        permute_rows(t, torch.tensor([0, -1]), torch.tensor([], dtype=torch.long),
                     defaults[:0], rows=2)


# --- the rows of a token two models number differently --------------------------------------

def test_same_token_different_ids_base_tokenizer(models: Models, tmp_path: Path) -> None:
    """tokenizer_source: base (A's vocabulary). B numbers "hello" 3 and "world" 2 and has two
    tokens A lacks: its rows move to A's ids, its extra rows are dropped."""
    recipe = recipe_of("linear", models, ["a", "b"], weights=[1.0, 3.0],
                       tokenizer_source="base", base_model=str(models["a"]))
    out = run_ours(tmp_path, recipe)
    merged = state(out)
    a, b = state(models["a"]), state(models["b"])
    for name in EMBEDS:  # written out by hand: A's row 2 and B's row 3 are both "hello"
        assert merged[name].shape == (40, 16)
        torch.testing.assert_close(merged[name][2], (a[name][2] + 3 * b[name][3]) / 4)
        torch.testing.assert_close(merged[name][3], (a[name][3] + 3 * b[name][2]) / 4)
        torch.testing.assert_close(merged[name][4:], (a[name][4:40] + 3 * b[name][4:40]) / 4)
    check_output(out, {t: i for i, t in enumerate(VOCABS["a"])}, 40)
    other = state(models["a"])["model.norm.weight"]  # everything else merges as before
    torch.testing.assert_close(merged["model.norm.weight"],
                               (other + 3 * b["model.norm.weight"]) / 4)

    if not MERGEKIT.exists():
        pytest.skip(f"mergekit 0.1.5 venv missing at {MERGEKIT.parent.parent}: "
                    "the comparison with mergekit itself is skipped (values checked above)")
    mk = tmp_path / "mk"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([str(MERGEKIT), str(tmp_path / "ours.yaml"), str(mk), "--quiet",
                           "--allow-crimes", "--no-lazy-unpickle"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = state(mk)
    assert out_vocab(mk) == out_vocab(out)
    for name in EMBEDS:
        assert torch.equal(merged[name], theirs[name]), name


# --- each tokenizer source, each method, against the dense reference ------------------------

SOURCES = {  # case -> (recipe extras, model keys, base, method, weights)
    "base/task_arithmetic": ({"tokenizer_source": "base"}, ["a", "b", "c"], "a",
                             "task_arithmetic", [1.0, 0.5, 0.8]),
    "model/ties": ({"tokenizer_source": "@b"}, ["a", "b", "c"], "a", "ties", [1.0, 0.7, 0.4]),
    "union/linear": ({"tokenizer_source": "union"}, ["a", "b", "c"], "a", "linear",
                     [1.0, 2.0, 0.5]),
    "union/ties no base row": ({"tokenizer_source": "union"}, ["c", "b", "a"], "c", "ties",
                               [1.0, 1.0, 0.5]),
}


@pytest.mark.parametrize("case", list(SOURCES))
def test_tokenizer_sources_match_the_rules(models: Models, tmp_path: Path, case: str) -> None:
    extras, names, base, method, weights = SOURCES[case]
    extras = {k: (str(models[v[1:]]) if isinstance(v, str) and v.startswith("@") else v)
              for k, v in extras.items()}
    out = run_ours(tmp_path, recipe_of(method, models, names, base=base, weights=weights,
                                       **extras))
    vocab = out_vocab(out)
    source = extras["tokenizer_source"]
    if source == "union":  # the base's tokens, then the others' in the order of the recipe
        order = [base, *[k for k in names if k != base]]
        union = list(dict.fromkeys(t for k in order for t in VOCABS[k]))
        assert sorted(vocab, key=vocab.__getitem__) == union
    else:
        owner = base if source == "base" else "b"
        assert vocab == {t: i for i, t in enumerate(VOCABS[owner])}
    merged = state(out)
    for name in EMBEDS:
        aligned = aligned_reference(models, [*names, *([base] if base not in names else [])],
                                    base, vocab, name)
        expected = merged_reference(method, aligned, names, base, weights)
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-7, msg=name)
    check_output(out, vocab, len(vocab))


def test_union_token_of_one_model_keeps_its_row(models: Models, tmp_path: Path) -> None:
    """task_arithmetic over a union: a token only B has gets B's row in every model, so the
    task vectors vanish there and the merge is B's row; "world", which C lacks, gets the
    base's row in C."""
    out = run_ours(tmp_path, recipe_of("task_arithmetic", models, ["b", "c"], base="a",
                                       weights=[0.5, 0.8], tokenizer_source="union"))
    vocab, merged = out_vocab(out), state(out)
    a, b, c = (state(models[k])["model.embed_tokens.weight"] for k in "abc")
    emb = merged["model.embed_tokens.weight"]
    torch.testing.assert_close(emb[vocab["bee1"]], b[VOCABS["b"].index("bee1")])
    world = a[3] + 0.5 * (b[2] - a[3]) + 0.8 * (a[3] - a[3])
    torch.testing.assert_close(emb[vocab["world"]], world)
    cee = c[VOCABS["c"].index("cee1")]
    torch.testing.assert_close(emb[vocab["cee1"]], cee)


def test_tokenizer_block_tokens_and_padding(models: Models, tmp_path: Path) -> None:
    """`tokenizer:` with a source model, `tokens` (forced from a model, zero, a model's
    other token, a new token), and rows padded to a multiple of 16."""
    tokens = {
        "hello": {"source": str(models["b"]), "force": True},
        "w0": {"source": {"kind": "zero"}, "force": True},
        "<think>": {"source": {"kind": "model_token", "model": str(models["c"]),
                               "token": "cee1"}},
        "bee1": {"source": {"kind": "zero"}},  # A and C lack it: zeros there, B keeps its row
    }
    block = {"source": "base", "tokens": tokens, "pad_to_multiple_of": 16}
    names, weights = ["a", "b", "c"], [1.0, 2.0, 1.0]
    out = run_ours(tmp_path, recipe_of("linear", models, names, base="a", weights=weights,
                                       tokenizer=block))
    vocab = out_vocab(out)
    assert sorted(vocab, key=vocab.__getitem__) == [*VOCABS["a"], "<think>", "bee1"]
    ref_tokens = {
        "hello": {"source": "b", "force": True}, "w0": {"source": {"kind": "zero"},
                                                       "force": True},
        "<think>": {"source": {"kind": "model_token", "model": "c", "token": "cee1"}},
        "bee1": {"source": {"kind": "zero"}},
    }
    merged = state(out)
    for name in EMBEDS:
        aligned = aligned_reference(models, names, "a", vocab, name, ref_tokens, pad=16)
        expected = merged_reference("linear", aligned, names, "a", weights)
        assert merged[name].shape == (48, 16)
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-7, msg=name)
    emb = merged["model.embed_tokens.weight"]
    b_rows = state(models["b"])["model.embed_tokens.weight"]
    torch.testing.assert_close(emb[vocab["hello"]], b_rows[3])  # forced: B's row everywhere
    assert not emb[vocab["w0"]].any()
    torch.testing.assert_close(emb[vocab["bee1"]], 2 * b_rows[40] / 4)
    check_output(out, vocab, 48)


@pytest.mark.parametrize("template", ["chatml", "{% for m in messages %}{{ m['content'] }}|"
                                                "{% endfor %}"])
def test_chat_template(models: Models, tmp_path: Path, template: str) -> None:
    from transformers import AutoTokenizer

    for extras, name in (({"tokenizer_source": "union"}, "built"), ({}, "copied")):
        names = ["a", "b"] if extras else ["a"]  # copied: one vocabulary
        out = run_ours(tmp_path, recipe_of("linear", models, names, base="a",
                                           chat_template=template, **extras), name=name)
        tok = AutoTokenizer.from_pretrained(out)
        text = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False)
        if template == "chatml":
            assert text == "<|im_start|>user\nhello<|im_end|>\n"
        else:
            assert text == "hello|"


def test_validate_counts_remapped_and_new(models: Models, tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_of("linear", models, ["a", "b", "c"], base="a",
                                             tokenizer_source="union")))
    result = CliRunner().invoke(app, ["validate", str(path), "--json"])
    assert result.exit_code == 0, result.output
    rule = json.loads(result.stdout)["rules"][0]["rule"]
    # union: A's 40 tokens, then bee1 bee2 (B), cee1 (C).
    assert f"{models['a']}: 0 re-mapped, 3 new;" in rule  # bee1, bee2, cee1
    assert f"{models['b']}: 2 re-mapped, 1 new;" in rule  # hello, world; cee1
    assert f"{models['c']}: 37 re-mapped, 3 new" in rule  # 36 words and cee1; world, bee*
    text = CliRunner().invoke(app, ["validate", str(path)]).stdout
    assert "vocabulary rows aligned to the union tokenizer (43 tokens)" in text
    summary = json.loads(result.stdout)["tokenizer"]
    assert summary["source"] == "union" and summary["tokens"] == summary["rows"] == 43
    assert summary["models"][str(models["c"])] == {"remapped": 37, "new": 3, "dropped": 0}


# --- bad input: one line, exit 2 -------------------------------------------------------------

def _fails(tmp_path: Path, recipe: dict, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    result = CliRunner().invoke(app, ["run", str(path), "-o", str(tmp_path / "o"), "--quiet"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "o").exists()


BAD: dict[str, tuple[Callable[[Models], dict], str]] = {
    "unknown token key": (lambda m: {"tokenizer": {"source": "base", "tokens": {
        "x": {"source": {"kind": "zero"}, "forse": True}}}}, "unknown key 'tokenizer.tokens"),
    "unknown block key": (lambda m: {"tokenizer": {"source": "base", "pad": 8}},
                          "unknown key 'tokenizer.pad'"),
    "model not in recipe": (lambda m: {"tokenizer": {"source": "base", "tokens": {
        "x": {"source": "/nowhere/model"}}}},
        "tokenizer.tokens.'x'.source: model /nowhere/model is not in the recipe"),
    "both keys": (lambda m: {"tokenizer_source": "base", "tokenizer": {"source": "base"}},
                  "not both"),
    "bad template": (lambda m: {"chat_template": "nosuchname", "tokenizer_source": "union"},
                     "chat_template: 'nosuchname'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_tokenizer_config(models: Models, tmp_path: Path, case: str) -> None:
    extras, message = BAD[case]
    _fails(tmp_path, recipe_of("linear", models, ["a", "b"], base="a", **extras(models)),
           message)


def test_unloadable_tokenizer(models: Models, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(models["b"], broken)
    (broken / "tokenizer.json").write_text("{not json")
    recipe = recipe_of("linear", {**models, "x": broken}, ["a", "x"], base="a",
                       tokenizer_source="union")
    _fails(tmp_path, recipe, f"model {broken}: cannot load the tokenizer in {broken}")


def test_different_vocab_sizes_need_a_tokenizer_source(models: Models, tmp_path: Path) -> None:
    _fails(tmp_path, recipe_of("linear", models, ["a", "b"], base="a"),
           "set tokenizer_source to align the vocabularies")


def test_slices_align_each_end_to_its_own_sources(models: Models, tmp_path: Path) -> None:
    """A frankenmerge over a union: the embedding comes from the first slice's model (A), the
    head from the last slice's (B), each aligned alone, as mergekit does: a token the model
    lacks gets zeros."""
    recipe = {"merge_method": "passthrough", "dtype": "float32", "tokenizer_source": "union",
              "slices": [{"sources": [{"model": str(models["a"]), "layer_range": [0, 1]}]},
                         {"sources": [{"model": str(models["b"]), "layer_range": [1, 2]}]}]}
    out = run_ours(tmp_path, recipe)
    vocab, merged = out_vocab(out), state(out)
    a, b = state(models["a"]), state(models["b"])
    emb, head = merged["model.embed_tokens.weight"], merged["lm_head.weight"]
    assert emb.shape == head.shape == (42, 16)  # A's 40, bee1, bee2
    assert torch.equal(emb[:40], a["model.embed_tokens.weight"])
    assert not emb[vocab["bee2"]].any()
    assert torch.equal(head[vocab["hello"]], b["lm_head.weight"][3])
    assert torch.equal(head[vocab["bee2"]], b["lm_head.weight"][41])
    check_output(out, vocab, 42)


def test_rows_past_the_tokenizer_are_kept_not_cut(tmp_path: Path) -> None:
    """Embeddings padded past the tokenizer (48 rows, 40 and 42 tokens) keep their 48 rows
    (mergekit cuts them to the tokenizer): token rows aligned, the rest by position; with
    one tokenizer nothing moves, so the merge equals the plain one bit for bit."""
    a = make_model(tmp_path / "a", VOCABS["a"], 0, rows=48)
    a2 = make_model(tmp_path / "a2", VOCABS["a"], 3, rows=48)
    b = make_model(tmp_path / "b", VOCABS["b"], 1, rows=48)
    plain = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1}},
                                                  {"model": str(a2),
                                                   "parameters": {"weight": 1}}],
             "dtype": "float32"}
    same = run_ours(tmp_path, {**plain, "tokenizer_source": "base", "base_model": str(a)},
                    "same")
    cut_free = run_ours(tmp_path, plain, "plain")
    for name in EMBEDS:
        assert state(same)[name].shape[0] == 48
        assert torch.equal(state(same)[name], state(cut_free)[name])
    recipe = {**plain, "models": [{"model": str(a), "parameters": {"weight": 1}},
                                  {"model": str(b), "parameters": {"weight": 1}}],
              "base_model": str(a), "tokenizer_source": "base"}
    out = run_ours(tmp_path, recipe, "swapped")
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 48
    ta, tb, got = state(a), state(b), state(out)
    ids_b = {t: i for i, t in enumerate(VOCABS["b"])}
    for name in EMBEDS:
        assert got[name].shape[0] == 48
        for i, tok in enumerate(VOCABS["a"]):  # every token of a is in b: its own row
            assert torch.equal(got[name][i], (ta[name][i] + tb[name][ids_b[tok]]) / 2)
        assert torch.equal(got[name][40:], (ta[name][40:] + tb[name][40:]) / 2)
