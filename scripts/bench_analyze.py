"""Peak memory and wall time of `pcbmerge analyze` beside a plain `pcbmerge run` of the same
recipe, on `scripts/bench_merge.py`'s synthetic Llama checkpoints.

    python scripts/bench_analyze.py --params 120M
    python scripts/bench_analyze.py --params 1B --save-dtype bf16 --methods ties

Each command runs as a child process through bench_merge's launcher (wall time and the
child's own peak RSS from `os.wait4`), in the order: run, analyze (merge in memory and all
the spectral figures), analyze --no-spectral, analyze --no-merge --no-spectral.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_merge import (  # a sibling script, not a package
    PRESETS,
    RECIPES,
    build_checkpoints,
    ours_command,
    run_measured,
    write_recipe,
)

VARIANTS: list[tuple[str, list[str]]] = [
    ("analyze", []),
    ("analyze --no-spectral", ["--no-spectral"]),
    ("analyze --no-merge --no-spectral", ["--no-merge", "--no-spectral"]),
]


def analyze_command(recipe: Path, report: Path, flags: list[str]) -> list[str]:
    run = ours_command(recipe, report)  # [pcbmerge, run, RECIPE, -o, OUT, --force, --quiet]
    return [*run[: run.index("run")], "analyze", str(recipe), "-o", str(report), "--quiet",
            *flags]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", choices=sorted(PRESETS), default="120M")
    parser.add_argument("--methods", default="ties,pcb")
    parser.add_argument("--save-dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--variants", default=",".join(label for label, _ in VARIANTS),
                        help="comma-separated analyze variants to time (default: all)")
    args = parser.parse_args(argv)
    chosen = args.variants.split(",")
    unknown = [v for v in chosen if v not in dict(VARIANTS)]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; known: {[v for v, _ in VARIANTS]}")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-analyze-"))
    shape = PRESETS[args.params]
    models = workdir / "models"
    # bench_merge's checkpoints, reused when a kept work dir already holds them.
    base, tuned = build_checkpoints(shape, models, "500MB", 0, 0.005, args.save_dtype)
    print(f"| {args.params} ({shape.param_count() / 1e6:.0f}M parameters, {args.save_dtype}) "
          "| wall (s) | peak RSS (MB) |\n|---|---|---|", flush=True)
    for method in args.methods.split(","):
        recipe = write_recipe(RECIPES[method](base, tuned), workdir)
        result = run_measured(ours_command(recipe, workdir / "out"), workdir / "run.log",
                              args.timeout, {})
        print(f"| `pcbmerge run` {method} | {result.wall_s:.1f} | {result.peak_rss_mb:.0f} |",
              flush=True)
        for label, flags in (v for v in VARIANTS if v[0] in chosen):
            result = run_measured(analyze_command(recipe, workdir / f"report-{method}", flags),
                                  workdir / "analyze.log", args.timeout, {})
            print(f"| `pcbmerge {label}` {method} | {result.wall_s:.1f} | "
                  f"{result.peak_rss_mb:.0f} |", flush=True)


if __name__ == "__main__":
    main()
