"""The merge recipe: YAML validated into typed config.

mergekit's keys mean what they mean in mergekit (`merge_method`, `base_model`,
`models[].model`, `models[].parameters`, `parameters`, `dtype`, `out_dtype`,
`tokenizer_source`, `tokenizer`, `chat_template`, `slices`), so a mergekit recipe runs
unchanged. Our additions: `seed`, `tensors` (routing rules), `postprocess` (steps applied
to the merge's update, merged − base) and `name`.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from mergekit_pcb.errors import RecipeError

Scalar = Union[float, int, bool, str]  # noqa: UP007 - pydantic needs the runtime union


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


ModelT = TypeVar("ModelT", bound=BaseModel)

# A model named by the recipe (a directory, a .safetensors file or a hub id). An empty one
# would read as "no model" (`base_model: ''` as no base) where the recipe names one.
ModelRef = Annotated[str, StringConstraints(min_length=1)]


class FilteredValue(StrictModel):
    """One item of a filtered parameter: applies to tensors whose name contains `filter`."""

    filter: str | None = None
    value: Scalar | list[Scalar]


# A parameter: a scalar, a gradient (list of numbers interpolated over the layers), or a
# list of {filter, value} items matched on tensor names (first match wins).
ParameterValue = Union[Scalar, list[FilteredValue], list[Scalar]]  # noqa: UP007


class ModelEntry(StrictModel):
    model: ModelRef
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)


DTypeName = Literal["float32", "float16", "bfloat16", "float64", "fp32", "fp16", "bf16"]


class TensorRule(StrictModel):
    """Route the tensors whose names contain `filter` elsewhere.

    Exactly one of: `take` (copy the tensor from that model; `base` means the base model)
    or `method` (merge those tensors with another method and its own `parameters`).
    """

    filter: str
    take: ModelRef | None = None
    method: str | None = None
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_action(self) -> TensorRule:
        if (self.take is None) == (self.method is None):
            raise ValueError("a tensors rule needs exactly one of 'take' or 'method'")
        if self.take is not None and self.parameters:
            raise ValueError("'parameters' only goes with 'method', not with 'take'")
        return self


class SliceSource(StrictModel):
    """One input of a slice: layers [start, end) of `model`, with per-model parameters."""

    model: ModelRef
    layer_range: tuple[int, int]
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _ordered(self) -> SliceSource:
        start, end = self.layer_range
        if not 0 <= start < end:
            raise ValueError("layer_range must be [start, end) with 0 <= start < end")
        return self


class SliceDef(StrictModel):
    """mergekit's output slice: its sources' layers are merged layer by layer, in order."""

    sources: list[SliceSource] = Field(min_length=1)
    base_model: ModelRef | None = None
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)


class ModelTokenSource(StrictModel):
    """A token's embedding taken from one row of a model: by id, or by that model's token."""

    kind: Literal["model_token"]
    model: ModelRef
    token_id: int | None = Field(default=None, ge=0)
    token: str | None = None

    @model_validator(mode="after")
    def _one_of(self) -> ModelTokenSource:
        if (self.token_id is None) == (self.token is None):
            raise ValueError("a model_token source needs exactly one of 'token_id' or 'token'")
        return self


class ZeroSource(StrictModel):
    """A token's embedding set to zeros."""

    kind: Literal["zero"]


class TokenEmbedding(StrictModel):
    """mergekit's per-token setting: where a token's row comes from when a model lacks the
    token (or for every model, with `force`). A bare string names a model of the recipe."""

    source: ModelTokenSource | ZeroSource | str | None = None
    force: bool = False


class TokenizerSpec(StrictModel):
    """mergekit's `tokenizer:` block: the output vocabulary (`source`: `union`, `base` or a
    model), extra `tokens` and their embeddings, rows padded to `pad_to_multiple_of`."""

    source: ModelRef = "union"
    tokens: dict[str, TokenEmbedding] = Field(default_factory=dict)
    pad_to_multiple_of: int | None = Field(default=None, ge=1)


