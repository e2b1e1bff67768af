"""Fitness: a candidate's state dict -> one float, on the `select` or `report` data.

Four kinds, chosen by `fitness.type`:
- `callable`: `package.module:function(state_dict[, data_path]) -> float`;
- `torch`: a module from `arch: package.module:factory`, a tensor dataset (`.safetensors`
  or `.npz` holding inputs and labels), accuracy or mean cross-entropy;
- `hf-classification`: a Hugging Face sequence classifier on CSV/JSONL text and labels,
  accuracy, macro-F1 or mean cross-entropy;
- `causal-lm`: mean token cross-entropy or perplexity on a text or JSONL file.
Every evaluator walks its data in a fixed order and fixed batches, so a trial and its
parent are always scored on the same batches, and the same state gives the same float.
The built-in kinds run on a `device` (`--device`): the model is moved there once, each
batch as it is fed; the data stays on the CPU and scores come back as Python floats (and
CPU tensors). A callable gets the state dict as it is (on the CPU).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from mergekit_pcb.errors import RecipeError, UserError
from mergekit_pcb.evolve.config import FitnessSpec
from mergekit_pcb.io.files import resolve_data_file
from mergekit_pcb.usercode import check_plain_data, import_object

State = Mapping[str, torch.Tensor]
Batch = Mapping[str, int]  # {"seed": ..., "size": ...}: a mini-batch of a split
SPLITS = ("select", "report")
GUARD = "guard"  # the split that chooses the result (fitness.guard or guard_fraction)


def device_kind(device: str) -> str:
    """What a run state records of `--device`: its type (cpu, cuda). Scores on one GPU or
    another of a kind agree; on the CPU and a GPU they may differ in the last bits."""
    return torch.device(device).type


def check_device(device: str) -> torch.device:
    """`device` as a torch device, refused in one line when it is a GPU this process
    cannot see (a Ray worker sees the GPUs Ray gave it: none without --gpus-per-worker)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available to the scoring "
                        "process (with --executor ray, give --gpus-per-worker)")
    return dev


def check_resumed_device(recorded: str | None, device: str, where: Path) -> None:
    """A resumed run is scored on the kind of device it started on: refused otherwise, as
    CPU and GPU scores may differ in the last bits (the run would mix them)."""
    was, now = recorded or "cpu", device_kind(device)  # states before --device: the CPU
    if was != now:
        raise UserError(f"--resume: the run in {where} was scored on {was}, now --device "
                        f"{device} (scores may differ in the last bits); resume with "
                        f"--device {was} or start over with --force")


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device
              ) -> dict[str, torch.Tensor]:
    """A tokenized batch on `device` (on the CPU: the same tensors, no copy)."""
    return {k: v.to(device) for k, v in batch.items()}


class Evaluator(Protocol):
    metric: str
    maximize: bool

    def score(self, state: State, split: str, batch: Batch | None = None) -> float:
        """The metric of `state` on the split's data, or on the seeded mini-batch `batch`
        ({"seed", "size"}) of it."""
        ...


def no_batches(batch: Batch | None, kind: str) -> None:
    if batch is not None:
        raise UserError(f"fitness.type: {kind} cannot score a mini-batch (parameters."
                        "batch_size); use fitness type torch or the whole select data")


def batch_indices(n: int, batch: Batch) -> torch.Tensor | None:
    """The rows of a seeded mini-batch of `n` examples (None: all of them): a function of
    the seed alone, so that every process draws the same rows."""
    size = int(batch["size"])
    if size >= n:
        return None
    g = torch.Generator().manual_seed(int(batch["seed"]))
    return torch.randperm(n, generator=g)[:size].sort().values


def better(a: float, b: float, maximize: bool) -> bool:
    """Strictly better; NaN is never better than anything."""
    if math.isnan(a):
        return False
    if math.isnan(b):
        return True
    return a > b if maximize else a < b


