"""FusionBench's half of `scripts/fusionbench_parity.py`: run inside FusionBench's venv.

    <fusionbench-venv>/bin/python scripts/fusionbench_side.py JOB.json

It imports nothing from mergekit_pcb (that venv does not have it): it reads the job that
`fusionbench_parity.py` wrote, loads each family's base and fine-tuned state dicts
(safetensors), takes the task vectors Δᵢ = Wᵢ − W₀, and calls FusionBench's own lowest-level
function for each run on them, the one its algorithm class calls between loading the models
and adding the result to the base:

- `tsv_m`: `compute_and_sum_svd_mem_reduction` (task_singular_vector/utils/TSVM_utils.py),
  output W₀ + alpha·merged (TaskSingularVectorMerging.run with a float alpha);
- `iso_c`: `iso_c`, `iso_cts`: `iso_cts` (isotropic_merging/iso_utils.py), output
  W₀ + scaling_factor·merged (ISO_C_Merge / ISO_CTS_Merge.run);
- `wudi`: `wudi_merging` (wudi/wudi.py), output W₀ + merged (WUDIMerging.run).

Each run's output goes to `<out>/model.safetensors`; `versions.json` beside the job records
FusionBench's and torch's versions and the files the functions came from.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

StateDict = dict[str, torch.Tensor]


def functions() -> dict[str, Callable[..., StateDict]]:
    """FusionBench's functions by our method name (imported here: they pull in all of
    fusion_bench, which only this venv has)."""
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (
        compute_and_sum_svd_mem_reduction,
    )
    from fusion_bench.method.wudi.wudi import wudi_merging

    return {"tsv_m": compute_and_sum_svd_mem_reduction, "iso_c": iso_c, "iso_cts": iso_cts,
            "wudi": wudi_merging}


def merged(fn: Callable[..., StateDict], base: StateDict, task_vectors: list[StateDict],
           kwargs: dict[str, Any], scale: float) -> StateDict:
    # Fresh copies per run: the functions move tensors with `.to(accelerator)`, which on
    # the CPU returns the input itself, so no run may see another's in-place work.
    tvs = [{k: v.clone() for k, v in tv.items()} for tv in task_vectors]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        out = fn(tvs, accelerator="cpu", **kwargs)
    # wudi_merging returns nn.Parameters for the matrices it optimised
    return {k: (base[k] + scale * out[k].detach()).contiguous() for k in base}


def main(job_path: Path) -> int:
    job = json.loads(job_path.read_text())
    torch.set_num_threads(int(job.get("threads", 1)))
    fns = functions()
    families: dict[str, tuple[StateDict, list[StateDict]]] = {}
    for name, paths in job["families"].items():
        base = load_file(paths["base"])
        models = [load_file(p) for p in paths["models"]]
        families[name] = (base, [{k: m[k] - base[k] for k in base} for m in models])
    for run in job["runs"]:
        base, tvs = families[run["family"]]
        out = merged(fns[run["method"]], base, tvs, run["kwargs"], float(run["scale"]))
        Path(run["out"]).mkdir(parents=True, exist_ok=True)
        save_file(out, str(Path(run["out"]) / "model.safetensors"))
    import fusion_bench

    root = Path(fusion_bench.__file__).resolve().parent
    # the module's file: `iso_cts` is wrapped by torch.no_grad, whose own file inspect finds
    sources = {k: str(Path(sys.modules[f.__module__].__file__ or "?").resolve()
                      .relative_to(root.parent)) for k, f in fns.items()}
    versions = {"fusion_bench": importlib.metadata.version("fusion-bench"),
                "torch": torch.__version__, "functions": {
                    k: f"{f.__module__}.{f.__name__} ({sources[k]})" for k, f in fns.items()}}
    (job_path.parent / "versions.json").write_text(json.dumps(versions, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