def _adapter_entries(data: Any) -> Any:
    """`models[i].adapter: DIR` as mergekit's `model: BASE+DIR`, over `models[i].model` where
    the entry names one, else over the recipe's `base_model`."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        return data
    entries = []
    for i, entry in enumerate(data["models"]):
        if isinstance(entry, dict) and "adapter" in entry:
            entry = dict(entry)
            adapter = entry.pop("adapter")
            over = entry.get("model") or data.get("base_model")
            if not isinstance(adapter, str) or not adapter:
                raise ValueError(f"models[{i}].adapter must name an adapter directory or hub id")
            if not isinstance(over, str) or not over:
                raise ValueError(f"models[{i}].adapter needs a model to apply it to: give "
                                 f"models[{i}].model or a base_model")
            entry["model"] = f"{over}+{adapter}"
        entries.append(entry)
    return {**data, "models": entries}


class AdapterModels(StrictModel):
    """A recipe whose `models[]` may name LoRA adapters with an `adapter:` key."""

    @model_validator(mode="before")
    @classmethod
    def _adapters(cls, data: Any) -> Any:
        return _adapter_entries(data)


class SvcStep(StrictModel):
    """Singular value calibration of each merged matrix (`methods.postprocess.svc`)."""

    # FusionBench's configurations: 0.1 for task arithmetic, TIES, DARE, averaging, ISO-C.
    alpha: float = Field(0.1, gt=0.0, le=1e6)
    # As the spectral merges: embeddings and the LM head are left alone unless asked for.
    vocabulary: bool = False


class LinesStep(StrictModel):
    """LiNeS: the update of block ℓ of L scaled by a + b·ℓ/(L−1), tensors outside by a."""

    b: float = Field(ge=-1e6, le=1e6)
    # None: the paper's a, ‖Σ τ‖₁ / ‖Δ‖₁ / K over the whole model (a statistics pass)
    a: float | None = Field(None, ge=-1e6, le=1e6)
    # a regular expression whose first group is a tensor's block index (default: the
    # layer numbering of `layers.N.`, `layer.N.`, `h.N.`, `blocks.N.`, `block.N.`)
    layers: str | None = None

    @model_validator(mode="after")
    def _pattern(self) -> LinesStep:
        if self.layers is not None:
            try:
                pattern = re.compile(self.layers)
            except re.error as e:
                raise ValueError(f"layers: not a regular expression ({e})") from None
            if pattern.groups < 1:
                raise ValueError("layers: the pattern needs a group, (\\d+), for the "
                                 "block index")
        return self


class RescaleNormsStep(StrictModel):
    """Each task vector scaled to the mean of their whole-model L2 norms before the merge."""


POSTPROCESS_STEPS = ("svc", "lines", "rescale_norms")


class PostStep(StrictModel):
    """One item of `postprocess:`: `{svc: {...}}`, `{lines: {...}}` or `rescale_norms`
    (a bare name is the step with its defaults)."""

    svc: SvcStep | None = None
    lines: LinesStep | None = None
    rescale_norms: RescaleNormsStep | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare_name(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {data: {}}
        if isinstance(data, dict):  # `rescale_norms:` with nothing after it
            return {k: ({} if v is None else v) for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _one_step(self) -> PostStep:
        given = [k for k in POSTPROCESS_STEPS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"each step is one of {', '.join(POSTPROCESS_STEPS)}, one per "
                             f"item (got {', '.join(given) or 'none'})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in POSTPROCESS_STEPS if getattr(self, k) is not None)


class MergeRecipe(AdapterModels):
    merge_method: str
    base_model: ModelRef | None = None
    models: list[ModelEntry] = Field(default_factory=list)
    slices: list[SliceDef] = Field(default_factory=list)
    parameters: dict[str, ParameterValue] = Field(default_factory=dict)
    dtype: DTypeName | None = None
    out_dtype: DTypeName | None = None
    tokenizer_source: ModelRef | None = None
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None
    seed: int | None = None
    tensors: list[TensorRule] = Field(default_factory=list)
    postprocess: list[PostStep] = Field(default_factory=list)
    name: str | None = None

    @model_validator(mode="after")
    def _one_tokenizer_key(self) -> MergeRecipe:
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give 'tokenizer_source' or a 'tokenizer' block, not both")
        return self

    @property
    def vocabulary_source(self) -> str | None:
        """Where the output vocabulary comes from (`union`, `base` or a model), or None:
        then the tokenizer files are copied and no embedding row moves."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

    def model_refs(self) -> list[str]:
        """Every model the recipe reads, base first, without repeats."""
        refs = [self.base_model] if self.base_model else []
        refs += [m.model for m in self.models]
        refs += [s.model for sl in self.slices for s in sl.sources]
        refs += [r.take for r in self.tensors if r.take and r.take != "base"]
        return list(dict.fromkeys(refs))


