"""The reprogram kind: `osr-reprogram` trains a small module around a frozen image
restorer so that it handles degradations it never saw (`mergekit_pcb.reprogram`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mergekit_pcb.kinds.base import MethodInfo, RecipeKind, RunOptions
from mergekit_pcb.reprogram import METHOD
from mergekit_pcb.reprogram.config import MODES, PARAMETER_DOCS, Parameters, parse_reprogram_recipe
from mergekit_pcb.reprogram.run import Loaded, describe_plan, plan_reprogram, run_reprogram


class ReprogramKind(RecipeKind):
    name = "reprogram"
    flags = frozenset({"--device", "--threads", "--trust-code"})

    def methods(self) -> list[MethodInfo]:
        params: list[dict[str, Any]] = []
        for field, info in Parameters.model_fields.items():
            choices: list[Any] = []
            if field == "mode":
                choices = list(MODES)
            elif "Literal" in str(info.annotation):
                choices = list(getattr(info.annotation, "__args__", ()))
            params.append({"name": field, "default": info.get_default(call_default_factory=True),
                           "type": str(info.annotation).replace("typing.", ""),
                           "where": "parameters", "choices": choices,
                           "doc": PARAMETER_DOCS[field]})
        for key, doc in (
                ("model", "the frozen restorer: {arch: package.module:factory, arch_kwargs, "
                          "weights: .safetensors} or {hf: Hugging Face model directory}"),
                ("data", "train, validation, test: {degraded: folder, clean: folder} (paired "
                         "by file name) or {tensors: .safetensors}; reference (fda)")):
            params.append({"name": key, "default": None, "type": "mapping", "where": key,
                           "choices": [], "doc": doc})
        return [MethodInfo(METHOD, self.name, "reprogram a frozen image-restoration model for "
                           "degradations it never saw (wave, fourier, fda)", params)]

    def load(self, data: Any, text: str, source: Path) -> Loaded:
        return parse_reprogram_recipe(data, str(source)), text

    def plan(self, recipe: Loaded, source: Path, options: RunOptions) -> dict[str, Any]:
        return plan_reprogram(recipe, source, output=options.output, force=options.force,
                              seed=options.seed)

    def describe(self, plan: dict[str, Any]) -> list[str]:
        return describe_plan(plan)

    def run(self, recipe: Loaded, source: Path, options: RunOptions) -> dict[str, Any]:
        assert options.output is not None
        return run_reprogram(recipe, source, options.output, force=options.force,
                             seed=options.seed, quiet=options.quiet, threads=options.threads,
                             trust_code=options.trust_code, device=options.device)