def guard_split(n: int, fraction: float, seed: int,
                labels: Sequence[Hashable] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows (sorted) of the fitting part and of the guard when `fraction` of `n` select
    rows is held out: drawn once from `seed`, per label when there are labels (each class
    gives round(fraction × its rows) to the guard, so both parts keep the class mix)."""
    if labels is None:
        groups = [list(range(n))]
    else:
        by_label: dict[Hashable, list[int]] = {}
        for i, label in enumerate(labels):
            by_label.setdefault(label, []).append(i)
        groups = [by_label[k] for k in sorted(by_label, key=repr)]
    g = torch.Generator().manual_seed(seed)
    guard: list[int] = []
    for rows in groups:
        order = torch.randperm(len(rows), generator=g).tolist()
        guard += [rows[i] for i in order[: round(fraction * len(rows))]]
    held = torch.zeros(n, dtype=torch.bool)
    held[guard] = True
    if not held.any() or held.all():
        raise UserError(f"fitness.guard_fraction: {fraction} of {n} select rows leaves "
                        f"{'no guard' if not held.any() else 'nothing to fit on'}")
    return (~held).nonzero().flatten(), held.nonzero().flatten()


def _source_split(spec: FitnessSpec, split: str) -> str:
    """The split whose data file `split` reads: the guard cut from select reads select."""
    return "select" if split == GUARD and spec.guard_fraction is not None else split


def _check_split(spec: FitnessSpec, split: str) -> str:
    if split not in (*SPLITS, GUARD):
        raise ValueError(split)
    ref = getattr(spec, _source_split(spec, split))
    if ref is None and split == "report":
        raise UserError("fitness.report: no report data named")
    if ref is None and split == GUARD:
        raise UserError("fitness.guard: no guard data named (fitness.guard or guard_fraction)")
    return ref


def _part(spec: FitnessSpec, split: str, n: int,
          labels: Sequence[Hashable] | None) -> torch.Tensor | None:
    """The rows of the select data that `split` scores when guard_fraction splits it (None:
    all the rows of its own file)."""
    if spec.guard_fraction is None or split not in ("select", GUARD):
        return None
    fit, guard = guard_split(n, spec.guard_fraction, spec.guard_seed, labels)
    return guard if split == GUARD else fit


class CallableEvaluator:
    def __init__(self, spec: FitnessSpec, root: Path) -> None:
        assert spec.function is not None
        self.spec = spec
        self.root = root
        self.metric = spec.metric or "value"
        self.maximize = spec.maximize
        self.fn: Callable[..., Any] = import_object(spec.function, root, "fitness.function")
        self._data: dict[str, str | None] = {}

    def score(self, state: State, split: str, batch: Batch | None = None) -> float:
        no_batches(batch, "callable")
        if split not in self._data:
            ref = _check_split(self.spec, split)  # guard_fraction is refused for callables
            self._data[split] = (None if ref is None
                                 else str(resolve_data_file(ref, self.root, f"fitness.{split}")))
        data = self._data[split]
        value = self.fn(state) if data is None else self.fn(state, data)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"fitness.function: {self.spec.function} returned {value!r}, "
                            "not a number") from None


# ----------------------------------------------------------------------------- torch modules


def load_tensor_dataset(path: Path, inputs_key: str, labels_key: str,
                        key: str) -> tuple[torch.Tensor, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        data: dict[str, Any] = load_file(str(path))
    elif path.suffix == ".npz":
        import numpy as np

        with np.load(path, allow_pickle=False) as z:
            data = {k: torch.from_numpy(z[k].copy()) for k in z.files}
    else:
        raise UserError(f"{key}: {path} is not a .safetensors or .npz file")
    for k in (inputs_key, labels_key):
        if k not in data:
            raise UserError(f"{key}: {path} has no array '{k}' (has: {', '.join(sorted(data))})")
    inputs, labels = data[inputs_key], data[labels_key]
    if len(inputs) != len(labels):
        raise UserError(f"{key}: {path}: {len(inputs)} inputs but {len(labels)} labels")
    return inputs, labels


def load_into(module: torch.nn.Module, state: State, what: str) -> None:
    """Copy `state` into `module` (strict: every parameter and buffer must be there)."""
    try:
        module.load_state_dict(dict(state), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise UserError(f"{what}: the candidate does not fit the model "
                        f"({' '.join(first[:2])[:300]})") from None


class TorchModuleEvaluator:
    def __init__(self, spec: FitnessSpec, root: Path, device: str = "cpu") -> None:
        assert spec.arch is not None
        self.spec = spec
        self.root = root
        self.metric = spec.metric_name
        self.maximize = spec.maximize
        check_plain_data(spec.arch_kwargs, "fitness.arch_kwargs")  # before any call
        factory = import_object(spec.arch, root, "fitness.arch")
        module = factory(**spec.arch_kwargs)
        if not isinstance(module, torch.nn.Module):
            raise RecipeError(f"fitness.arch: {spec.arch} returned {type(module).__name__}, "
                              "not a torch.nn.Module")
        self.device = check_device(device)
        # on the CPU, .to returns the module itself: the same bits as before --device
        self.module = module.to(self.device).eval()
        self.reset = import_object(spec.reset, root, "fitness.reset") if spec.reset else None
        self._data: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def data(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in self._data:
            ref = _check_split(self.spec, split)
            key = f"fitness.{_source_split(self.spec, split)}"
            path = resolve_data_file(ref, self.root, key)
            x, y = load_tensor_dataset(path, self.spec.inputs_key, self.spec.labels_key, key)
            if self.spec.limit is not None:
                x, y = x[: self.spec.limit], y[: self.spec.limit]
            rows = _part(self.spec, split, len(y), y.tolist())
            if rows is not None:
                x, y = x[rows], y[rows]
            self._data[split] = (x, y.long())
        return self._data[split]

    def _outputs(self, state: State, split: str, batch: Batch | None
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(logits, labels) of each batch of the split (or of its mini-batch `batch`)."""
        x, y = self.data(split)
        rows = batch_indices(len(y), batch) if batch is not None else None
        if rows is not None:
            x, y = x[rows], y[rows]
        load_into(self.module, state, "fitness.arch")
        self.module.eval()
        bs = self.spec.batch_size
        for start in range(0, len(y), bs):
            if self.reset is not None:
                self.reset(self.module)
            yield (self.module(x[start:start + bs].to(self.device)),
                   y[start:start + bs].to(self.device))

    @torch.inference_mode()
    def example_scores(self, state: State, split: str, batch: Batch | None = None
                       ) -> torch.Tensor:
        """Each example's share of the metric (correct or not; its cross-entropy): the
        metric is their mean (over the split, or its mini-batch `batch`)."""
        return torch.cat([_example_scores(logits, target, self.metric)
                          for logits, target in self._outputs(state, split, batch)]).cpu()

    @torch.inference_mode()
    def score(self, state: State, split: str, batch: Batch | None = None) -> float:
        correct, loss_sum, n = 0, 0.0, 0
        for logits, target in self._outputs(state, split, batch):
            n += len(target)
            if self.metric == "accuracy":
                correct += int((logits.argmax(dim=-1) == target).sum())
            else:
                loss_sum += float(torch.nn.functional.cross_entropy(
                    logits.float(), target, reduction="sum"))
        n = max(1, n)
        return correct / n if self.metric == "accuracy" else loss_sum / n


# ----------------------------------------------------------------------------- Hugging Face


def read_records(path: Path, key: str) -> list[dict[str, Any]]:
    try:
        if path.suffix == ".csv":
            with path.open(newline="") as f:
                return list(csv.DictReader(f))
        if path.suffix in (".jsonl", ".json"):
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [{"text": line} for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError, csv.Error) as e:
        raise UserError(f"{key}: cannot read {path} ({e})") from None


class _HFEvaluator:
    auto_class = ""

    def __init__(self, spec: FitnessSpec, root: Path, model_ref: str | None,
                 device: str = "cpu") -> None:
        import transformers

        from mergekit_pcb.io.resolve import resolve_model_path

        ref = spec.model or model_ref
        if ref is None:
            raise RecipeError("fitness.model: name the model whose config and tokenizer to use")
        path = resolve_model_path(ref)
        path = path if path.is_dir() else path.parent
        self.spec = spec
        self.root = root
        self.metric = spec.metric_name
        self.maximize = spec.maximize
        try:
            config = transformers.AutoConfig.from_pretrained(path)
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise UserError(f"fitness.model: cannot load config/tokenizer from {path} "
                            f"({str(e).splitlines()[0]})") from None
        self.device = check_device(device)
        self.model = getattr(transformers, self.auto_class).from_config(config).to(
            self.device).eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self._batches: dict[str, list[dict[str, torch.Tensor]]] = {}

    def load(self, state: State) -> None:
        expected = set(self.model.state_dict())
        missing = [k for k in expected if k not in state and k in
                   dict(self.model.named_parameters(remove_duplicate=True))]
        extra = [k for k in state if k not in expected]
        if missing or extra:
            what = (f"missing {missing[0]}" if missing else f"unexpected {extra[0]}")
            raise UserError(f"fitness.model: the candidate does not fit the model ({what})")
        self.model.load_state_dict(dict(state), strict=False)
        self.model.eval()

    def batches(self, split: str) -> list[dict[str, torch.Tensor]]:
        if split not in self._batches:
            ref = _check_split(self.spec, split)
            key = f"fitness.{_source_split(self.spec, split)}"
            path = resolve_data_file(ref, self.root, key)
            records = read_records(path, key)
            if self.spec.limit is not None:
                records = records[: self.spec.limit]
            if not records:
                raise UserError(f"{key}: {path} holds no examples")
            rows = _part(self.spec, split, len(records), self.strata(records))
            if rows is not None:
                records = [records[i] for i in rows.tolist()]
            self._batches[split] = self.tokenize(records, key)
        return self._batches[split]

    def tokenize(self, records: list[dict[str, Any]], key: str) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def strata(self, records: list[dict[str, Any]]) -> list[Hashable] | None:
        """What a guard_fraction split is stratified by (None: no labels, a plain draw)."""
        return None

    def _texts(self, records: list[dict[str, Any]], key: str) -> list[str]:
        field = self.spec.text_field
        if field not in records[0]:
            raise UserError(f"{key}: examples have no field '{field}' (fitness.text_field)")
        return [str(r[field]) for r in records]


class HFClassificationEvaluator(_HFEvaluator):
    auto_class = "AutoModelForSequenceClassification"

    @torch.inference_mode()
    def example_scores(self, state: State, split: str, batch: Batch | None = None
                       ) -> torch.Tensor:
        """Each example's share of the metric (accuracy or loss: their mean)."""
        no_batches(batch, self.spec.type)
        batches = self.batches(split)
        self.load(state)
        out = []
        for b in batches:
            b = to_device(b, self.device)
            out.append(_example_scores(
                self.model(**{k: v for k, v in b.items() if k != "labels"}).logits,
                b["labels"], self.metric))
        return torch.cat(out).cpu()

    def strata(self, records: list[dict[str, Any]]) -> list[Hashable] | None:
        return [str(r.get(self.spec.label_field, "")).strip() for r in records]

    def tokenize(self, records: list[dict[str, Any]], key: str) -> list[dict[str, torch.Tensor]]:
        texts = self._texts(records, key)
        field = self.spec.label_field
        label2id = {str(k): int(v) for k, v in (self.model.config.label2id or {}).items()}
        labels = []
        for i, r in enumerate(records):
            if field not in r:
                raise UserError(f"{key}: example {i} has no field '{field}' "
                                "(fitness.label_field)")
            value = str(r[field]).strip()
            if value.lstrip("-").isdigit():
                labels.append(int(value))
            elif value in label2id:
                labels.append(label2id[value])
            else:
                raise UserError(f"{key}: example {i}: label {value!r} is neither an integer "
                                "nor in the model's label2id")
        out = []
        bs = self.spec.batch_size
        for s in range(0, len(texts), bs):
            enc = self.tokenizer(texts[s:s + bs], padding=True, truncation=True,
                                 max_length=self.spec.max_length, return_tensors="pt")
            batch = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask",
                                                            "token_type_ids")}
            batch["labels"] = torch.tensor(labels[s:s + bs])
            out.append(batch)
        return out

    @torch.inference_mode()
    def score(self, state: State, split: str, batch: Batch | None = None) -> float:
        no_batches(batch, self.spec.type)
        batches = self.batches(split)
        self.load(state)
        preds, gold, loss_sum = [], [], 0.0
        for b in batches:
            b = to_device(b, self.device)
            labels = b["labels"]
            logits = self.model(**{k: v for k, v in b.items() if k != "labels"}).logits
            loss_sum += float(torch.nn.functional.cross_entropy(logits.float(), labels,
                                                                reduction="sum"))
            preds.append(logits.argmax(dim=-1))
            gold.append(labels)
        p, g = torch.cat(preds), torch.cat(gold)
        if self.metric == "loss":
            return loss_sum / len(g)
        if self.metric == "accuracy":
            return float((p == g).float().mean())
        return macro_f1(p, g)