def format_loc(loc: tuple[int | str, ...]) -> str:
    """('models', 1, 'parameters', 'weight') -> 'models[1].parameters.weight'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-", "list[", "union[", "literal[")) or "[" in part:
            continue  # pydantic's names for union branches, not keys of the file
        else:
            out += f".{part}" if out else part
    return out or "(top level)"


NOT_A_MAPPING = "a recipe is a YAML mapping of keys to values"


def validate_mapping(model: type[ModelT], data: Any, source: str,
                     not_a_mapping: str = NOT_A_MAPPING) -> ModelT:
    """`data` as a `model`, or a RecipeError of one line naming `source` and the key at fault."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: {not_a_mapping}")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{source}: {first_error(e)}") from None


def parse_recipe(data: Any, source: str) -> MergeRecipe:
    return validate_mapping(MergeRecipe, data, source)


def first_error(e: ValidationError) -> str:
    """One line naming the recipe key at fault (the most specific of pydantic's errors)."""
    errors = e.errors()
    # Prefer the most specific location: unions report one error per branch.
    err = max(errors, key=lambda x: len([p for p in x["loc"] if not _is_branch(p)]))
    where = format_loc(tuple(err["loc"]))
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"unknown key '{where}'"
    if kind == "missing":
        return f"missing required key '{where}'"
    return f"'{where}': {err['msg']}"


def _is_branch(part: int | str) -> bool:
    return isinstance(part, str) and ("[" in part or part.startswith("function-"))


MAX_YAML_BYTES = 1 << 20  # recipes are a few KB; the cap bounds what a hostile file costs
MAX_YAML_VALUES = 100_000  # after alias expansion: a "billion laughs" stops here
MAX_YAML_DEPTH = 100  # PyYAML's composer recurses once per nesting level
_NOT_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                (stat.S_ISSOCK, "a socket"))


def _shown(p: Path) -> str:
    """A path for a one-line message: as typed, unless it holds newlines or the like."""
    text = str(p)
    return text if text.isprintable() else repr(text)


def _check_regular(mode: int, p: Path, what: str) -> None:
    if not stat.S_ISREG(mode):
        kind = next((k for test, k in _NOT_REGULAR if test(mode)), "not a file")
        raise RecipeError(f"cannot read {what} {_shown(p)}: it is {kind}, not a regular file")


def read_text_file(p: Path, what: str = "recipe", limit: int = MAX_YAML_BYTES) -> str:
    """The UTF-8 text of a regular file of at most `limit` bytes, or a one-line RecipeError.

    The file type is checked before opening (a FIFO would block, a device would never end),
    and again on the open file, which is opened non-blocking and read only up to the limit,
    in case the path changed in between.
    """
    try:
        st = os.stat(p)
        _check_regular(st.st_mode, p, what)
        size = st.st_size
        if size <= limit:
            fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            with open(fd, "rb") as f:
                _check_regular(os.fstat(fd).st_mode, p, what)
                data = f.read(limit + 1)
            size = len(data)
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise RecipeError(f"cannot read {what} {_shown(p)}: {reason}") from None
    if size > limit:
        raise RecipeError(f"{_shown(p)}: too large for a {what} ({size} bytes; the limit is "
                          f"{limit} bytes)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{_shown(p)}: not UTF-8 text (byte 0x{data[e.start]:02x} at "
                          f"offset {e.start})") from None


class _Refused(Exception):
    """Valid YAML that is refused all the same (too deep, too large once expanded)."""

    def __init__(self, problem: str, mark: yaml.Mark | None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.mark = mark


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses nesting deeper than MAX_YAML_DEPTH while composing, before
    the composer's recursion could exhaust the stack, and reads `1e-3` as a number."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: object) -> yaml.Node:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _Refused(f"nested more than {MAX_YAML_DEPTH} levels deep",
                               self.peek_event().start_mark)
            return super().compose_node(parent, index)  # type: ignore[no-any-return]
        finally:
            self._depth -= 1


