"""A tiny MLP population on disk for the search tests: a base, fine-tuned-like copies, a
3-class task with select/report splits, and the module that scores it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def write_mlp_population(root: Path, n: int, module: str, module_text: str,
                         shared: float = 0.0) -> Path:
    """`n` copies of a seeded 6-12-3 MLP, each moved by 0.3 × its own noise and, when
    `shared`, by `shared` × one direction common to all; `module`.py holds `module_text`."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(module_text)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.ReLU(), torch.nn.Linear(12, 3))
    base = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    (root / "base").mkdir()
    save_file(base, str(root / "base" / "model.safetensors"))
    direction = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(7))
                 for k, v in base.items()}
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        tuned = {k: ((v + shared * direction[k]) if shared else v)
                 + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        (root / f"m{i}").mkdir()
        save_file({k: t.contiguous() for k, t in tuned.items()},
                  str(root / f"m{i}" / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(240, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.3).long()
    np.savez(root / "select.npz", inputs=x[:120].numpy(), labels=y[:120].numpy())
    np.savez(root / "report.npz", inputs=x[120:].numpy(), labels=y[120:].numpy())
    return root
