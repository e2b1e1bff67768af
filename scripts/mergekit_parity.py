"""Parity with mergekit 0.1.5: the same recipes through both tools, tensor by tensor.

    python scripts/mergekit_parity.py                  # every case
    python scripts/mergekit_parity.py --cases slerp,sce --keep /tmp/parity

Builds a tiny Llama (4 layers, float32) and three fine-tuned copies, then runs each case's
recipe through mergekit (`mergekit-yaml` from the venv at `.bench/mergekit-venv`, created
as `scripts/bench_merge.py` creates it when missing) and through ours (`python -m
mergekit_pcb run`), each as a child process, and prints one row per case: both exit codes,
the largest relative difference over tensors (max|ours − mergekit| / max|mergekit|), and
how many tensors are bit-identical. Random cases (DELLA with density < 1) cannot match
bits (mergekit draws from torch's global generator); their rows compare the fraction of
task-vector entries kept instead. A row is bit-identical only where both tools wrote the
same dtype too (the last column counts tensors written in another dtype).

Half-precision cases (`half_precision_cases`) run mergekit's documented recipes with
`dtype: float16` and `bfloat16` on wider copies of the tiny Llama (`WIDE`), whose larger
tensors torch sums in one partial sum per thread: both tools then run with this machine's
default torch thread count.

Tokenizer cases run on three other tiny Llamas with word-level tokenizers that number the
same tokens differently and have tokens of their own (`build_tok_models`). Vocabulary rows
are compared by token string (mergekit orders a union's new tokens by dict hash order, we
by id), and the last column adds whether both output vocabularies hold the same tokens
(and, with a chat template, whether both render a conversation alike).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = REPO_ROOT / ".bench" / "mergekit-venv"
MERGEKIT_VERSION = "0.1.5"
TORCH_PIN = "torch==2.13.0"


@dataclass
class Case:
    name: str
    method: str
    models: list[tuple[str, dict[str, Any]]]  # (model key, per-model parameters)
    base: str | None = "base"
    params: dict[str, Any] = field(default_factory=dict)
    random: bool = False  # compare keep fractions, not bits
    extra: dict[str, Any] = field(default_factory=dict)  # tokenizer keys, "@m" is model m
    tok_models: bool = False  # the tokenizer models (tk-a, tk-b, tk-c) instead
    dtype: str = "float32"  # the recipe's `dtype` (mergekit casts the inputs to it)
    slices: bool = False  # `slices:` over every layer (the base first) instead of `models:`
    wide: bool = False  # the wide models (`WIDE`): tensors past torch's parallel grain


def cases() -> list[Case]:
    three = [("ft0", {}), ("ft1", {}), ("ft2", {})]
    weighted = [("ft0", {"weight": 1.0}), ("ft1", {"weight": 2.0}), ("ft2", {"weight": 0.5})]
    crumbs = [(k, {"weight": w, "density": 0.5, "gamma": 0.05})
              for k, w in (("ft0", 1.0), ("ft1", 0.7), ("ft2", 0.4))]
    return [
        Case("slerp t=0.3", "slerp", [("ft0", {})], params={"t": 0.3}),
        Case("slerp t gradient", "slerp", [("ft0", {})], params={"t": [0, 0.5, 0.3, 1]}),
        Case("slerp base listed", "slerp", [("base", {}), ("ft1", {})], params={"t": 0.7}),
        Case("passthrough", "passthrough", [("ft0", {})], base=None),
        Case("passthrough scale", "passthrough", [("ft1", {"scale": 0.5})], base=None),
        Case("breadcrumbs", "breadcrumbs", crumbs),
        Case("breadcrumbs rescale+normalize", "breadcrumbs", crumbs,
             params={"rescale": True, "normalize": True}),
        Case("breadcrumbs_ties", "breadcrumbs_ties", crumbs, params={"lambda": 0.8}),
        Case("della density 1", "della", weighted),
        Case("della_linear density 1", "della_linear", weighted),
        Case("della (random)", "della",
             [("ft0", {"weight": 1.0, "density": 0.4, "epsilon": 0.2})], random=True),
        Case("della_linear (random)", "della_linear",
             [("ft0", {"weight": 1.0, "density": 0.7, "epsilon": 0.1})],
             params={"rescale": False}, random=True),
        Case("model_stock", "model_stock", three),
        Case("model_stock filter_wise", "model_stock", three, params={"filter_wise": True}),
        Case("sce", "sce", three),
        Case("sce select_topk=0.3", "sce", three, params={"select_topk": 0.3}),
        Case("nearswap t=0.01", "nearswap", [("ft0", {})], params={"t": 0.01}),
        Case("multislerp", "multislerp", weighted),
        Case("multislerp raw weights", "multislerp", weighted,
             params={"normalize_weights": False}),
        Case("karcher", "karcher", three, base=None),
        Case("karcher base listed", "karcher", [("base", {}), *three], base="base"),
        Case("multislerp no base", "multislerp", weighted, base=None),
        Case("nuslerp", "nuslerp", [("ft0", {"weight": 0.3}), ("ft1", {"weight": 0.7})]),
        Case("nuslerp no base", "nuslerp", [("ft0", {"weight": 0.3}), ("ft1", {"weight": 0.7})],
             base=None),
        Case("nuslerp row-wise", "nuslerp", [("ft0", {"weight": 1.0}), ("ft1", {"weight": 2.0})],
             params={"nuslerp_flatten": False, "nuslerp_row_wise": True}),
        Case("arcee_fusion", "arcee_fusion", [("ft0", {})]),
        Case("ram", "ram", three),
        Case("ramplus_tl", "ramplus_tl", three, params={"r": 0.5, "alpha": 0.4}),
        Case("ties rescale", "ties", [(k, {"weight": 1.0, "density": 0.4}) for k, _ in three],
             params={"rescale": True}),
        Case("task_arithmetic int8_mask", "task_arithmetic", weighted,
             params={"int8_mask": True, "lambda": 0.7}),
        Case("dare_linear int8_mask density 1", "dare_linear", weighted,
             params={"int8_mask": True}),
        *tokenizer_cases(),
        *half_precision_cases(),
    ]


# mergekit-docs' slerp recipe (examples/gradient-slerp.yml): a 5-point gradient per filter.
DOCS_SLERP_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                {"value": 0.5}]


def half_precision_cases() -> list[Case]:
    """mergekit's documented recipes in float16 and bfloat16: the inputs are float32, so
    both tools first round them to the recipe's dtype. On the wide models, whose larger
    tensors torch sums on several threads, splitting a reduction at a thread count of its
    own (mergekit uses its process's count)."""
    three = [("ft0", {}), ("ft1", {}), ("ft2", {})]
    weighted = [("ft0", {"weight": 1.0}), ("ft1", {"weight": 2.0}), ("ft2", {"weight": 0.5})]
    pair = [("ft0", {"weight": 0.3}), ("ft1", {"weight": 0.7})]
    out = []
    for dtype in ("float16", "bfloat16"):
        out += [
            Case(f"slerp docs slices {dtype}", "slerp", [("base", {}), ("ft0", {})],
                 params={"t": DOCS_SLERP_T}, dtype=dtype, slices=True, wide=True),
            Case(f"slerp docs models {dtype}", "slerp", [("base", {}), ("ft1", {})],
                 params={"t": DOCS_SLERP_T}, dtype=dtype, wide=True),
            Case(f"model_stock {dtype}", "model_stock", [("base", {}), *three], dtype=dtype,
                 wide=True),
            Case(f"model_stock filter_wise {dtype}", "model_stock", three,
                 params={"filter_wise": True}, dtype=dtype, wide=True),
            # examples/arcee_fusion.yml: the base listed under `models:` too
            Case(f"arcee_fusion example {dtype}", "arcee_fusion", [("base", {}), ("ft0", {})],
                 dtype=dtype, wide=True),
            Case(f"ramplus_tl {dtype}", "ramplus_tl", three, params={"r": 0.5, "alpha": 0.4},
                 dtype=dtype, wide=True),
            Case(f"karcher {dtype}", "karcher", three, base=None, dtype=dtype, wide=True),
            Case(f"nuslerp {dtype}", "nuslerp", pair, dtype=dtype, wide=True),
        ]
    # Not in float16: the embeddings (ft2 leaves them as the base's) give a tangent of
    # exactly 0 there, and eps = 1e-8 is 0 in float16, so sin(0)/0: mergekit writes a NaN
    # embedding, we stop with one line naming the tensor.
    out.append(Case("multislerp bfloat16", "multislerp", weighted, dtype="bfloat16", wide=True))
    return out


def tokenizer_cases() -> list[Case]:
    abc = [("tk-a", {"weight": 1.0}), ("tk-b", {"weight": 2.0}), ("tk-c", {"weight": 0.5})]
    dens = [(k, {**p, "density": 0.6}) for k, p in abc]
    tokens = {
        "hello": {"source": "@tk-b", "force": True},
        "w0": {"source": {"kind": "zero"}, "force": True},
        "<think>": {"source": {"kind": "model_token", "model": "@tk-c", "token": "cee1"}},
        "bee1": {"source": {"kind": "zero"}},
    }
    return [
        Case("tokenizer_source base, ids differ", "linear", abc[:2], base="tk-a",
             extra={"tokenizer_source": "base"}, tok_models=True),
        Case("tokenizer_source model", "ties", dens, base="tk-a",
             extra={"tokenizer_source": "@tk-b"}, tok_models=True),
        Case("tokenizer_source union", "task_arithmetic", abc, base="tk-a",
             extra={"tokenizer_source": "union"}, tok_models=True),
        Case("union, base lacks a token", "ties", [dens[2], dens[1], dens[0]], base="tk-c",
             extra={"tokenizer_source": "union"}, tok_models=True),
        # `source: base` with new tokens stops mergekit 0.1.5 (KeyError in embed.py: it adds
        # them to the base's own tokenizer, whose permutation then lacks them); union runs.
        Case("tokenizer: tokens + pad_to_multiple_of", "linear", abc, base="tk-a",
             extra={"tokenizer": {"source": "union", "tokens": tokens,
                                  "pad_to_multiple_of": 16}}, tok_models=True),
        Case("tokenizer: union + chat_template chatml", "linear", abc, base="tk-a",
             extra={"tokenizer": {"source": "union"}, "chat_template": "chatml"},
             tok_models=True),
    ]


TOK_WORDS = [f"w{i}" for i in range(36)]
TOK_VOCABS = {
    "tk-a": ["[UNK]", "[PAD]", "hello", "world", *TOK_WORDS],
    "tk-b": ["[UNK]", "[PAD]", "world", "hello", *TOK_WORDS, "bee1", "bee2"],
    "tk-c": ["[UNK]", "[PAD]", "hello", *TOK_WORDS, "cee1"],
}
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def build_tok_models(root: Path) -> dict[str, Path]:
    """Three tiny Llamas (hidden 16, 2 layers) with word-level tokenizers: tk-b swaps the ids
    of "hello" and "world" and has two tokens more; tk-c lacks "world" and has one of its
    own, every shared word one id lower."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    paths = {}
    for seed, (key, tokens) in enumerate(TOK_VOCABS.items()):
        torch.manual_seed(seed)
        cfg = tf.LlamaConfig(vocab_size=len(tokens), hidden_size=16, intermediate_size=32,
                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                             max_position_embeddings=32, tie_word_embeddings=False,
                             torch_dtype="float32")
        paths[key] = root / key
        tf.LlamaForCausalLM(cfg).save_pretrained(paths[key], safe_serialization=True)
        tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)},
                                         unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                   pad_token="[PAD]").save_pretrained(paths[key])
    return paths


def _models_in(value: Any, paths: dict[str, Path]) -> Any:
    """`value` with every "@key" string replaced by that model's path."""
    if isinstance(value, str) and value.startswith("@"):
        return str(paths[value[1:]])
    if isinstance(value, dict):
        return {k: _models_in(v, paths) for k, v in value.items()}
    return value


def vocab_of(path: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return dict(AutoTokenizer.from_pretrained(str(path)).get_vocab())


def by_our_ids(theirs: dict[str, torch.Tensor], ours_dir: Path, mk_dir: Path
               ) -> tuple[dict[str, torch.Tensor], bool]:
    """mergekit's vocabulary rows re-ordered to our token ids (padding rows stay), and
    whether both vocabularies hold the same tokens."""
    ours, mk = vocab_of(ours_dir), vocab_of(mk_dir)
    if set(ours) != set(mk):
        return theirs, False
    order = torch.tensor([mk[t] for t in sorted(ours, key=ours.__getitem__)])
    out = dict(theirs)
    for name in VOCAB_TENSORS:
        if name in out:
            t = out[name].clone()
            t[: len(order)] = out[name][order]
            out[name] = t
    return out, True


def same_chat(ours_dir: Path, mk_dir: Path) -> bool:
    from transformers import AutoTokenizer

    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "world"}, {"role": "user", "content": "w1"}]
    texts = [AutoTokenizer.from_pretrained(str(d)).apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True) for d in (ours_dir, mk_dir)]
    return texts[0] == texts[1]