def _example_scores(logits: torch.Tensor, target: torch.Tensor, metric: str) -> torch.Tensor:
    if metric == "accuracy":
        return (logits.argmax(dim=-1) == target).double()
    return torch.nn.functional.cross_entropy(logits.float(), target, reduction="none").double()


def example_scores(evaluator: Evaluator, state: State, split: str, batch: Batch | None = None
                   ) -> torch.Tensor | None:
    """Each example's share of the metric, where the metric is their mean (torch and
    hf-classification accuracy or loss); None where it is not (macro-F1, token-weighted
    causal-LM loss, a callable)."""
    fn = getattr(evaluator, "example_scores", None)
    if fn is None or evaluator.metric not in ("accuracy", "loss"):
        return None
    scores: torch.Tensor = fn(state, split, batch)
    return scores


def macro_f1(pred: torch.Tensor, gold: torch.Tensor) -> float:
    """Mean over the classes present in gold or pred of the per-class F1."""
    classes = torch.unique(torch.cat([pred, gold])).tolist()
    scores = []
    for c in classes:
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


class CausalLMEvaluator(_HFEvaluator):
    auto_class = "AutoModelForCausalLM"

    def tokenize(self, records: list[dict[str, Any]], key: str) -> list[dict[str, torch.Tensor]]:
        texts = self._texts(records, key)
        out = []
        bs = self.spec.batch_size
        for s in range(0, len(texts), bs):
            enc = self.tokenizer(texts[s:s + bs], padding=True, truncation=True,
                                 max_length=self.spec.max_length, return_tensors="pt")
            out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        return out

    @torch.inference_mode()
    def score(self, state: State, split: str, batch: Batch | None = None) -> float:
        no_batches(batch, self.spec.type)
        batches = self.batches(split)
        self.load(state)
        nll, tokens = 0.0, 0
        for b in batches:
            b = to_device(b, self.device)
            logits = self.model(**b).logits[:, :-1].float()
            target = b["input_ids"][:, 1:]
            mask = b["attention_mask"][:, 1:].bool()
            losses = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
            nll += float(losses[mask.reshape(-1)].sum())
            tokens += int(mask.sum())
        if tokens == 0:
            raise UserError("fitness: no token to predict (texts of one token or less)")
        loss = nll / tokens
        return math.exp(loss) if self.metric == "perplexity" else loss


def code_refs(spec: FitnessSpec) -> list[tuple[str, str]]:
    """The (recipe key, package.module:attr) pairs of code a fitness block names."""
    return [(f"fitness.{key}", getattr(spec, key)) for key in ("function", "arch", "reset")
            if getattr(spec, key) is not None]


def build_evaluator(spec: FitnessSpec, root: Path, model_ref: str | None = None,
                    device: str = "cpu") -> Evaluator:
    """The evaluator of `spec` on `device`; the caller has checked consent for its code
    (code_refs)."""
    if spec.type == "callable":
        return CallableEvaluator(spec, root)
    if spec.type == "torch":
        return TorchModuleEvaluator(spec, root, device)
    if spec.type == "hf-classification":
        return HFClassificationEvaluator(spec, root, model_ref, device)
    return CausalLMEvaluator(spec, root, model_ref, device)


__all__ = ["GUARD", "SPLITS", "Batch", "Evaluator", "batch_indices", "better", "build_evaluator",
           "check_device", "check_resumed_device", "code_refs", "device_kind",
           "example_scores", "guard_split", "macro_f1", "to_device"]
