"""Everything an output holds besides its weights (issue 31, point 3).

A tiny BERT sentence-transformers model (CLS pooling, then Normalize) and two fine-tunes are
built here with sentence-transformers itself. Checked: the merged directory loads in
`SentenceTransformer` with the base's modules, and its embeddings equal those of a
SentenceTransformer assembled in code around the merged weights computed by hand; the other
non-weight files of the base come along and weights, cards and records do not; the
tokenizer config carries no load-time keys or local paths; the model card renders filtered
parameters as YAML, lists each input once, counts each tensor once and passes
huggingface_hub's metadata checks, with `base_model` metadata for a hub id only.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergekit_pcb.cli import app

st = pytest.importorskip("sentence_transformers")
try:
    from sentence_transformers.sentence_transformer import modules as st_modules
except ImportError:  # sentence-transformers before 6
    from sentence_transformers import models as st_modules

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(59)]]
SENTENCES = ["w1 w2 w3", "w40 w7", "w58 w0 w0 w12 w33", "w5"]
WEIGHTS = (0.3, 0.7)
HIDDEN = 16
# Files the output must carry from the base: sentence-transformers modules and configs.
ST_FILES = {"modules.json", "config_sentence_transformers.json", "sentence_bert_config.json",
            "1_Pooling/config.json", "2_Normalize/config.json"}


def save_bert(path: Path, state: dict[str, torch.Tensor] | None = None, seed: int = 0) -> Path:
    """A tiny BertModel (given weights, or seeded random ones) with a WordPiece tokenizer."""
    import transformers as tf
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    torch.manual_seed(seed)
    cfg = tf.BertConfig(vocab_size=len(WORDS), hidden_size=HIDDEN, intermediate_size=32,
                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32)
    model = tf.BertModel(cfg)
    if state is not None:
        model.load_state_dict(state)
    model.save_pretrained(path, safe_serialization=True)
    tok = Tokenizer(models.WordPiece({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer()
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                               cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]"
                               ).save_pretrained(path)
    return path


def sentence_model(bert_dir: Path) -> st.SentenceTransformer:
    """Transformer -> CLS pooling -> Normalize: loading without the modules would pool by
    mean and not normalise, so every embedding would differ."""
    return st.SentenceTransformer(
        modules=[st_modules.Transformer(str(bert_dir), max_seq_length=32),
                 st_modules.Pooling(HIDDEN, "cls"), st_modules.Normalize()], device="cpu")


@pytest.fixture(scope="module")
def st_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, ft0 and ft1 as sentence-transformers directories (`SentenceTransformer.save`)."""
    root = tmp_path_factory.mktemp("st-models")
    model = sentence_model(save_bert(root / "bert"))
    out = {"base": root / "base"}
    model.save(str(out["base"]))
    for i in range(2):
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        out[f"ft{i}"] = root / f"ft{i}"
        model.save(str(out[f"ft{i}"]))
    return out


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def run(tmp_path: Path, recipe: dict, name: str = "out", stderr: list[str] | None = None
        ) -> Path:
    """`pcbmerge run` in-process; quiet unless `stderr` is given to receive its lines."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = tmp_path / name
    args = ["run", str(path), "-o", str(out)] + ([] if stderr is not None else ["--quiet"])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    if stderr is not None:
        stderr += result.stderr.splitlines()
    return out


def linear_recipe(models: dict[str, Path], base: str = "base") -> dict:
    return {"merge_method": "linear", "base_model": str(models[base]), "dtype": "float32",
            "models": [{"model": str(models[f"ft{i}"]), "parameters": {"weight": w}}
                       for i, w in enumerate(WEIGHTS)]}


def files_of(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def front_matter(card: str) -> dict:
    match = re.match(r"^---\n(.*?)\n---\n", card, re.S)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))


# --- 1. sentence-transformers modules and the other non-weight files ----------------------

def test_sentence_transformers_embeddings_equal_the_merged_weights(
        st_models: dict[str, Path], tmp_path: Path) -> None:
    out = run(tmp_path, linear_recipe(st_models))
    assert files_of(out) >= ST_FILES
    loaded = st.SentenceTransformer(str(out), device="cpu")
    assert [type(m) for m in loaded] == [st_modules.Transformer, st_modules.Pooling,
                                         st_modules.Normalize]
    assert loaded[1].pooling_mode == "cls"

    # The dense reference: the merged state computed here, in a model assembled in code.
    tuned = [load_file(st_models[f"ft{i}"] / "model.safetensors") for i in range(2)]
    merged = {k: WEIGHTS[0] * tuned[0][k] + WEIGHTS[1] * tuned[1][k] for k in tuned[0]}
    reference = sentence_model(save_bert(tmp_path / "reference", merged))

    got = loaded.encode(SENTENCES, convert_to_tensor=True)
    want = reference.encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(SENTENCES)))
    # Not the inputs' embeddings: the merge did change them.
    base = st.SentenceTransformer(str(st_models["base"]), device="cpu")
    assert (base.encode(SENTENCES, convert_to_tensor=True) - got).abs().max() > 1e-3


def test_other_files_carried_weights_cards_and_records_not(
        st_models: dict[str, Path], tmp_path: Path) -> None:
    base = tmp_path / "base"
    shutil.copytree(st_models["base"], base)
    carried = {  # as a model directory may hold them
        "generation_config.json": '{"max_length": 20}\n',
        "preprocessor_config.json": '{"feature_size": 1}\n',
        "extras/deep/notes.txt": "kept\n",
        "LICENSE": "Apache-2.0\n",
    }
    left_out = {  # weights in other formats, indexes, the input's card and records, hidden
        "onnx/model.onnx": "x", "tf_model.h5": "x", "flax_model.msgpack": "x",
        "pytorch_model.bin.index.json": "{}", "training_args.bin": "x",
        "mergekit_config.yml": "merge_method: linear\n", "trainer_state.json": "{}",
        ".gitattributes": "*.bin lfs\n", "2_Dense/config.json": "{}",
        "2_Dense/model.safetensors": "x",
    }
    for name, text in {**carried, **left_out}.items():
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_text(text)
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the hub\n")
    (base / "leak.txt").symlink_to(secret)
    (base / "spiece.model").symlink_to(secret)  # a tokenizer file too
    assert (base / "README.md").is_file()  # sentence-transformers wrote the input's card

    stderr: list[str] = []
    out = run(tmp_path, linear_recipe({**st_models, "base": base}), stderr=stderr)
    files = files_of(out)
    for name, text in carried.items():
        assert (out / name).read_text() == text, name
    for name in ST_FILES:
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    # mergekit_config.yml: the merge may write its own (the recipe), never the base's.
    assert not files & (set(left_out) - {"mergekit_config.yml"}), files & set(left_out)
    if "mergekit_config.yml" in files:
        assert (out / "mergekit_config.yml").read_text() != left_out["mergekit_config.yml"]
    assert not {"leak.txt", "spiece.model"} & files
    assert "onnx" not in {f.split("/")[0] for f in files}
    own = {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
           "README.md", "merge_recipe.yaml", ".pcbmerge-output"}
    assert own <= files <= own | set(carried) | ST_FILES | {"mergekit_config.yml"}
    card = (out / "README.md").read_text()
    assert "SentenceTransformer" not in card.split("## Recipe")[0]  # ours, not the input's
    section = card.split("## Not carried over from the inputs", 1)[1].split("\n## ")[0]
    assert "`2_Dense/`" in section and "`onnx/`" in section and "`leak.txt`" in section
    notes = [line for line in stderr if line.startswith("note: not carried over from the inputs")]
    assert [n.split(": ")[2] for n in notes] == ["2_Dense/", "leak.txt", "onnx/",
                                                  "spiece.model"], stderr


# --- 2. a clean tokenizer config --------------------------------------------------------

LOAD_TIME = ("local_files_only", "is_local", "cache_dir", "name_or_path", "tokenizer_file",
             "_commit_hash")


@pytest.mark.parametrize("case", ["copied", "built"])
def test_tokenizer_config_has_no_load_time_keys_or_paths(
        st_models: dict[str, Path], tmp_path: Path, case: str) -> None:
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    shutil.copytree(st_models["base"], base)
    path = base / "tokenizer_config.json"
    clean = json.loads(path.read_text())
    for key in ("local_files_only", "is_local"):  # what transformers itself writes
        clean.pop(key, None)
    dirty = {**clean, "local_files_only": True, "is_local": True,
             "cache_dir": str(tmp_path / "cache"), "name_or_path": str(base),
             "tokenizer_file": str(base / "tokenizer.json"), "_commit_hash": None}
    path.write_text(json.dumps(dirty))
    recipe = linear_recipe({**st_models, "base": base})
    if case == "built":  # saved by transformers, offline: it writes local_files_only: true
        recipe["tokenizer_source"] = "base"
    out = run(tmp_path, recipe)

    written = json.loads((out / "tokenizer_config.json").read_text())
    assert not set(LOAD_TIME) & set(written), set(LOAD_TIME) & set(written)
    assert str(tmp_path) not in (out / "tokenizer_config.json").read_text()
    if case == "copied":
        assert written == clean  # everything else kept as it was
    want = AutoTokenizer.from_pretrained(st_models["base"])(SENTENCES)["input_ids"]
    assert AutoTokenizer.from_pretrained(out)(SENTENCES)["input_ids"] == want


# --- 3. the model card ---------------------------------------------------------------------

def table(card: str, heading: str) -> list[list[str]]:
    """The rows of the first table under `heading`, as cells (header and rule left out)."""
    body = card.split(f"## {heading}\n", 1)[1].split("\n## ")[0]
    rows = [line for line in body.splitlines() if line.startswith("|")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows[2:]]


def check_hub_metadata(card: str) -> dict:
    """What huggingface_hub checks offline: the card parses (ModelCard), its data builds a
    ModelCardData, and every `base_model` is a valid repo id. (`ModelCard.validate()` posts
    the card to the Hub's validate-yaml endpoint: it needs the network.)"""
    from huggingface_hub import ModelCard, ModelCardData
    from huggingface_hub.utils import validate_repo_id

    meta = front_matter(card)
    data = ModelCard(card).data
    assert data.to_dict() == ModelCardData(**meta).to_dict() == meta
    for ref in [meta["base_model"]] if isinstance(meta.get("base_model"), str) \
            else meta.get("base_model", []):
        validate_repo_id(ref)
    return meta


def test_card_parameters_inputs_counts_and_metadata(
        st_models: dict[str, Path], tmp_path: Path) -> None:
    density = [{"filter": "attention", "value": 0.5}, {"value": 0.7}]
    recipe = {
        "merge_method": "ties", "base_model": str(st_models["base"]), "dtype": "float32",
        "tokenizer_source": "union",
        "parameters": {"weight": [{"filter": "intermediate", "value": 0.4}, {"value": 1.0}]},
        "models": [{"model": str(st_models["base"])},
                   {"model": str(st_models["ft0"]), "parameters": {"density": 0.5}},
                   {"model": str(st_models["ft1"]), "parameters": {"density": density}}],
    }
    out = run(tmp_path, recipe)
    card = (out / "README.md").read_text()
    assert "FilteredValue" not in card

    inputs = table(card, "Inputs")
    assert [row[1] for row in inputs] == [f"`{st_models[k]}`" for k in ("base", "ft0", "ft1")]
    assert inputs[0][0].startswith("base")
    params = yaml.safe_load("{" + inputs[2][2].replace("\\|", "|") + "}")
    assert params == {"density": density}
    line = next(x for x in card.splitlines() if x.startswith("- `weight`: "))
    assert yaml.safe_load(line.removeprefix("- `weight`: ")) == \
        recipe["parameters"]["weight"]

    n_tensors = len(load_file(out / "model.safetensors"))
    counts = {row[0]: int(row[1]) for row in table(card, "How each tensor was produced")}
    assert counts.pop("total") == n_tensors == sum(counts.values())
    assert "embeddings.word_embeddings.weight" in card.split("| rule |")[0]  # the alignment

    meta = check_hub_metadata(card)
    assert "base_model" not in meta  # a local path: in the body only
    assert meta["library_name"] == "sentence-transformers"
    assert meta["tags"][:2] == ["merge", "mergekit-pcb"]


def hub_cache(tmp_path: Path, repo: str, model: Path) -> Path:
    """A Hugging Face cache holding `model` as `repo` at main, laid out as huggingface_hub
    lays it out (snapshot files are symlinks into blobs/)."""
    cache = tmp_path / "hub"
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    for i, src in enumerate(sorted(p for p in model.rglob("*") if p.is_file())):
        blob = repo_dir / "blobs" / f"{i:040x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, blob)
        link = snapshot / src.relative_to(model)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(blob)
    return cache


def test_card_base_model_metadata_is_the_hub_id(
        st_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = "tiny-org/st-base"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache(tmp_path, repo, st_models["base"])))
    monkeypatch.chdir(tmp_path)  # no local directory named like the repo
    out = run(tmp_path, {**linear_recipe(st_models), "base_model": repo})
    card = (out / "README.md").read_text()
    meta = check_hub_metadata(card)
    assert meta["base_model"] == [repo]
    assert table(card, "Inputs")[0][:2] == ["base", f"`{repo}`"]
    # The modules came along from the snapshot (symlinks into blobs/ followed).
    assert files_of(out) >= ST_FILES
    assert isinstance(st.SentenceTransformer(str(out), device="cpu")[2], st_modules.Normalize)


def test_card_and_json_record_the_numeric_environment(tmp_path: Path) -> None:
    """An SVD's bits follow torch's LAPACK and the device: the card and `--json` say which."""
    from safetensors.torch import save_file

    for i in range(2):
        save_file({"w": torch.full((2, 2), float(i))}, str(tmp_path / f"m{i}.safetensors"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "linear",
        "models": [{"model": str(tmp_path / f"m{i}.safetensors"),
                    "parameters": {"weight": 1.0}} for i in range(2)]}))
    res = CliRunner().invoke(app, ["run", str(recipe), str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.output
    env = json.loads(res.stdout)["environment"]
    config = torch.__config__.show()  # what torch says it was built with
    assert env["torch"] == torch.__version__ and env["device"] == "cpu"
    assert f"BLAS_INFO={env['blas']}," in config and f"LAPACK_INFO={env['lapack']}," in config
    card = (tmp_path / "out" / "README.md").read_text()
    section = card.split("## Numeric environment", 1)[1].split("##", 1)[0]
    assert [line for line in section.splitlines() if line] == [
        f"- torch: {torch.__version__}", f"- blas: {env['blas']}",
        f"- lapack: {env['lapack']}", "- device: cpu"]
