"""osr-reprogram against its baselines, on degradations no global transform inverts.

    python scripts/bench_osr.py                        # see the time below
    python scripts/bench_osr.py --degradations haze --seeds 0   # one degradation, one seed

Time: the published table (4 degradations, 9 methods, 3 seeds, up to 1000 steps) took
35 minutes of one torch thread from an empty cache, with another job on the machine's
second core, plus about 2.5 minutes for the restorer; a rerun reads the cache in seconds.

The frozen restorer is the demo's residual CNN (`mergekit_pcb.reprogram.demo.restorer`:
5 convolutions of width 32), trained here on blind Gaussian denoising (σ in [0, 0.2]) on
48 px crops of the training photographs; its own-task PSNR (σ = 0.1) is reported. The
degradations (`mergekit_pcb.reprogram.degradations`) draw their parameters per image:
spatially varying haze, noisy low light, noisy motion blur, JPEG, a mixture. 48×48
patches come from disjoint photographs: every method fits on the training ones, selects
(early stopping, fda's β, the global fit's family) on the validation ones and is scored on
the held-out ones. Methods, all with the same data, budget and selection:

- identity; the frozen model alone; the best global fit (affine, gain·x^γ or a 5×5
  linear filter, fitted on train, chosen on validation);
- `osr-reprogram` in each mode (wave, fourier, fda);
- the wave module with the frozen model replaced by the identity; a residual CNN with the
  wave module's number of trainable parameters, from scratch; fine-tuning the restorer.

Trained methods run once per seed (module initialisation and crops); the table gives the
mean and the range. The last columns are the frozen model's PSNR on its own task after
each method: reprogramming leaves it unchanged (its weights' SHA-256 is checked),
fine-tuning does not. The trained restorer and every (degradation, method, seed) result
are cached under --cache (default .bench/osr), so a rerun or a resumed run is fast.
Prints markdown tables and rewrites the generated part of docs/benchmarks/reprogramming.md
(between its markers) unless --no-write.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from osr_baselines import (  # noqa: E402
    FITS,
    IDENTITY,
    FineTune,
    GlobalFit,
    same_size_cnn,
    trainable_count,
)

from mergekit_pcb.reprogram.config import Parameters  # noqa: E402
from mergekit_pcb.reprogram.data import PairSet  # noqa: E402
from mergekit_pcb.reprogram.demo import (  # noqa: E402
    DEGRADATIONS,
    RESTORER_KWARGS,
    RESTORER_SIGMA,
    RESTORER_STEPS,
    TEST_IMAGES,
    TRAIN_IMAGES,
    TRAIN_SIGMA,
    VALIDATION_IMAGES,
    add_noise,
    degrade,
    patches,
    restorer,
)
from mergekit_pcb.reprogram.frozen import FrozenModel, weights_sha256  # noqa: E402
from mergekit_pcb.reprogram.modules import (  # noqa: E402
    FDAModule,
    FourierModule,
    ReprogramModule,
    WaveModule,
    mean_amplitude,
)
from mergekit_pcb.reprogram.train import choose_beta, evaluate, train_module  # noqa: E402

PAGE = REPO / "docs" / "benchmarks" / "reprogramming.md"
BEGIN, END = "<!-- bench_osr: begin -->", "<!-- bench_osr: end -->"
PATCH = 48
BETAS = [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4]
# (column title, learning rate or None): trained methods use train_module's loop
METHODS: dict[str, tuple[str, float | None]] = {
    "identity": ("identity", None),
    "frozen": ("frozen model alone", None),
    "global": ("best global fit", None),
    "wave": ("OSR wave", 2e-3),
    "fourier": ("OSR fourier", 2e-2),
    "fda": ("OSR fda", None),
    "wave-identity": ("wave module, f = identity", 2e-3),
    "cnn": ("CNN of the same size", 2e-3),
    "finetune": ("fine-tuning f", 1e-3),
}
TRAINED = ("wave", "fourier", "wave-identity", "cnn", "finetune")
REPROGRAM = ("wave", "fourier", "fda")
BASELINES = ("identity", "frozen", "global", "wave-identity", "cnn", "finetune")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pairs(degraded: torch.Tensor, clean: torch.Tensor) -> PairSet:
    return PairSet([f"{i:05d}" for i in range(len(clean))], list(degraded), list(clean))


def digest(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Cache:
    """One JSON file per (degradation, method, seed, settings, data, restorer)."""

    def __init__(self, root: Path) -> None:
        self.root = root / "rows"
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: dict[str, Any]) -> Path:
        name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
        return self.root / f"{key['degradation']}-{key['method']}-{key.get('seed', 0)}-{name}.json"

    def get(self, key: dict[str, Any]) -> dict[str, Any] | None:
        p = self.path(key)
        return json.loads(p.read_text()) if p.is_file() else None

    def put(self, key: dict[str, Any], value: dict[str, Any]) -> None:
        p = self.path(key)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps({**value, "key": key}, indent=1))
        tmp.replace(p)


def run_method(method: str, seed: int, frozen: FrozenModel, split: dict[str, PairSet],
               own: PairSet, args: argparse.Namespace) -> dict[str, Any]:
    """Fit `method` on train, select on validation, score on test; the frozen model's
    own-task score afterwards."""
    start = time.perf_counter()
    out: dict[str, Any] = {}
    if method in ("identity", "frozen"):
        model = IDENTITY if method == "identity" else frozen
        s = evaluate(None, model, split["test"])
        out.update(psnr=s.psnr, ssim=s.ssim, chosen="", params=0)
    elif method == "global":
        fits = {k: fit(split["train"].degraded, split["train"].clean) for k, fit in FITS.items()}
        scored = {k: evaluate(None, as_frozen(f), split["validation"]).psnr
                  for k, f in fits.items()}
        best = max(scored, key=lambda k: scored[k])
        s = evaluate(None, as_frozen(fits[best]), split["test"])
        out.update(psnr=s.psnr, ssim=s.ssim, chosen=fits[best].describe(),
                   params=sum(p.numel() for p in fits[best].buffers()),
                   validation={k: round(v, 3) for k, v in scored.items()})
    else:
        module = build(method, seed, frozen)
        f = IDENTITY if method == "wave-identity" else frozen
        if isinstance(module, FDAModule):
            module.reference.copy_(mean_amplitude(split["train"].clean, 64))
            r = choose_beta(module, f, split["validation"], BETAS)
            out["chosen"] = f"β = {r.beta:g}"
        else:
            params = Parameters(mode="wave", steps=args.steps, batch_size=8, crop=32,
                                lr=METHODS[method][1], eval_every=args.eval_every,
                                patience=args.patience)
            r = train_module(module, f, split["train"], split["validation"], params, seed)
            out["chosen"] = f"step {r.best_step}/{r.steps_run}"
        s = evaluate(module, f, split["test"])
        out.update(psnr=s.psnr, ssim=s.ssim, params=trainable_count(module))
        if isinstance(module, FineTune):
            tuned = FrozenModel(module.net, "", "fine-tuned")
            out["own_task"] = evaluate(None, tuned, own).psnr
        if method in REPROGRAM:
            if weights_sha256(frozen.module) != frozen.sha256:
                raise RuntimeError("the frozen model's weights changed")
            out["own_task"] = evaluate(None, frozen, own).psnr
    out["seconds"] = time.perf_counter() - start
    return out


def as_frozen(fit: GlobalFit) -> FrozenModel:
    return FrozenModel(fit, "", fit.kind)


def build(method: str, seed: int, frozen: FrozenModel) -> ReprogramModule:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if method in ("wave", "wave-identity"):
            return WaveModule(3, 16)
        if method == "fourier":
            return FourierModule(3, 16)
        if method == "fda":
            return FDAModule(3, 64)
        if method == "cnn":
            return same_size_cnn(WaveModule(3, 16))
        return FineTune(frozen.module)


# ---- tables ---------------------------------------------------------------------------------

def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    values = [r["psnr"] for r in rows]
    return {"mean": sum(values) / len(values), "lo": min(values), "hi": max(values),
            "ssim": sum(r["ssim"] for r in rows) / len(rows), "n": len(values)}


def cell(s: dict[str, float], bold: bool = False) -> str:
    text = f"{s['mean']:.2f}"
    if s["n"] > 1:
        text += f" ({s['lo']:.2f}–{s['hi']:.2f})"
    return f"**{text}**" if bold else text


def tables(results: dict[str, dict[str, list[dict[str, Any]]]], own: dict[str, float]
           ) -> tuple[str, str, list[str]]:
    methods = [m for m in METHODS if any(m in r for r in results.values())]
    head = "| degradation | " + " | ".join(METHODS[m][0] for m in methods) + " |"
    lines = [head, "|---|" + "---:|" * len(methods)]
    verdicts = []
    for kind, res in results.items():
        stats = {m: summarize(res[m]) for m in methods if m in res}
        top = max(s["mean"] for s in stats.values())
        lines.append(f"| {kind} | " + " | ".join(
            cell(stats[m], stats[m]["mean"] == top) if m in stats else "—" for m in methods)
            + " |")
        verdicts.append(verdict(kind, stats))
    detail = ["| degradation | method | test PSNR, mean (range) | test SSIM | trainable "
              "parameters | selected on validation | f's own-task PSNR after | seconds |",
              "|---|---|---:|---:|---:|---|---:|---:|"]
    for kind, res in results.items():
        for m in methods:
            if m not in res:
                continue
            rows, s = res[m], summarize(res[m])
            chosen = "; ".join(sorted({str(r.get("chosen", "")) for r in rows} - {""}))
            owns = [r["own_task"] for r in rows if "own_task" in r]
            own_text = (f"{sum(owns) / len(owns):.2f}" if owns else
                        f"{own['frozen']:.2f} (f not used)" if m in ("wave-identity", "cnn",
                                                                     "global", "identity")
                        else f"{own['frozen']:.2f}")
            secs = sum(r["seconds"] for r in rows) / len(rows)
            detail.append(f"| {kind} | {METHODS[m][0]} | {cell(s)} | {s['ssim']:.3f} | "
                          f"{rows[0]['params']:,} | {chosen or '—'} | {own_text} | "
                          f"{secs:.1f} |")
    return "\n".join(lines), "\n".join(detail), verdicts


def verdict(kind: str, stats: dict[str, dict[str, float]]) -> str:
    ours = {m: stats[m] for m in REPROGRAM if m in stats}
    base = {m: stats[m] for m in BASELINES if m in stats}
    if not ours or not base:
        return f"{kind}: not every method ran"
    best_m = max(ours, key=lambda m: ours[m]["mean"])
    best_b = max(base, key=lambda m: base[m]["mean"])
    o, b = ours[best_m], base[best_b]
    name_o, name_b = METHODS[best_m][0], METHODS[best_b][0]
    if o["mean"] > b["mean"]:
        margin = ("every seed above every baseline seed" if o["lo"] > b["hi"]
                  else "but the seed ranges overlap")
        return (f"**{kind}**: reprogramming wins: {name_o} {o['mean']:.2f} dB against the best "
                f"baseline, {name_b}, {b['mean']:.2f} dB ({o['mean'] - b['mean']:+.2f} dB; "
                f"{margin}).")
    return (f"**{kind}**: reprogramming does not win: the best baseline, {name_b}, "
            f"{b['mean']:.2f} dB, beats the best mode, {name_o}, {o['mean']:.2f} dB "
            f"({o['mean'] - b['mean']:+.2f} dB).")


def write_page(text: str) -> None:
    page = PAGE.read_text()
    if BEGIN not in page or END not in page:
        raise SystemExit(f"{PAGE}: no {BEGIN} ... {END} markers to replace")
    head, rest = page.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    PAGE.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


# ---- main -----------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--degradations", default="haze,lowlight,motion,jpeg",
                    help=f"comma-separated, of {', '.join(DEGRADATIONS)}")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=1000, help="training steps (8 crops of 32 px)")
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--patience", type=int, default=10,
                    help="validation checks without improvement before a run stops")
    ap.add_argument("--restorer-steps", type=int, default=RESTORER_STEPS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", type=Path, default=REPO / ".bench" / "osr")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite the docs page")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kinds = args.degradations.split(",")
    methods = args.methods.split(",")
    for k in kinds:
        if k not in DEGRADATIONS:
            ap.error(f"--degradations: unknown {k!r} (known: {', '.join(DEGRADATIONS)})")
    for m in methods:
        if m not in METHODS:
            ap.error(f"--methods: unknown {m!r} (known: {', '.join(METHODS)})")
    seeds = [int(s) for s in args.seeds.split(",")]
    t0 = time.perf_counter()
    clean = {"train": patches(TRAIN_IMAGES, PATCH, 10_000, 0),
             "validation": patches(VALIDATION_IMAGES, PATCH, 10_000, 1),
             "test": patches(TEST_IMAGES, PATCH, 10_000, 2)}
    log(f"patches ({PATCH} px): train {len(clean['train'])}, validation "
        f"{len(clean['validation'])}, test {len(clean['test'])}")
    t1 = time.perf_counter()
    model = restorer(clean["train"], args.cache / "restorer.safetensors",
                     steps=args.restorer_steps)
    model.requires_grad_(False)
    frozen = FrozenModel(model, weights_sha256(model), "restorer")
    own_noisy = add_noise(clean["test"], TRAIN_SIGMA, torch.Generator().manual_seed(7))
    own = pairs(own_noisy, clean["test"])
    own_scores = {"identity": evaluate(None, IDENTITY, own).psnr,
                  "frozen": evaluate(None, frozen, own).psnr}
    size = sum(p.numel() for p in model.parameters())
    log(f"restorer ({size:,} parameters) ready in "
        f"{time.perf_counter() - t1:.0f}s; own task (σ = {TRAIN_SIGMA} noise, test): "
        f"{own_scores['identity']:.2f} -> {own_scores['frozen']:.2f} dB")
    cache = Cache(args.cache)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    computed = 0.0
    for kind in kinds:
        k_index = list(DEGRADATIONS).index(kind)
        split = {}
        for i, (name, c) in enumerate(clean.items()):
            s = degrade(c, kind, 1000 * (k_index + 1) + i)
            split[name] = pairs(s.degraded, s.clean)
        data_id = digest(*(torch.stack(split[n].degraded) for n in split), *clean.values())
        results[kind] = {}
        for method in methods:
            for seed in (seeds if method in TRAINED else [0]):
                key = {"degradation": kind, "method": method, "seed": seed, "data": data_id,
                       "restorer": frozen.sha256[:16], "steps": args.steps,
                       "eval_every": args.eval_every, "patience": args.patience,
                       "lr": METHODS[method][1]}
                row = cache.get(key)
                if row is None:
                    row = run_method(method, seed, frozen, split, own, args)
                    cache.put(key, row)
                    computed += row["seconds"]
                    tag = f"{row['seconds']:.1f}s"
                else:
                    tag = "cached"
                results[kind].setdefault(method, []).append(row)
                log(f"{kind:9s} {method:14s} seed {seed}: {row['psnr']:6.2f} dB "
                    f"({row.get('chosen') or '-'}; {tag}; total "
                    f"{time.perf_counter() - t0:.0f}s)")
    wide, detail, verdicts = tables(results, own_scores)
    wall = time.perf_counter() - t0
    every_row = sum(r["seconds"] for res in results.values() for rows in res.values()
                    for r in rows)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = (f"{platform.machine()}, {os.cpu_count()} cores shared with other jobs, "
               f"{args.threads} torch thread(s), torch {torch.__version__}")
    text = "\n".join([
        f"Run {when} on {machine}. Wall time {wall / 60:.1f} min (this run; rows computed in "
        f"it: {computed / 60:.1f} min, the rest read from the cache; computing every row "
        f"took {every_row / 60:.1f} min, restorer training aside). Seeds "
        f"{', '.join(map(str, seeds))}; {args.steps} steps of 8 crops of 32 px; patches "
        f"{len(clean['train'])} train / {len(clean['validation'])} validation / "
        f"{len(clean['test'])} held-out, {PATCH} px.",
        "",
        f"Frozen restorer: `tiny_denoiser(**{RESTORER_KWARGS})`, {size:,} "
        f"parameters, {args.restorer_steps} steps of blind Gaussian denoising σ ∈ "
        f"{list(RESTORER_SIGMA)}. Own task (held-out patches, σ = {TRAIN_SIGMA}): noisy "
        f"{own_scores['identity']:.2f} dB, restored {own_scores['frozen']:.2f} dB.",
        "",
        "Held-out PSNR (dB), mean over seeds (range); the best of each row in bold:",
        "", wide, "", *[f"- {v}" for v in verdicts], "",
        "Every row, with SSIM, the size of what is trained, what validation selected, and "
        "the frozen model's own-task PSNR after the method (reprogramming leaves f's weights "
        "bit for bit unchanged; fine-tuning changes them):", "", detail])
    print(text)
    if not args.no_write:
        write_page(text)
        log(f"wrote {PAGE.relative_to(REPO)}")
    log(f"wall time {wall:.0f}s")


if __name__ == "__main__":
    main()
