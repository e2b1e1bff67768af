"""The merge kind: a recipe of one merge method over checkpoints, run by the streaming
merge engine (`mergekit_pcb.engine`)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from mergekit_pcb.engine import MergePlan, build_plan, run_plan
from mergekit_pcb.engine.card import OutputFiles
from mergekit_pcb.engine.extract import extract_lora
from mergekit_pcb.errors import RecipeError, warn
from mergekit_pcb.io.writer import check_destination
from mergekit_pcb.kinds.base import MethodInfo, RecipeKind, RunOptions
from mergekit_pcb.machine import numeric_environment
from mergekit_pcb.methods import REGISTRY
from mergekit_pcb.recipe.schema import MergeRecipe, parse_recipe

SHOWN_NAMES = 3  # tensor names the text of `validate` shows per rule


class MergeKind(RecipeKind):
    name = "merge"
    flags = frozenset({"--device", "--shard-size", "--threads", "--allow-pickle", "--as-lora"})

    def methods(self) -> list[MethodInfo]:
        return [
            MethodInfo(name, self.name, "; ".join((cls.summary, *cls.rule_docs())), [
                {"name": p.name, "default": p.default, "type": p.kind.__name__,
                 "where": "models[].parameters" if p.per_model else "parameters",
                 "choices": list(p.choices or []), "doc": p.doc}
                for p in cls.params])
            for name, cls in REGISTRY.items()
        ]

    def load(self, data: Any, text: str, source: Path) -> tuple[MergeRecipe, str]:
        return parse_recipe(data, str(source)), text

    def _build(self, recipe: tuple[MergeRecipe, str], options: RunOptions) -> MergePlan:
        parsed, text = recipe
        if not options.allow_crimes:
            check_architectures(parsed)
        return build_plan(parsed, text, seed=options.seed, allow_pickle=options.allow_pickle)

    def plan(self, recipe: tuple[MergeRecipe, str], source: Path, options: RunOptions
             ) -> dict[str, Any]:
        plan = self._build(recipe, options)
        try:
            _say(plan)
            return plan_info(plan)
        finally:
            plan.close()

    def describe(self, plan: dict[str, Any]) -> list[str]:
        slices = f" in {plan['slices']} slice(s)" if plan["slices"] else ""
        lines = [f"recipe OK: {plan['method']} over {len(plan['models'])} model(s){slices}, "
                 f"{plan['tensors']} tensors",
                 f"reads {plan['read_bytes'] / 1e6:.1f} MB in {plan['passes']} pass(es) "
                 f"({', '.join(plan['pass_names'])}), writes "
                 f"{plan['output_bytes'] / 1e6:.1f} MB"]
        for r in plan["rules"]:
            lines.append(f"  {r['rule']}: {r['tensors']} tensors")
            for g in r["groups"]:
                names = g["names"][:SHOWN_NAMES]
                more = ", …" if len(g["names"]) > len(names) else ""
                lines.append(f"    {g['rule']}: {g['tensors']} tensors ({', '.join(names)}{more})")
        post = plan.get("postprocess")
        if post is not None:
            lines += [f"  {line}" for line in post["plan"]]
            for g in post["block_groups"]:
                names = g["names"][:SHOWN_NAMES]
                more = ", …" if len(g["names"]) > len(names) else ""
                lines.append(f"    {g['group']}: {g['tensors']} tensors ({', '.join(names)}{more})")
        return lines

    def run(self, recipe: tuple[MergeRecipe, str], source: Path, options: RunOptions
            ) -> dict[str, Any]:
        assert options.output is not None
        plan = self._build(recipe, options)
        if options.as_lora is not None:
            return self._run_as_lora(plan, options)
        try:
            result = run_plan(plan, options.output, force=options.force,
                              shard_size=options.shard_size, device=options.device,
                              quiet=options.quiet, threads=options.threads,
                              files=OutputFiles(copy_tokenizer=options.copy_tokenizer,
                                                model_card=options.write_model_card))
            # Said once the output is written, so that bad input met during the run still
            # gets its one line alone; `validate` and `--dry-run` say them before any work.
            _say(plan)
        finally:
            plan.close()
        return {
            "kind": self.name, "output": str(result.output), "method": plan.recipe.merge_method,
            "tensors": result.tensors, "shards": result.shards,
            "read_bytes": result.read_bytes, "written_bytes": result.written_bytes,
            "seconds": round(result.seconds, 3),
            "environment": numeric_environment(options.device),
        }


    def _run_as_lora(self, plan: MergePlan, options: RunOptions) -> dict[str, Any]:
        """The merge written beside the output, then its update over the base extracted as
        an adapter into the output (the full merge is removed, whatever happens). The merge
        computes and is written in float32 at least: rounded to a bf16 base's type, a
        low-rank update would gain full-rank rounding noise."""
        assert options.output is not None and options.as_lora is not None
        try:
            base = plan.base_key
            if base is None:
                raise RecipeError("--as-lora: the recipe needs a base_model (the adapter "
                                  "is an update of it)")
            check_destination(options.output, force=options.force, inputs=plan.input_paths())
            for task in plan.tasks:  # the update is not to be rounded to a bf16 base's type
                if task.out_dtype.is_floating_point and task.out_dtype.itemsize < 4:
                    task.out_dtype = torch.float32
                if task.compute_dtype.itemsize < 4:
                    task.compute_dtype = torch.float32
            merged = options.output.parent / f".{options.output.name}.merged-{os.getpid()}"
            result = run_plan(plan, merged, force=False, shard_size=options.shard_size,
                              device=options.device, quiet=options.quiet,
                              threads=options.threads,
                              files=OutputFiles(copy_tokenizer=False, model_card=False))
            _say(plan)
        finally:
            plan.close()
        try:
            extraction = extract_lora(str(merged), base, options.output, rank=options.as_lora,
                                      force=options.force, allow_pickle=options.allow_pickle)
        finally:
            shutil.rmtree(merged, ignore_errors=True)
        return {
            "kind": self.name, "output": str(extraction.output),
            "method": plan.recipe.merge_method, "tensors": result.tensors,
            "read_bytes": result.read_bytes, "seconds": round(result.seconds
                                                              + extraction.seconds, 3),
            "lora": extraction.summary(),
            "environment": numeric_environment(options.device),
        }


def check_architectures(recipe: MergeRecipe) -> None:
    """As mergekit: models whose config.json name different architectures are refused
    unless --allow-crimes; one without `architectures` leaves nothing to compare (mergekit
    then infers it from the tensors). Local models only: a hub id is resolved later."""
    found: dict[str, str] = {}
    for ref in recipe.model_refs():
        config = Path(ref).expanduser() / "config.json"
        try:
            architectures = json.loads(config.read_text()).get("architectures")
        except (OSError, ValueError, AttributeError):
            continue  # not a local model directory, or no readable config: checked later
        if not isinstance(architectures, list) or not architectures:
            return
        found[ref] = str(architectures[0])
    if len(set(found.values())) > 1:
        shown = ", ".join(f"{arch} in {ref}" for ref, arch in found.items())
        raise RecipeError(f"the models mix architectures ({shown}); pass --allow-crimes to "
                          "merge them anyway (as mergekit requires)")


def _say(plan: MergePlan) -> None:
    """The plan's warnings, one line each (see `MergePlan.warnings`)."""
    for line in plan.warnings:
        warn(line)


