"""Time and peak RSS of the LoRA paths at a preset's size (the README's adapter figures).

Builds the preset's base (bf16, as bench_merge's 1B runs) and three LoRA adapters of it in
PEFT's format (rank 16, alpha 16, on q/k/v/o, as the official KnOTS Llama configs), then
measures, each in a fresh process (bench_merge's launcher: wait4's peak RSS):

- `pcbmerge run` with `knots` over the three adapters (global top-k: two statistics
  passes, the SVDs through the factors),
- `pcbmerge run` with `ties` over the same adapters (each read as base + B·A·scale),
- `pcbmerge extract-lora BASE+ADAPTER --base BASE --rank 16` (an SVD per adapted matrix),
- `pcbmerge run` with `knots ... --as-lora 48`.

    python scripts/bench_lora.py --params 1B --work /tmp/lora-bench
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_merge  # a script beside this one, not a package

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def build(shape: bench_merge.ModelShape, root: Path, rank: int, adapters: int) -> Path:
    """The bf16 base and `adapters` seeded LoRA adapters of it under `root`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.heads, vocab_size=shape.vocab,
                         max_position_embeddings=512, tie_word_embeddings=False)
    base_dir = root / "base"
    if not (base_dir / "config.json").is_file():
        torch.manual_seed(0)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(base_dir,
                                                                   max_shard_size="2GB")
    for i in range(adapters):
        out = root / f"adapter{i}"
        if (out / "adapter_model.safetensors").is_file():
            continue
        out.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(100 + i)
        state = {}
        for layer in range(shape.layers):
            for t in TARGETS:
                prefix = f"base_model.model.model.layers.{layer}.self_attn.{t}"
                state[f"{prefix}.lora_A.weight"] = torch.randn(rank, shape.hidden,
                                                               generator=g) * 0.02
                state[f"{prefix}.lora_B.weight"] = torch.randn(shape.hidden, rank,
                                                               generator=g) * 0.02
        save_file(state, str(out / "adapter_model.safetensors"))
        (out / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules":
            list(TARGETS), "base_model_name_or_path": str(base_dir)}))
    return base_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="1B", choices=sorted(bench_merge.PRESETS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/pcbmerge-lora-bench"))
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--runs", default="knots,ties,extract,as-lora",
                        help="which measurements, comma-separated")
    args = parser.parse_args()
    shape = bench_merge.PRESETS[args.params]
    root = args.work
    root.mkdir(parents=True, exist_ok=True)
    base = build(shape, root, args.rank, 3)
    adapters = [root / f"adapter{i}" for i in range(3)]
    recipes = {}
    for method, params in (("knots", {"density": 0.2, "lambda": 0.6}),
                           ("ties", {"density": 0.5})):
        path = root / f"{method}.yaml"
        path.write_text(yaml.safe_dump({
            "merge_method": method, "base_model": str(base),
            "models": [{"adapter": str(a), **({"parameters": params} if method == "ties"
                                               else {})} for a in adapters],
            **({"parameters": params} if method == "knots" else {})}))
        recipes[method] = path
    cli = [sys.executable, "-m", "mergekit_pcb"]
    runs = {
        "knots over 3 adapters": [*cli, "run", str(recipes["knots"]), "-o",
                                  str(root / "out-knots"), "--force", "--quiet"],
        "ties over 3 adapters": [*cli, "run", str(recipes["ties"]), "-o",
                                 str(root / "out-ties"), "--force", "--quiet"],
        f"extract-lora --rank {args.rank}": [
            *cli, "extract-lora", f"{base}+{adapters[0]}", "--base", str(base), "--rank",
            str(args.rank), "-o", str(root / "out-extract"), "--force"],
        "knots --as-lora 48": [*cli, "run", str(recipes["knots"]), "-o",
                               str(root / "out-as-lora"), "--force", "--quiet",
                               "--as-lora", "48"],
    }
    keys = dict(zip(runs, ("knots", "ties", "extract", "as-lora"), strict=True))
    wanted = set(args.runs.split(","))
    results = {}
    for label, cmd in runs.items():
        if keys[label] not in wanted:
            continue
        r = bench_merge.run_measured(cmd, root / f"{label.split()[0]}.log", args.timeout, {})
        results[label] = {"wall_s": round(r.wall_s, 1), "peak_rss_mb": round(r.peak_rss_mb)}
        print(f"{label}: {r.wall_s:.1f} s, peak RSS {r.peak_rss_mb:.0f} MB", flush=True)
    report = root / "out-extract" / "lora_extraction.json"
    if report.is_file():
        data = json.loads(report.read_text())
        results["extract max relative error"] = data["max_relative_error"]
    print(json.dumps({"preset": args.params, "rank": args.rank, "results": results}))


if __name__ == "__main__":
    main()