# YAML 1.1 (PyYAML) wants a dot and a signed exponent, so `1e-3` would be a string; mergekit's
# pydantic models coerce it to a number, and YAML 1.2 reads it as one. Read it as a float.
_BoundedLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a document whose aliases expand it past MAX_YAML_VALUES values or
    MAX_YAML_DEPTH levels, or that contains itself, without expanding it.

    An alias is the same node object as its anchor, so the expanded size and depth of each
    node are computed once (memoized by identity), iteratively: the work is linear in the
    composed nodes whatever the expansion.
    """
    done: dict[int, tuple[int, int]] = {}  # id -> (expanded values, depth)
    open_: set[int] = set()  # nodes entered and not finished: the current path
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finishing = stack.pop()
        key = id(node)
        if finishing:
            open_.discard(key)
            children = [done[id(c)] for c in _children(node)]
            size = 1 + sum(c[0] for c in children)
            depth = 1 + max((c[1] for c in children), default=0)
            if size > MAX_YAML_VALUES:
                raise _Refused(f"aliases expand it past {MAX_YAML_VALUES} values",
                               node.start_mark)
            if depth > MAX_YAML_DEPTH:
                raise _Refused(f"aliases nest it more than {MAX_YAML_DEPTH} levels deep",
                               node.start_mark)
            done[key] = (size, depth)
        elif key in open_:
            raise _Refused("an alias refers to a value that contains it", node.start_mark)
        elif key not in done:
            open_.add(key)
            stack.append((node, True))
            stack.extend((c, False) for c in _children(node))


def _yaml_problem(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.MarkedYAMLError):
        text = e.problem or e.context or "invalid"
    elif isinstance(e, yaml.reader.ReaderError):
        code = e.character if isinstance(e.character, int) else ord(e.character)
        text = f"unacceptable character #x{code:04x}: {e.reason}"
    else:
        text = str(e)
    return " ".join(text.split())


def read_yaml(p: Path, what: str = "recipe") -> Any:
    """The YAML document in file `p`, or a one-line RecipeError naming the file.

    Safe on hostile input: only regular files up to MAX_YAML_BYTES, strict UTF-8, safe
    tags only, nesting and alias expansion bounded (so no deep recursion, no alias bomb).
    """
    return read_yaml_text(p, what)[0]


def read_yaml_text(p: Path, what: str = "recipe") -> tuple[Any, str]:
    """The parsed YAML and the text it was parsed from (kept in outputs as the recipe),
    from one bounded read of the file (see `read_yaml`)."""
    text = read_text_file(p, what)
    return _parse_yaml(text, p), text


def _parse_yaml(text: str, p: Path) -> Any:
    try:
        loader = _BoundedLoader(text)  # checks the characters first (ReaderError)
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _check_expansion(node)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except _Refused as e:
        where = f" line {e.mark.line + 1}" if e.mark is not None else ""
        raise RecipeError(f"{_shown(p)}:{where} {e.problem}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line if mark is not None else None
        if isinstance(e, yaml.reader.ReaderError):  # a character YAML forbids
            line = text.count("\n", 0, e.position)
        where = f" line {line + 1}" if line is not None else ""
        raise RecipeError(f"{_shown(p)}:{where} not valid YAML ({_yaml_problem(e)})") from None
    except (ValueError, OverflowError) as e:  # a scalar the constructor cannot build
        raise RecipeError(f"{_shown(p)}: not valid YAML ({' '.join(str(e).split())})") from None
    except RecursionError:  # backstop: the depth bound keeps the composer well inside
        raise RecipeError(f"{_shown(p)}: nested too deeply") from None


def read_merge_method(path: str | Path) -> str | None:
    """The recipe's `merge_method`, read before choosing which schema validates it."""
    data = read_yaml(Path(path))
    method = data.get("merge_method") if isinstance(data, dict) else None
    return method if isinstance(method, str) else None


def load_recipe(path: str | Path) -> MergeRecipe:
    p = Path(path)
    return parse_recipe(read_yaml(p), str(p))
