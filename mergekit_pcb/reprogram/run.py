"""An `osr-reprogram` recipe: its plan (checks, nothing written) and its run (train, score
on the held-out split, write the module)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from mergekit_pcb.errors import RecipeError, UserError
from mergekit_pcb.io.writer import atomic_output_dir, check_destination, disk_errors
from mergekit_pcb.reprogram import METHOD, MODULE_FILE
from mergekit_pcb.reprogram.config import SPLITS, ReprogramRecipe, resolve_path
from mergekit_pcb.reprogram.data import check_split, load_reference, load_split
from mergekit_pcb.reprogram.frozen import (
    FrozenModel,
    check_model,
    code_refs,
    load_frozen,
    model_inputs,
    weights_sha256,
)
from mergekit_pcb.reprogram.modules import (
    FDAModule,
    FourierModule,
    ReprogramModule,
    WaveModule,
    mean_amplitude,
)
from mergekit_pcb.reprogram.store import save_module
from mergekit_pcb.reprogram.train import Scores, TrainResult, choose_beta, evaluate, train_module
from mergekit_pcb.usercode import require_consent

Loaded = tuple[ReprogramRecipe, str]
REPORT_FILE = "report.json"
RECIPE_FILE = "recipe.yaml"


def effective_seed(recipe: ReprogramRecipe, seed: int | None) -> int:
    return seed if seed is not None else recipe.seed if recipe.seed is not None else 0


def plan_reprogram(loaded: Loaded, source: Path, *, output: Path | None = None,
                   force: bool = False, seed: int | None = None) -> dict[str, Any]:
    """Every check that needs no computation: model files, data pairs and sizes, splits
    disjoint, the output location. Nothing is imported, trained or written."""
    recipe, _ = loaded
    root = source.parent
    params = recipe.parameters
    model = check_model(recipe.model, root)
    data: dict[str, Any] = {}
    seen: dict[tuple[str, ...], str] = {}
    for split in SPLITS:
        src = getattr(recipe.data, split)
        info = check_split(src, root, f"data.{split}", params.channels)
        ident = tuple(str(Path(info[k]).resolve()) for k in ("tensors", "degraded", "clean")
                      if k in info)
        if ident in seen:
            raise RecipeError(f"{source}: data.{split}: the same images as data.{seen[ident]}; "
                              "the splits must be disjoint (select on validation, report on "
                              "test)")
        seen[ident] = split
        data[split] = info
    if params.mode != "fda":
        h, w = data["train"]["min_size"]
        if params.crop > min(h, w):
            raise RecipeError(f"{source}: parameters.crop: {params.crop} is larger than the "
                              f"smallest training image ({h}×{w})")
    scales = {data[s]["scale"] for s in SPLITS}
    if len(scales) > 1:
        raise RecipeError(f"{source}: data: the splits have different clean/degraded scales "
                          f"({sorted(scales)})")
    if recipe.data.reference is not None:
        data["reference"] = str(resolve_path(recipe.data.reference, root, "data.reference",
                                             directory=None))
    out = None
    if output is not None:
        out = str(check_destination(output, force=force, inputs=_inputs(recipe, root)))
    return {"kind": "reprogram", "method": METHOD, "name": recipe.name, "mode": params.mode,
            "seed": effective_seed(recipe, seed), "model": model, "data": data,
            "parameters": params.model_dump(), "output": out}


def describe_plan(plan: dict[str, Any]) -> list[str]:
    m, d, p = plan["model"], plan["data"], plan["parameters"]
    model = (f"Hugging Face model {m['hf']}" if "hf" in m
             else f"{m['arch']} with weights {m['weights']}")
    lines = [f"{METHOD} ({plan['mode']}): reprogram the frozen {model} ({m['tensors']} tensors)"]
    for split in SPLITS:
        info = d[split]
        where = info.get("tensors") or f"{info['degraded']} / {info['clean']}"
        lines.append(f"  {split}: {info['pairs']} pairs ({where})")
    if plan["mode"] == "fda":
        lines.append(f"  fda: beta chosen on validation from {p['beta']}; reference "
                     f"{d.get('reference', 'the training clean images')}")
    else:
        lines.append(f"  training: up to {p['steps']} steps of {p['batch_size']} crops of "
                     f"{p['crop']}px, AdamW lr {p['lr']}, {p['loss']} + {p['ssim_weight']}·"
                     f"(1 - SSIM), validation every {p['eval_every']} (patience "
                     f"{p['patience']}), seed {plan['seed']}")
    if plan.get("output"):
        lines.append(f"  output: {plan['output']}/{MODULE_FILE}")
    return lines


def _inputs(recipe: ReprogramRecipe, root: Path) -> list[Path]:
    out = list(model_inputs(recipe.model, root))
    for split in SPLITS:
        src = getattr(recipe.data, split)
        for key in ("degraded", "clean", "tensors"):
            ref = getattr(src, key)
            if ref is not None:
                out.append(resolve_path(ref, root, f"data.{split}.{key}",
                                        directory=key != "tensors"))
    if recipe.data.reference is not None:
        out.append(resolve_path(recipe.data.reference, root, "data.reference", directory=None))
    return out


def build_module(recipe: ReprogramRecipe, seed: int) -> ReprogramModule:
    """A new module of the recipe's mode, its initial weights drawn from `seed`."""
    p = recipe.parameters
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if p.mode == "wave":
            return WaveModule(p.channels, p.hidden)
        if p.mode == "fourier":
            return FourierModule(p.channels, p.bins)
        return FDAModule(p.channels, p.fda_size, 0.0)