def plan_info(plan: MergePlan) -> dict[str, Any]:
    recipe = plan.recipe
    return {
        "valid": True,
        "kind": "merge",
        "method": plan.recipe.merge_method,
        "base_model": plan.base_key,
        # the models merged: a `slices:` recipe's are its slices' sources
        "models": list(dict.fromkeys([m.model for m in recipe.models]
                                     + [s.model for sl in recipe.slices for s in sl.sources])),
        "slices": len(recipe.slices),
        "tensors": len(plan.tasks),
        "passes": plan.passes,
        "pass_names": plan.pass_names,
        "read_bytes": plan.read_bytes,
        "output_bytes": plan.write_bytes,
        "seed": plan.seed,
        # per route, its tensors grouped by the method's rule for each (spectral methods:
        # the matrix rule or a fallback), every name listed
        "rules": [{"rule": r.label, "tensors": len(r.tensor_names),
                   "groups": [{"rule": rule, "tensors": len(names), "names": names}
                              for rule, names in plan.rule_groups(r).items()]}
                  for r in plan.routes],
        # the output tokenizer, and per model how many tokens were re-mapped and are new
        "tokenizer": plan.vocab.summary() if plan.vocab is not None else None,
        "warnings": plan.warnings,
        "postprocess": _postprocess_info(plan),
    }


def _postprocess_info(plan: MergePlan) -> dict[str, Any] | None:
    """The `postprocess:` step plan and, with a lines step, each merged tensor's block."""
    post = plan.postprocess
    if post is None:
        return None
    names = [t.name for t in plan.tasks if t.route.kind == "merge"]
    return {
        "steps": [{s.kind: getattr(s, s.kind).model_dump()} for s in post.steps],
        "plan": post.describe(),
        "num_tasks": post.num_tasks,
        "blocks": None if post.layers is None else post.layers.count,
        "block_of": None if post.layers is None else {n: post.layers.blocks.get(n)
                                                       for n in names},
        "block_groups": [{"group": g, "tensors": len(ns), "names": ns}
                         for g, ns in post.block_groups(names).items()],
    }