# Hidden size and MLP width of the wide models: their MLP and query/output projections
# (36,864 and 73,728 entries) pass torch's parallel grain (32,768), the key/value
# projections and the embeddings stay under it.
WIDE = (192, 384)


def build_models(root: Path, hidden: int = 32, intermediate: int = 64) -> dict[str, Path]:
    """A tiny Llama base and three fine-tuned copies (float32, random task vectors). One
    fine-tune leaves the embeddings untouched, as frozen layers would."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, torch_dtype="float32")
    base = tf.LlamaForCausalLM(cfg)
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"], safe_serialization=True)
    for i in range(3):
        tuned = tf.LlamaForCausalLM(cfg)
        tuned.load_state_dict(base.state_dict())
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for name, p in tuned.named_parameters():
                if i == 2 and "embed_tokens" in name:
                    continue
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        paths[f"ft{i}"] = root / f"ft{i}"
        tuned.save_pretrained(paths[f"ft{i}"], safe_serialization=True)
    return paths


def recipe(case: Case, paths: dict[str, Path]) -> dict[str, Any]:
    out: dict[str, Any] = {"merge_method": case.method, "dtype": case.dtype}
    if case.slices:
        config = json.loads((paths[case.models[0][0]] / "config.json").read_text())
        layers = config["num_hidden_layers"]
        out["slices"] = [{"sources": [{"model": str(paths[k]), "layer_range": [0, layers]}
                                      for k, _ in case.models]}]
    else:
        out["models"] = [{"model": str(paths[k]), **({"parameters": p} if p else {})}
                         for k, p in case.models]
    if case.base is not None:
        out["base_model"] = str(paths[case.base])
    if case.params:
        out["parameters"] = case.params
    out.update(_models_in(case.extra, paths))
    return out


def ensure_mergekit(venv: Path) -> Path:
    exe = venv / "bin" / "mergekit-yaml"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = str(venv / "bin" / "pip")
        subprocess.run([pip, "install", "-q", TORCH_PIN], check=True)
        subprocess.run([pip, "install", "-q", f"mergekit=={MERGEKIT_VERSION}"], check=True)
    return exe


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def run(cmd: list[str], log: Path) -> int:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    log.write_text(proc.stdout + proc.stderr)
    return proc.returncode


def compare(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]
            ) -> tuple[float, int, int, int]:
    """(max relative difference, identical tensors, tensors compared, tensors stored in
    another dtype). Identical means the same dtype and the same values: torch.equal alone
    compares values across dtypes."""
    worst, same, other_dtype = 0.0, 0, 0
    names = sorted(set(ours) & set(theirs))
    for n in names:
        a, b = ours[n].double(), theirs[n].double()
        if a.shape != b.shape:
            return float("inf"), same, len(names), other_dtype
        other_dtype += int(ours[n].dtype != theirs[n].dtype)
        same += int(ours[n].dtype == theirs[n].dtype and torch.equal(ours[n], theirs[n]))
        scale = b.abs().max().item() or 1.0
        worst = max(worst, (a - b).abs().max().item() / scale)
    return worst, same, len(names), other_dtype


def kept_fraction(out: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    changed = total = 0
    for n, t in out.items():
        if n in base and t.dim() == 2:  # weights (rows ranked by DELLA)
            changed += int((t != base[n]).sum())
            total += t.numel()
    return changed / max(total, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", help="comma-separated substrings of case names")
    ap.add_argument("--keep", type=Path, help="work directory to keep (default: a temp dir)")
    ap.add_argument("--mergekit-venv", type=Path, default=DEFAULT_VENV)
    args = ap.parse_args()
    mergekit = ensure_mergekit(args.mergekit_venv)
    work = args.keep or Path(tempfile.mkdtemp(prefix="mk-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    selected = [c for c in cases() if not args.cases
                or any(s in c.name for s in args.cases.split(","))]
    paths = build_models(work / "models")
    paths.update(build_tok_models(work / "tok-models"))
    wide = build_models(work / "wide-models", *WIDE) if any(c.wide for c in selected) else {}
    base = load_dir(paths["base"])
    rows = []
    for i, case in enumerate(selected):
        d = work / f"case{i:02d}"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        rec = d / "recipe.yaml"
        rec.write_text(yaml.safe_dump(recipe(case, wide if case.wide else paths),
                                      sort_keys=False))
        mk = run([str(mergekit), str(rec), str(d / "mk"), "--quiet", "--random-seed", "0"],
                 d / "mk.log")
        ours = run([sys.executable, "-m", "mergekit_pcb", "run", str(rec), "-o",
                    str(d / "ours"), "--quiet"], d / "ours.log")
        row = [case.name, str(mk), str(ours), "—", "—"]
        if mk == 0 and ours == 0:
            a, b = load_dir(d / "ours"), load_dir(d / "mk")
            if case.random:
                row[3] = f"kept {kept_fraction(a, base):.3f} vs {kept_fraction(b, base):.3f}"
            else:
                vocab_note = ""
                if case.tok_models:
                    b, same_vocab = by_our_ids(b, d / "ours", d / "mk")
                    vocab_note = "; same vocabulary" if same_vocab else "; VOCABULARY DIFFERS"
                    if "chat_template" in case.extra:
                        vocab_note += ("; same chat rendering" if same_chat(d / "ours", d / "mk")
                                       else "; chat rendering differs")
                worst, same, n, other_dtype = compare(a, b)
                row[3] = "0" if worst == 0 else f"{worst:.2e}"
                row[4] = (f"{same}/{n}" + ("" if set(a) == set(b) else " (names differ)")
                          + (f" ({other_dtype} in another dtype)" if other_dtype else "")
                          + vocab_note)
        rows.append(row)
        print(" | ".join(row), flush=True)
    header = ["case", "mergekit exit", "ours exit", "max rel diff", "identical tensors"]
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