def run_reprogram(loaded: Loaded, source: Path, output: Path, *, force: bool = False,
                  seed: int | None = None, quiet: bool = True, threads: int | None = None,
                  trust_code: bool = False, device: str = "cpu") -> dict[str, Any]:
    start = time.perf_counter()
    recipe, text = loaded
    require_consent(code_refs(recipe.model), trust_code)  # before anything imports it
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    plan = plan_reprogram(loaded, source, output=output, force=force, seed=seed)
    s, root, p = plan["seed"], source.parent, recipe.parameters
    console = Console(stderr=True, quiet=quiet)
    frozen = load_frozen(recipe.model, root, trust_code=trust_code, channels=p.channels,
                         device=device)
    data_scale = plan["data"]["train"]["scale"]
    if frozen.scale != data_scale:
        raise UserError(f"data: the clean images are {data_scale}× the degraded ones, but the "
                        f"frozen model upscales by {frozen.scale}")
    splits = {split: load_split(getattr(recipe.data, split), root, f"data.{split}", p.channels)
              for split in SPLITS}
    module = build_module(recipe, s)
    hash_before = frozen.sha256
    if isinstance(module, FDAModule):
        ref = (load_reference(recipe.data.reference, root, "data.reference", p.channels)
               if recipe.data.reference is not None else splits["train"].clean)
        module.reference.copy_(mean_amplitude(ref, p.fda_size))
        result = choose_beta(module, frozen, splits["validation"], p.betas, device)
    else:
        result = train_module(module, frozen, splits["train"], splits["validation"], p, s,
                              device=device, console=console)
    if weights_sha256(frozen.module) != hash_before:  # pragma: no cover - a bug if reached
        raise RuntimeError("the frozen model's weights changed during training")
    module.cpu()
    frozen.to("cpu")
    scores = {name: {"frozen": evaluate(None, frozen, splits[split]),
                     "reprogrammed": evaluate(module, frozen, splits[split])}
              for name, split in (("validation", "validation"), ("test", "test"))}
    summary = _summary(recipe, plan, output, frozen, module, result, scores, start)
    with atomic_output_dir(output, force=force, inputs=_inputs(recipe, root),
                           kind="reprogram") as tmp:
        save_module(tmp / MODULE_FILE, module, frozen.sha256,
                    {"model": plan["model"], "scale": frozen.scale, "seed": s,
                     "name": recipe.name})
        with disk_errors(tmp):
            (tmp / RECIPE_FILE).write_text(text)
            (tmp / REPORT_FILE).write_text(json.dumps(
                {**summary, "history": result.history, "plan": plan}, indent=1) + "\n")
    summary["seconds"] = round(time.perf_counter() - start, 3)
    console.print(score_table(summary))
    return summary


def _summary(recipe: ReprogramRecipe, plan: dict[str, Any], output: Path, frozen: FrozenModel,
             module: ReprogramModule, result: TrainResult,
             scores: dict[str, dict[str, Scores]], start: float) -> dict[str, Any]:
    test = scores["test"]
    return {
        "kind": "reprogram", "method": METHOD, "name": recipe.name, "mode": module.mode,
        "output": str(output), "module": str(output / MODULE_FILE),
        "frozen_sha256": frozen.sha256, "seed": plan["seed"],
        "test_images": plan["data"]["test"]["pairs"],
        "test": {k: v.as_dict() for k, v in test.items()},
        "validation": {k: v.as_dict() for k, v in scores["validation"].items()},
        "psnr_gain_db": round(test["reprogrammed"].psnr - test["frozen"].psnr, 4),
        "best_step": result.best_step, "steps_run": result.steps_run,
        "beta": result.beta, "train_seconds": round(result.seconds, 3),
        "seconds": round(time.perf_counter() - start, 3),
    }


def score_table(summary: dict[str, Any]) -> Table:
    table = Table("", "test PSNR (dB)", "test SSIM", "validation PSNR (dB)",
                  title=f"{METHOD} ({summary['mode']}) on {summary['test_images']} held-out "
                        "images", title_justify="left",
                  caption=(f"fda band β = {summary['beta']:g} (chosen on validation)"
                           if summary["mode"] == "fda" else
                           f"trained {summary['train_seconds']:.1f}s; step "
                           f"{summary['best_step']} of {summary['steps_run']} chosen on "
                           "validation"), caption_justify="left")
    for key, label in (("frozen", "frozen model alone"),
                       ("reprogrammed", f"reprogrammed ({summary['mode']})")):
        t, v = summary["test"][key], summary["validation"][key]
        table.add_row(label, f"{t['psnr']:.2f}", f"{t['ssim']:.4f}", f"{v['psnr']:.2f}")
    return table


__all__ = ["describe_plan", "plan_reprogram", "run_reprogram", "score_table"]
