"""`pcbmerge analyze`: each statistic against a hand-computed case or a float64 dense
reference written here from the definitions (numpy, not the package's code)."""

from __future__ import annotations

import base64
import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from browser import Browser, find_chromium
from conftest import (
    finetune_like,
    run_cli,
    save_hf,
    tiny_model,
    write_recipe,
    write_tokenizer_files,
)
from dense_reference import ref_trim
from test_end_to_end import load_state

from mergekit_pcb.analysis import metrics
from mergekit_pcb.analysis.metrics import (
    cosine_from_gram,
    effective_rank,
    gram,
    iso_rank,
    norm_ratio,
    projected_energy,
    sign_counts,
    singular_interference,
    tensor_stats,
    trimmed,
)
from mergekit_pcb.engine import merge_recipe_file

# --- hand-computed cases ------------------------------------------------------------------

HAND = [torch.tensor([3.0, -1.0, 0.0, 2.0]), torch.tensor([-2.0, 1.0, 0.0, 5.0]),
        torch.tensor([1.0, 0.0, 4.0, -6.0])]


def test_trim_keeps_each_tasks_top_magnitudes() -> None:
    kept = trimmed(HAND, [0.5, 0.5, 0.5])
    assert [k.tolist() for k in kept] == [[3, 0, 0, 2], [-2, 0, 0, 5], [0, 0, 4, -6]]


def test_sign_counts_by_hand() -> None:
    # entry 0: +3 and −2 (conflict, 2 tasks); entry 1: nobody; entry 2: task 3 alone;
    # entry 3: +2, +5, −6 (conflict, 3 tasks). Sums elect + everywhere.
    counts = sign_counts(trimmed(HAND, [0.5] * 3))
    assert counts.used_by == [1, 1, 1, 1]
    assert counts.conflicts == 2 and counts.overlap == 2
    assert counts.kept == [2, 2, 2]
    assert counts.elected == [2, 1, 1]
    # weight 2 on task 2: entry 0 sums 3 − 4 < 0 and elects −, which task 2 holds
    weighted = sign_counts(trimmed(HAND, [0.5] * 3), [1.0, 2.0, 1.0])
    assert weighted.elected == [1, 2, 1]


def test_cosine_and_norm_ratio_by_hand() -> None:
    g = gram([torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0]), torch.zeros(2)])
    assert g.tolist() == [[1, 1, 0], [1, 2, 0], [0, 0, 0]]
    cos = cosine_from_gram(g)
    assert cos[0, 1].item() == pytest.approx(1 / math.sqrt(2))
    assert cos[2].tolist() == [0, 0, 0]  # a zero task vector: no direction, cosine 0
    assert norm_ratio([1.0, 5.0, 2.0]) == 5.0
    assert norm_ratio([0.0, 1.0]) is None


def test_effective_rank_by_hand() -> None:
    # p = (3/4, 1/4): H = −(¾ ln ¾ + ¼ ln ¼)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert effective_rank(torch.tensor([3.0, 1.0])) == pytest.approx(math.exp(h))
    assert effective_rank(torch.ones(7)) == pytest.approx(7.0)
    assert effective_rank(torch.zeros(3)) == 0.0


def test_interference_by_hand() -> None:
    e1, e2 = torch.eye(3, dtype=torch.float64)[0], torch.eye(3, dtype=torch.float64)[1]
    apart = [torch.linalg.svd(2 * torch.outer(e1, e1)), torch.linalg.svd(3 * torch.outer(e2, e2))]
    assert singular_interference(apart, k=1) == (pytest.approx(0.0), pytest.approx(5.0))
    # the same direction twice: (UᵀU − I) = ±[[0,1],[1,0]], likewise V: |M| sums to 2 + 3
    same = [torch.linalg.svd(2 * torch.outer(e1, e1)), torch.linalg.svd(3 * torch.outer(e1, e1))]
    assert singular_interference(same, k=1)[0] == pytest.approx(5.0)


def test_iso_alignment_by_hand() -> None:
    s = torch.tensor([5.0, 1.0, 0.0])
    assert iso_rank(s) == 2  # 1/26 of the energy left outside the top 1 is over 0.05² = 1/400
    assert iso_rank(torch.tensor([10.0, 0.1, 0.0])) == 1
    assert iso_rank(torch.zeros(3)) == 0
    tau = torch.tensor([[1.0, 2.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 4.0]])
    u = torch.eye(3)[:, :1]
    assert projected_energy(u, tau) == pytest.approx(5.0)  # row 0: 1 + 4, of 30 in all


# --- float64 dense references -------------------------------------------------------------

def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).numpy()


def _ref_keep(tau: np.ndarray, density: float) -> np.ndarray:
    """Where the sort-based reference trim (every tie at the cut kept) keeps τ."""
    kept = ref_trim(tau.reshape(-1).tolist(), density, torch.float64, keep_ties=True)
    return (np.array(kept) != 0).reshape(tau.shape)


def _ref_sti(mats: list[np.ndarray]) -> float:
    r = min(mats[0].shape)
    k = max(1, r // len(mats))
    us, ss, vs = [], [], []
    for m in mats:
        u, s, vh = np.linalg.svd(m, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    u, s, v = np.hstack(us), np.concatenate(ss), np.hstack(vs)
    eye = np.eye(u.shape[1])
    return float(np.abs((u.T @ u - eye) @ np.diag(s) @ (v.T @ v - eye)).sum())


@pytest.fixture
def random_deltas() -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(12, 9, generator=g, dtype=torch.float64)
    shared = torch.randn(12, 9, generator=g, dtype=torch.float64)
    deltas = [0.5 * shared + torch.randn(12, 9, generator=g, dtype=torch.float64) * s
              for s in (0.3, 1.0, 2.5)]
    return base, deltas


@pytest.mark.parametrize("slice_size", [metrics.SLICE, 7])  # slices crossing the entries
def test_tensor_stats_against_dense(random_deltas: tuple[torch.Tensor, list[torch.Tensor]],
                                    monkeypatch: pytest.MonkeyPatch, slice_size: int) -> None:
    monkeypatch.setattr(metrics, "SLICE", slice_size)
    base, deltas = random_deltas
    densities = [0.3, 0.5, 0.2]
    st = tensor_stats("w", base, deltas, densities, weights=[1.0, 0.5, 2.0])
    taus = [_np(d) for d in deltas]
    norms = [np.linalg.norm(t) for t in taus]
    np.testing.assert_allclose(np.sqrt(st.norm2), norms, rtol=1e-12)
    cos = cosine_from_gram(st.gram).numpy()
    for i in range(3):
        for j in range(3):
            ref = float((taus[i] * taus[j]).sum() / (norms[i] * norms[j]))
            assert cos[i, j] == pytest.approx(ref, rel=1e-12)
    keeps = [_ref_keep(t, d) for t, d in zip(taus, densities, strict=True)]
    used = sum(k.astype(int) for k in keeps)
    pos = sum((k & (t > 0)).astype(int) for k, t in zip(keeps, taus, strict=True))
    neg = sum((k & (t < 0)).astype(int) for k, t in zip(keeps, taus, strict=True))
    assert st.signs.used_by == [int((used == k).sum()) for k in range(4)]
    assert st.signs.conflicts == int(((pos > 0) & (neg > 0)).sum())
    assert st.signs.kept == [int(k.sum()) for k in keeps]
    total = sum(w * np.where(k, t, 0) for w, k, t in zip([1.0, 0.5, 2.0], keeps, taus,
                                                         strict=True))
    gamma = np.where(total >= 0, 1, -1)
    assert st.signs.elected == [int((k & (np.sign(t) == gamma)).sum())
                                for k, t in zip(keeps, taus, strict=True)]
    for i, t in enumerate(taus):
        s = np.linalg.svd(t, compute_uv=False)
        p = s / s.sum()
        assert st.effective_rank is not None
        assert st.effective_rank[i] == pytest.approx(math.exp(-(p * np.log(p)).sum()),
                                                     rel=1e-10)
    assert st.interference == pytest.approx(_ref_sti(taus), rel=1e-9)
    assert st.base_norm2 == pytest.approx(float((_np(base) ** 2).sum()), rel=1e-12)


def test_after_merge_against_dense(random_deltas: tuple[torch.Tensor, list[torch.Tensor]]
                                   ) -> None:
    base, deltas = random_deltas
    st = tensor_stats("w", base, deltas, [0.3] * 3)
    merged = sum(deltas) / 3  # a merged update: the mean
    metrics.after_merge(st, merged, deltas)
    m = _np(merged)
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    energy = s ** 2
    k = next(k for k in range(1, len(s) + 1) if energy[k:].sum() <= 0.05 ** 2 * energy.sum())
    assert st.iso_rank == k
    assert st.aligned_energy is not None and st.distance2 is not None
    for i, d in enumerate(deltas):
        t = _np(d)
        assert st.aligned_energy[i] == pytest.approx(float(((u[:, :k].T @ t) ** 2).sum()),
                                                     rel=1e-10)
        assert st.distance2[i] == pytest.approx(float(((m - t) ** 2).sum()), rel=1e-12)
    assert st.merged_norm2 == pytest.approx(float((m ** 2).sum()), rel=1e-12)


def test_one_dimensional_tensors_get_no_spectral_figures() -> None:
    st = tensor_stats("b", torch.zeros(5), [torch.ones(5), -torch.ones(5)], [1.0, 1.0])
    assert st.effective_rank is None and st.interference is None
    assert st.signs.conflicts == 5 and st.signs.used_by == [0, 0, 5]


# --- the command, end to end on a tiny model ----------------------------------------------

@pytest.fixture(scope="module")
def three_tasks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A tiny llama base and three fine-tunes, the third moved 6× further than the others
    (built once for the module: the tests only read them)."""
    tmp_path = tmp_path_factory.mktemp("three-tasks")
    base = tiny_model("llama", seed=0)
    base_dir = save_hf(base, tmp_path / "base")
    write_tokenizer_files(base_dir)
    tuned = [save_hf(finetune_like(base, seed=10 + i, scale=s), tmp_path / f"ft{i}")
             for i, s in enumerate((0.02, 0.02, 0.12))]
    return base_dir, tuned


def _recipe(tmp_path: Path, base: Path, tuned: list[Path], method: str = "ties",
            name: str = "r.yaml", **params: object) -> Path:
    per_model = {"weight": 1.0, "density": 0.5} if method == "ties" else {}
    recipe = {"merge_method": method, "base_model": str(base),
              "models": [{"model": str(t), "parameters": per_model} for t in tuned],
              "dtype": "float32"}
    if params:
        recipe["parameters"] = params
    return write_recipe(tmp_path / name, recipe)


def _analyze(*args: str | Path) -> dict:
    proc = run_cli("analyze", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _taus(base: dict[str, torch.Tensor], tuned: list[dict[str, torch.Tensor]],
          names: list[str]) -> list[np.ndarray]:
    """Each task's concatenated task vector over `names`, float64 (τ taken in float32, as
    stored)."""
    return [np.concatenate([_np(t[n] - base[n]).reshape(-1) for n in names]) for t in tuned]


def test_analyze_json_against_dense(three_tasks: tuple[Path, list[Path]],
                                    tmp_path: Path) -> None:
    base_dir, tuned_dirs = three_tasks
    recipe = _recipe(tmp_path, base_dir, tuned_dirs)
    report = _analyze(recipe)
    base, tuned = load_state(base_dir), [load_state(d) for d in tuned_dirs]
    names = [t["name"] for t in report["tensors"]]
    assert sorted(names) == sorted(n for n, t in base.items() if t.dtype.is_floating_point)
    # whole model: norms, relative norms and the norm-ratio warning
    taus = _taus(base, tuned, names)
    norms = [float(np.linalg.norm(t)) for t in taus]
    np.testing.assert_allclose(report["model"]["norms"], norms, rtol=1e-9)
    base_norm = float(np.linalg.norm(np.concatenate([_np(base[n]).reshape(-1) for n in names])))
    np.testing.assert_allclose(report["model"]["relative_norms"],
                               [x / base_norm for x in norms], rtol=1e-9)
    assert report["model"]["norm_ratio"] == pytest.approx(max(norms) / min(norms), rel=1e-9)
    assert "norm_ratio" in [w["code"] for w in report["warnings"]]
    # layer 1: the cosine of its concatenated task vectors
    layer = next(g for g in report["layers"] if g["name"] == "layer 1")
    in_layer = [n for n in names if ".layers.1." in n]
    lt = _taus(base, tuned, in_layer)
    for i in range(3):
        for j in range(3):
            ref = float(lt[i] @ lt[j] / (np.linalg.norm(lt[i]) * np.linalg.norm(lt[j])))
            assert layer["cosine"][i][j] == pytest.approx(ref, rel=1e-9, abs=1e-12)
    # one matrix: sign conflicts and used-by-k at the recipe's density, effective rank
    name = "model.layers.0.mlp.down_proj.weight"
    one = next(t for t in report["tensors"] if t["name"] == name)
    mt = [_np(t[name] - base[name]) for t in tuned]
    keeps = [_ref_keep(t, 0.5) for t in mt]
    pos = sum((k & (t > 0)).astype(int) for k, t in zip(keeps, mt, strict=True))
    neg = sum((k & (t < 0)).astype(int) for k, t in zip(keeps, mt, strict=True))
    used = pos + neg
    assert one["used_by"] == [int((used == k).sum()) for k in range(4)]
    conflicts = int(((pos > 0) & (neg > 0)).sum())
    assert one["sign_conflict"] == pytest.approx(conflicts / int((used >= 2).sum()))
    for i, t in enumerate(mt):
        s = np.linalg.svd(t, compute_uv=False)
        p = s / s.sum()
        assert one["effective_rank"][i] == pytest.approx(math.exp(-(p * np.log(p)).sum()),
                                                         rel=1e-5)
    assert one["interference"] == pytest.approx(_ref_sti(mt), rel=1e-4)


def test_after_merge_matches_the_written_merge(three_tasks: tuple[Path, list[Path]],
                                               tmp_path: Path) -> None:
    """The in-memory merge is the one `pcbmerge run` writes: alignment and distances from it
    equal a dense computation on the written output, and `--merged` reads the same."""
    base_dir, tuned_dirs = three_tasks
    recipe = _recipe(tmp_path, base_dir, tuned_dirs)
    merged_dir = tmp_path / "merged"
    merge_recipe_file(recipe, merged_dir)
    report = _analyze(recipe)
    from_disk = _analyze(recipe, "--merged", merged_dir)
    assert report["after"] == "merge" and from_disk["after"] == "merged"
    assert report["model"]["relative_distance"] == from_disk["model"]["relative_distance"]
    base, merged = load_state(base_dir), load_state(merged_dir)
    tuned = [load_state(d) for d in tuned_dirs]
    names = [t["name"] for t in report["tensors"]]
    delta = np.concatenate([_np(merged[n] - base[n]).reshape(-1) for n in names])
    taus = _taus(base, tuned, names)
    np.testing.assert_allclose(report["model"]["relative_distance"],
                               [np.linalg.norm(delta - t) / np.linalg.norm(t) for t in taus],
                               rtol=1e-9)
    # Iso alignment of one layer: energy of each task in the merged top-k subspaces
    in_layer = [n for n in names if ".layers.0." in n and merged[n].dim() == 2]
    inside, total = np.zeros(3), np.zeros(3)
    for n in in_layer:
        m = _np(merged[n] - base[n])
        u, s, _ = np.linalg.svd(m, full_matrices=False)
        e = s ** 2
        k = next(k for k in range(1, len(s) + 1) if e[k:].sum() <= 0.05 ** 2 * e.sum())
        for i, t in enumerate(tuned):
            tau = _np(t[n] - base[n])
            inside[i] += ((u[:, :k].T @ tau) ** 2).sum()
            total[i] += (tau ** 2).sum()
    layer = next(g for g in report["layers"] if g["name"] == "layer 0")
    np.testing.assert_allclose(layer["energy_share"], inside / total, rtol=1e-4)
    assert layer["favoured"] == str(tuned_dirs[int(np.argmax(inside / total))])


def _dense_pcb_kept(taus: list[np.ndarray], density: float, clip: float) -> list[int]:
    """Entries each task keeps in a global-scope PCB merge (score above its drop
    threshold), from methods.md's steps on the concatenated float32 rows."""
    tv = torch.tensor(np.stack(taus), dtype=torch.float32)
    n, d = tv.shape
    a = tv.abs()
    s = torch.sort(a, dim=1).values
    lo, hi = s[:, int(d * clip)][:, None], s[:, int(d * (1 - clip)) - 1][:, None]
    a = torch.minimum(torch.maximum(a, lo), hi)
    span = hi - lo
    score = torch.exp(n * ((a - lo) / span) ** 2) * torch.tanh(tv * tv.sum(dim=0))
    threshold = torch.sort(score, dim=1).values[:, int(d * (1 - density))][:, None]
    return [int(x) for x in (score > threshold).sum(dim=1)]


@pytest.mark.parametrize("slice_size", [metrics.SLICE, 1000])  # slices inside tensors
def test_pcb_kept_share_against_dense(three_tasks: tuple[Path, list[Path]], tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch, slice_size: int) -> None:
    import mergekit_pcb.analysis.run as analysis_run

    monkeypatch.setattr(analysis_run, "SLICE", slice_size)
    base_dir, tuned_dirs = three_tasks
    recipe = _recipe(tmp_path, base_dir, tuned_dirs, method="pcb", density=0.2)
    report = _analyze(recipe)
    base, tuned = load_state(base_dir), [load_state(d) for d in tuned_dirs]
    names = [t["name"] for t in report["tensors"]]
    # τ in float32 from the stored values, as PCB computes
    taus = [np.concatenate([(t[n].float() - base[n].float()).reshape(-1).numpy() for n in names])
            for t in tuned]
    kept = _dense_pcb_kept(taus, 0.2, 0.01)
    assert report["model"]["pcb_kept"] == kept
    assert report["model"]["pcb_kept_share"] == pytest.approx([k / sum(kept) for k in kept])


@pytest.fixture(scope="module")
def written_report(three_tasks: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory
                   ) -> tuple[Path, str, str]:
    """`pcbmerge analyze RECIPE -o DIR` on the three tasks, once for the module: the report
    directory, stdout and stderr."""
    tmp_path = tmp_path_factory.mktemp("report")
    base_dir, tuned_dirs = three_tasks
    recipe = _recipe(tmp_path, base_dir, tuned_dirs)
    out = tmp_path / "report"
    proc = run_cli("analyze", recipe, "-o", out)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout, proc.stderr


def test_analyze_writes_a_report(written_report: tuple[Path, str, str]) -> None:
    out, stdout, stderr = written_report
    assert "ratio" in stdout and "│ model" in stdout
    assert "warning: task-vector norms differ" in stderr
    written = json.loads((out / "report.json").read_text())
    assert written["model"]["norm_ratio"] > 5
    md = (out / "report.md").read_text()
    assert "| layer 0 |" in md and "## Warnings" in md
    assert (out / "alignment.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "spectrum.png").read_bytes()[:4] == b"\x89PNG"
    spec = written["spectrum"]
    assert f"## Spectrum of `{spec['tensor']}`" in md
    assert f"spectrum of {spec['tensor']}, chosen as the largest task-vector norm" in stdout
    _check_html(out / "report.html", written)


def test_default_spectrum_pick(written_report: tuple[Path, str, str],
                               three_tasks: tuple[Path, list[Path]]) -> None:
    """Without --spectrum the report shows the layer matrix whose task-vector norms differ
    most (the third fine-tune moved 6× further), from numpy's norms; its task spectra are
    numpy's."""
    out, _, _ = written_report
    spec = json.loads((out / "report.json").read_text())["spectrum"]
    base_dir, tuned_dirs = three_tasks
    base, tuned = load_state(base_dir), [load_state(d) for d in tuned_dirs]
    ratios = {}
    for n, b in base.items():
        if b.dim() == 2 and n not in ("model.embed_tokens.weight", "lm_head.weight"):
            norms = [float(np.linalg.norm(_np(t[n] - b))) for t in tuned]
            ratios[n] = max(norms) / min(norms)
    best = max(ratios, key=ratios.__getitem__)
    assert ratios[best] >= 5
    assert spec["tensor"] == best
    assert spec["reason"] == ("the largest task-vector norm ratio among the matrices, "
                              f"{ratios[best]:.1f}×, at or above the 5× warning threshold")
    for got, t in zip(spec["singular_values"]["tasks"], tuned, strict=True):
        _assert_spectrum(got, _svdvals(_np(t[best] - base[best])))


def _check_html(path: Path, report: dict) -> None:
    """The page holds the table (a row per group and the model), the warnings, and every
    heat map as an embedded PNG; nothing refers outside the page."""
    from html.parser import HTMLParser

    class Page(HTMLParser):
        def __init__(self) -> None:
            super().__init__()
            self.rows, self.items, self.images, self.outside = 0, 0, [], []

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            self.rows += tag == "tr"
            self.items += tag == "li"
            for name, value in attrs:
                if name in ("src", "href") and value is not None:
                    (self.images if tag == "img" else self.outside).append(value)
            if tag in ("script", "link", "iframe"):
                self.outside.append(tag)

    page = Page()
    page.feed(path.read_text())
    assert page.rows == 1 + len(report["layers"]) + 1
    assert page.items == len(report["warnings"])
    assert page.outside == []
    pngs = sorted(p.name for p in path.parent.glob("*.png"))
    assert len(page.images) == len(pngs) > 0
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"


def _png_size(data: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, read without an image decoder."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_report_renders_in_a_headless_browser(written_report: tuple[Path, str, str],
                                              tmp_path: Path) -> None:
    """The page, opened from file:// in a real headless Chromium (over the DevTools pipe,
    tests/browser.py), decodes every heat map at its PNG's own size, requests nothing but
    itself and its embedded images, and logs no error. A broken page opened in the same
    browser is reported as broken, so the check can fail. Without a Chromium on PATH the
    test skips; the HTML-parser check (test_analyze_writes_a_report) runs regardless."""
    executable = find_chromium()
    if executable is None:
        pytest.skip("no headless browser on PATH (chromium, chromium-browser, google-chrome; "
                    "Debian: apt-get install chromium): the HTML-parser check still runs")
    out, _, _ = written_report
    broken = tmp_path / "broken.html"
    not_png = base64.b64encode(b"not a PNG at all").decode()
    broken.write_text(f'<!DOCTYPE html><html><head><title>broken</title></head><body>'
                      f'<img alt="garbled" src="data:image/png;base64,{not_png}">'
                      f'<img alt="absent" src="absent.png">'
                      f'<script>console.error("boom")</script></body></html>')
    with Browser(executable) as browser:
        page = browser.open(out / "report.html")
        bad = browser.open(broken)
    assert page.title == "pcbmerge analyze: " + json.loads(
        (out / "report.json").read_text())["recipe"]
    assert (page.console_errors, page.exceptions, page.log_errors) == ([], [], [])
    assert [u for u in page.requests if not u.startswith("data:image/png;base64,")] == [
        (out / "report.html").resolve().as_uri()]
    pngs = {p.name: _png_size(p.read_bytes()) for p in out.glob("*.png")}
    assert "spectrum.png" in pngs and "cosine.png" in pngs
    assert {alt: (w, h) for alt, w, h, _ in page.images} == pngs
    assert all(error is None for *_, error in page.images), page.images
    # the same checks catch each fault of the broken page
    assert [(alt, w, error is not None) for alt, w, _, error in bad.images] == [
        ("garbled", 0, True), ("absent", 0, True)]
    assert bad.console_errors == ["boom"]
    assert any("absent.png" in e for e in bad.log_errors), bad.log_errors


def test_conv_kernels_as_matrices(tmp_path: Path) -> None:
    """`--conv-matrix`: a conv kernel's alignment is that of its (out, in·kh·kw) matrix, from
    a float64 numpy SVD; without it a kernel has none, and its other figures are the same
    either way (they do not depend on the shape)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    base = {"conv.weight": torch.randn(6, 3, 3, 3, generator=g),
            "fc.weight": torch.randn(5, 4, generator=g)}
    dirs = []
    for i in range(4):
        state = base if i == 0 else {k: v + 0.1 * torch.randn(v.shape, generator=g)
                                     for k, v in base.items()}
        (tmp_path / f"m{i}").mkdir()
        save_file(state, str(tmp_path / f"m{i}" / "model.safetensors"))
        dirs.append(tmp_path / f"m{i}")
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(dirs[0]),
        "models": [{"model": str(d)} for d in dirs[1:]], "parameters": {"lambda": 0.5},
        "dtype": "float32"})
    flat = _analyze(recipe)
    conv = _analyze(recipe, "--conv-matrix", "--spectrum", "conv.weight")
    assert conv["conv_matrix"] and not flat["conv_matrix"]
    kernel = {r["name"]: r for r in conv["tensors"]}["conv.weight"]
    plain = {r["name"]: r for r in flat["tensors"]}["conv.weight"]
    assert kernel["shape"] == [6, 3, 3, 3] and plain.get("alignment") is None
    for key in ("norms", "cosine", "sign_conflict", "relative_distance"):
        assert kernel[key] == plain[key]
    states = [load_state(d) for d in dirs]
    taus = [_np(s["conv.weight"] - states[0]["conv.weight"]).reshape(6, -1) for s in states[1:]]
    update = 0.5 * sum(taus)  # task arithmetic at λ = 0.5
    u, sv, _ = np.linalg.svd(update, full_matrices=False)
    k = next(k for k in range(1, len(sv) + 1)
             if (sv[k:] ** 2).sum() <= 0.05 ** 2 * (sv ** 2).sum())
    assert kernel["iso_rank"] == k
    ref = [math.sqrt(((u[:, :k].T @ t) ** 2).sum() / (t ** 2).sum()) for t in taus]
    assert kernel["alignment"] == pytest.approx(ref, rel=1e-6)
    assert kernel["effective_rank"] is not None and len(kernel["effective_rank"]) == 3
    # its spectra, as the (6, 27) matrix
    spec = conv["spectrum"]
    assert (spec["shape"], spec["matrix"]) == ([6, 3, 3, 3], [6, 27])
    for got, t in zip(spec["singular_values"]["tasks"], taus, strict=True):
        _assert_spectrum(got, _svdvals(t))
    _assert_spectrum(spec["singular_values"]["sum"], _svdvals(sum(taus)))
    # (the merge itself runs in float32: its update is 0.5·Σ τᵢ to float32's rounding)
    np.testing.assert_allclose(spec["singular_values"]["merged"], sv, rtol=1e-6)
    # the default pick among fc.weight and the kernel: only fc.weight is a matrix unflattened
    assert flat["spectrum"]["tensor"] == "fc.weight"
    proc = run_cli("analyze", recipe, "--spectrum", "conv.weight")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --spectrum conv.weight: tensor of shape [6, 3, 3, 3] is not a matrix (2-D) "
        "(add --conv-matrix to take a conv kernel as a matrix)"]


def test_analyze_bad_input(three_tasks: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base_dir, tuned_dirs = three_tasks
    missing = tmp_path / "no-such-model"
    proc = run_cli("analyze", _recipe(tmp_path, base_dir, [tuned_dirs[0], missing]))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: model not found: {missing}"
                                                " (no such file or directory)"]
    other = finetune_like(tiny_model("llama", seed=0), seed=2)
    other.resize_token_embeddings(120)
    bad = save_hf(other, tmp_path / "ft-bigvocab")
    proc = run_cli("analyze", _recipe(tmp_path, base_dir, [tuned_dirs[0], bad], name="b.yaml"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: shape mismatch for tensor")
    recipe = _recipe(tmp_path, base_dir, tuned_dirs, name="c.yaml")
    proc = run_cli("analyze", recipe, "--merged", tuned_dirs[0].parent / "nothing-here")
    assert proc.returncode == 2 and proc.stderr.startswith("error: model not found")


def test_pcb_kept_share_tensor_scope(three_tasks: tuple[Path, list[Path]],
                                     tmp_path: Path) -> None:
    """`scope: tensor`: each tensor's own statistics; a layer's count is their sum."""
    base_dir, tuned_dirs = three_tasks
    recipe = _recipe(tmp_path, base_dir, tuned_dirs, method="pcb", density=0.3,
                     scope="tensor", clip=0.0)
    report = _analyze(recipe, "--no-spectral")
    base, tuned = load_state(base_dir), [load_state(d) for d in tuned_dirs]
    layer = next(g for g in report["layers"] if g["name"] == "layer 0")
    kept = np.zeros(3, dtype=int)
    for n in (t["name"] for t in report["tensors"] if t["group"] == "layer 0"):
        kept += _dense_pcb_kept([(t[n].float() - base[n].float()).reshape(-1).numpy()
                                 for t in tuned], 0.3, 0.0)
    assert layer["pcb_kept"] == kept.tolist()
    assert layer["effective_rank"] is None and "alignment" not in layer  # --no-spectral


def test_linear_reads_the_base_beside(three_tasks: tuple[Path, list[Path]],
                                      tmp_path: Path) -> None:
    """A method that does not read the base (linear) is measured against it all the same,
    at the default density, and its merge is the mean."""
    base_dir, tuned_dirs = three_tasks
    recipe = write_recipe(tmp_path / "lin.yaml", {
        "merge_method": "linear", "base_model": str(base_dir), "dtype": "float32",
        "models": [{"model": str(t), "parameters": {"weight": 1.0}} for t in tuned_dirs]})
    report = _analyze(recipe)
    assert report["density_source"].startswith("default 0.2")
    base, tuned = load_state(base_dir), [load_state(d) for d in tuned_dirs]
    names = [t["name"] for t in report["tensors"]]
    taus = _taus(base, tuned, names)
    mean = sum(taus) / 3
    np.testing.assert_allclose(report["model"]["relative_distance"],
                               [np.linalg.norm(mean - t) / np.linalg.norm(t) for t in taus],
                               rtol=1e-5)


def _synthetic(name: str, g: list[list[float]], elected: list[int], n: int = 2
               ) -> metrics.TensorStats:
    signs = metrics.SignCounts(numel=100, kept=[50] * n, used_by=[0, 100] + [0] * (n - 1),
                               conflicts=0, elected=elected)
    return metrics.TensorStats(name, [10, 10], [0.5] * n,
                               torch.tensor(g, dtype=torch.float64), signs, base_norm2=1.0)


def test_warnings_from_the_figures() -> None:
    """Warnings fire on the stated thresholds: one task holding most elected entries of a
    layer, a task dropped from a layer, a model that did not move."""
    from mergekit_pcb.analysis.report import aggregate
    from mergekit_pcb.analysis.run import Measured

    tensors = [_synthetic("model.layers.0.mlp.up_proj.weight", [[4.0, 0.0], [0.0, 1.0]],
                          [90, 10]),
               _synthetic("model.layers.1.mlp.up_proj.weight", [[4.0, 0.0], [0.0, 1.0]],
                          [50, 0])]
    measured = Measured("r.yaml", "ties", "base", ["a", "b"], tensors, [], None, None,
                        "recipe")
    report = aggregate(measured)
    messages = [(w["code"], w["message"]) for w in report["warnings"]]
    assert messages == [
        ("dominant_task", "layer 0: a holds 90% of the TIES-elected entries (threshold 80%)"),
        ("dominant_task", "layer 1: a holds 100% of the TIES-elected entries (threshold 80%)"),
        ("task_dropped", "layer 1: b is dropped entirely (no entry survives the TIES trim "
         "and sign election at this density)")]  # and no norm warning: 2× only
    assert report["model"]["norm_ratio"] == pytest.approx(2.0)
    still = _synthetic("model.layers.0.mlp.up_proj.weight", [[1e-12, 0.0], [0.0, 1.0]],
                       [50, 50])
    report = aggregate(Measured("r.yaml", "ties", "base", ["a", "b"], [still], [], None,
                                None, "recipe"))
    codes = [w["code"] for w in report["warnings"]]
    assert "barely_moved" in codes and "norm_ratio" in codes
    assert report["suggestion"]["try"].startswith("task_arithmetic or ties with per-model")


@pytest.mark.parametrize(("name", "group", "part"), [
    ("model.embed_tokens.weight", "embeddings", "embeddings"),
    ("lm_head.weight", "head", "head"),
    ("model.norm.weight", "norms", "norms"),
    ("model.layers.3.self_attn.q_proj.weight", "layer 3", "attention"),
    ("model.layers.3.mlp.down_proj.weight", "layer 3", "mlp"),
    ("model.layers.3.post_attention_layernorm.weight", "layer 3", "norms"),
    ("bert.encoder.layer.1.attention.output.dense.weight", "layer 1", "attention"),
    ("bert.encoder.layer.1.attention.output.LayerNorm.bias", "layer 1", "norms"),
    ("bert.encoder.layer.1.output.dense.weight", "layer 1", "mlp"),
    ("bert.embeddings.position_embeddings.weight", "embeddings", "embeddings"),
    ("classifier.weight", "head", "head"),
    ("transformer.h.0.attn.c_attn.weight", "layer 0", "attention"),
    ("transformer.h.0.mlp.c_fc.weight", "layer 0", "mlp"),
    ("transformer.h.0.ln_1.weight", "layer 0", "norms"),
    ("transformer.wpe.weight", "embeddings", "embeddings"),
])
def test_groups_and_parts(name: str, group: str, part: str) -> None:
    from mergekit_pcb.analysis.report import group_of, model_part

    assert (group_of(name), model_part(name)) == (group, part)


def test_a_model_without_layers_is_grouped_by_module() -> None:
    from mergekit_pcb.analysis.report import aggregate
    from mergekit_pcb.analysis.run import Measured

    g = [[1.0, 0.0], [0.0, 1.0]]
    tensors = [_synthetic(n, g, [50, 50]) for n in ("net.0.weight", "net.0.bias",
                                                    "net.3.weight")]
    report = aggregate(Measured("r.yaml", "ties", "base", ["a", "b"], tensors, [], None,
                                None, "recipe"))
    assert [(g["name"], g["tensors"]) for g in report["layers"]] == [("net.0", 2),
                                                                     ("net.3", 1)]


def test_report_directory_that_is_a_file(three_tasks: tuple[Path, list[Path]],
                                         tmp_path: Path) -> None:
    base_dir, tuned_dirs = three_tasks
    taken = tmp_path / "taken"
    taken.write_text("")
    proc = run_cli("analyze", _recipe(tmp_path, base_dir, tuned_dirs), "-o", taken,
                   "--no-merge", "--no-spectral")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --output {taken}: File exists"]


@pytest.mark.parametrize("shape", [(6, 11), (11, 6)])
def test_spectrum_against_numpy_svd(shape: tuple[int, int]) -> None:
    """The Gram-eigendecomposition SVD: singular values and the top-k subspaces of numpy's
    SVD, on a wide and a tall matrix of rank 4 (the noise directions' vectors left zero)."""
    g = torch.Generator().manual_seed(5)
    m = (torch.randn(shape[0], 4, generator=g) @ torch.randn(4, shape[1], generator=g))
    u, s, vh = metrics.spectrum(m, 3)
    ref_u, ref_s, ref_vh = np.linalg.svd(_np(m), full_matrices=False)
    np.testing.assert_allclose(s[:4].numpy(), ref_s[:4], rtol=1e-6)
    assert float(s[4:].max()) < 1e-5 * float(s[0])
    # the same subspaces (vectors up to sign): projectors agree
    np.testing.assert_allclose((u @ u.T).numpy(), ref_u[:, :3] @ ref_u[:, :3].T, atol=1e-6)
    np.testing.assert_allclose((vh.T @ vh).numpy(), ref_vh[:3].T @ ref_vh[:3], atol=1e-6)
    full_u, full_s, full_vh = metrics.spectrum(m)
    assert float(full_u[:, 4:].abs().max() if shape[0] > shape[1] else
                 full_vh[4:].abs().max()) == 0.0  # noise directions: zero vectors
    np.testing.assert_allclose((full_u * full_s) @ full_vh, _np(m), atol=1e-5)


def test_tokenizers_that_differ_are_named(three_tasks: tuple[Path, list[Path]],
                                          tmp_path: Path) -> None:
    """A fine-tune whose tokenizer numbers the tokens otherwise than the base's is named in
    a warning (no `tokenizer_source`: its embedding rows are other tokens)."""
    import shutil

    from tokenizers import Tokenizer, models

    base_dir, tuned_dirs = three_tasks
    same, other = tmp_path / "same", tmp_path / "other"
    shutil.copytree(tuned_dirs[0], same)
    shutil.copytree(tuned_dirs[1], other)
    write_tokenizer_files(same)
    write_tokenizer_files(other)
    vocab = {"[PAD]": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(94)}}  # 0 and 1 swapped
    Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")).save(str(other / "tokenizer.json"))
    report = _analyze(_recipe(tmp_path, base_dir, [same, other]), "--no-merge",
                      "--no-spectral")
    assert [w["message"] for w in report["warnings"] if w["code"] == "tokenizers_differ"] \
        == [f"tokenizers differ from the base's: {other}; embedding rows of the same index "
            "are other tokens (set tokenizer_source)"]


# --- the spectra of one matrix, the heat maps' colour scales ------------------------------

def _svdvals(m: np.ndarray) -> np.ndarray:
    return np.linalg.svd(m, compute_uv=False)


def _assert_spectrum(values: list[float], ref: np.ndarray) -> None:
    """Singular values equal to numpy's float64 SVD: relative to the largest (the smallest
    of a float32 matrix's values are rounding noise in both)."""
    assert len(values) == len(ref)
    np.testing.assert_allclose(values, ref, rtol=1e-9, atol=1e-12 * float(ref[0]))


def test_chosen_matrix_spectra_against_numpy(three_tasks: tuple[Path, list[Path]],
                                              tmp_path: Path) -> None:
    """`--spectrum NAME`: each task's singular values, their sum's and the merged update's,
    against numpy's float64 SVD of the stored checkpoints and of the merge `pcbmerge run`
    writes; the in-memory merge and `--merged` give the same."""
    base_dir, tuned_dirs = three_tasks
    recipe = _recipe(tmp_path, base_dir, tuned_dirs)
    merged_dir = tmp_path / "merged"
    merge_recipe_file(recipe, merged_dir)
    name = "model.layers.1.mlp.down_proj.weight"
    spec = _analyze(recipe, "--spectrum", name, "--no-spectral")["spectrum"]
    from_disk = _analyze(recipe, "--spectrum", name, "--merged", merged_dir,
                         "--no-spectral")["spectrum"]
    assert (spec["tensor"], spec["shape"], spec["matrix"], spec["reason"]) == (
        name, [32, 64], [32, 64], "the matrix named by --spectrum")
    base, merged = load_state(base_dir), load_state(merged_dir)
    taus = [_np(load_state(d)[name] - base[name]) for d in tuned_dirs]
    values = spec["singular_values"]
    for got, tau in zip(values["tasks"], taus, strict=True):
        _assert_spectrum(got, _svdvals(tau))
    _assert_spectrum(values["sum"], _svdvals(sum(taus)))
    _assert_spectrum(values["merged"], _svdvals(_np(merged[name] - base[name])))
    assert from_disk["singular_values"] == values
    # without a merge: no merged spectrum
    alone = _analyze(recipe, "--spectrum", name, "--no-merge")["spectrum"]
    assert alone["singular_values"]["merged"] is None
    assert alone["singular_values"]["tasks"] == values["tasks"]


def _picked(tensors: list[metrics.TensorStats]) -> tuple[str, str] | None:
    return metrics.pick_spectrum(tensors)


def _stats(name: str, norms: list[float], conflicts: int, overlap: int
           ) -> metrics.TensorStats:
    """A hand-made matrix's statistics: task-vector norms, and `conflicts` of the
    `overlap` entries two tasks keep."""
    n = len(norms)
    signs = metrics.SignCounts(numel=100, kept=[50] * n,
                               used_by=[0, 100 - overlap, overlap] + [0] * (n - 2),
                               conflicts=conflicts, elected=[50] * n)
    return metrics.TensorStats(name, [10, 10], [0.5] * n,
                               torch.diag(torch.tensor(norms, dtype=torch.float64) ** 2),
                               signs, base_norm2=1.0)


def test_default_spectrum_pick_by_hand() -> None:
    """The largest norm ratio where one reaches 5× (whatever the conflicts), else the highest
    sign conflict, else the first matrix; ties to the first."""
    mild = _stats("a", [1.0, 2.0], conflicts=45, overlap=50)  # ratio 2, conflict 90%
    wide = _stats("b", [1.0, 6.0], conflicts=5, overlap=50)  # ratio 6, conflict 10%
    wider = _stats("c", [0.5, 4.0], conflicts=0, overlap=50)  # ratio 8, conflict 0%
    assert _picked([mild, wide, wider]) == (
        "c", "the largest task-vector norm ratio among the matrices, 8.0×, at or above the "
        "5× warning threshold")
    assert _picked([mild, wide])[0] == "b"
    even = _stats("d", [1.0, 1.5], conflicts=30, overlap=50)  # 60%
    assert _picked([even, mild, _stats("e", [1.0, 1.0], 45, 50)]) == (
        "a", "the highest sign conflict among the matrices, 90% of the entries several "
        "tasks keep, as no norm ratio reaches 5×")
    apart = [_stats("f", [1.0, 1.0], 0, 0), _stats("g", [1.0, 2.0], 0, 0)]
    assert _picked(apart) == ("f", "the first matrix, as no norm ratio reaches 5× and no "
                              "entry is kept by two tasks")
    assert _picked([]) is None


def test_spectrum_bad_names(three_tasks: tuple[Path, list[Path]], tmp_path: Path) -> None:
    """An unknown tensor (with the closest name, where one is close) and one that is not a
    matrix: one line each, exit code 2."""
    base_dir, tuned_dirs = three_tasks
    recipe = _recipe(tmp_path, base_dir, tuned_dirs)
    cases = {
        "model.layers.0.mlp.down_proj.wieght": "no such tensor among the 21 the recipe "
        "merges (did you mean 'model.layers.0.mlp.down_proj.weight'?)",
        "nothing.like.it": "no such tensor among the 21 the recipe merges",
        "model.norm.weight": "tensor of shape [32] is not a matrix (2-D)",
    }
    for name, message in cases.items():
        proc = run_cli("analyze", recipe, "--spectrum", name, "--no-merge", "--no-spectral")
        assert proc.returncode == 2
        assert proc.stderr.strip().splitlines() == [f"error: --spectrum {name}: {message}"]


def test_spectrum_of_a_tensor_not_measured() -> None:
    """A tensor the plan has but analyze measures no task vectors of (copied, taken): its own
    line, not 'no such tensor'; a conv kernel is a matrix only under --conv-matrix."""
    from types import SimpleNamespace

    from mergekit_pcb.analysis.run import _named_spectrum
    from mergekit_pcb.errors import RecipeError

    merged = SimpleNamespace(name="w", shape=(4, 3))
    kernel = SimpleNamespace(name="k", shape=(4, 3, 3, 3))
    plan = SimpleNamespace(tasks=[merged, kernel, SimpleNamespace(name="copied", shape=(4, 3))])
    with pytest.raises(RecipeError, match=r"^--spectrum copied: analyze measures no task "
                       r"vectors of this tensor \(the recipe copies"):
        _named_spectrum(plan, [merged, kernel], "copied", conv_matrix=False)
    assert _named_spectrum(plan, [merged, kernel], "w", conv_matrix=False) is merged
    assert _named_spectrum(plan, [merged, kernel], "k", conv_matrix=True) is kernel
    with pytest.raises(RecipeError, match=r"not a matrix \(2-D\) \(add --conv-matrix"):
        _named_spectrum(plan, [merged, kernel], "k", conv_matrix=False)


def test_heat_map_scales_are_fixed_for_shares_and_cosines(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Shares on [0, 1], the cosine on [−1, 1], whatever the figures' own range (here
    0.45–0.55 and 0–0.4); unbounded figures (the norms) keep their own range. The colour of
    a known cell follows: a share of 0.55 is viridis at 0.55, not at its top."""
    import matplotlib
    from matplotlib.axes import Axes

    from mergekit_pcb.analysis.report import aggregate, heatmaps
    from mergekit_pcb.analysis.run import Measured

    images: list[Any] = []  # each figure's AxesImage, in the order the files are written
    imshow = Axes.imshow

    def spy(self: Axes, *args: Any, **kwargs: Any) -> Any:
        images.append(imshow(self, *args, **kwargs))
        return images[-1]

    monkeypatch.setattr(Axes, "imshow", spy)
    tensors = [_synthetic("model.layers.0.mlp.up_proj.weight", [[4.0, 0.8], [0.8, 1.0]],
                          [55, 45]),
               _synthetic("model.layers.1.mlp.up_proj.weight", [[4.0, 0.0], [0.0, 1.0]],
                          [50, 50])]
    report = aggregate(Measured("r.yaml", "ties", "base", ["a", "b"], tensors, [], None,
                                None, "recipe"))
    seen = dict(zip(heatmaps(report, tmp_path), images, strict=True))
    share = seen["elected_share.png"]
    assert (share.norm.vmin, share.norm.vmax) == (0.0, 1.0)
    cosine = seen["cosine.png"]
    assert (cosine.norm.vmin, cosine.norm.vmax) == (-1.0, 1.0)
    norms = seen["relative_norms.png"]
    assert (norms.norm.vmin, norms.norm.vmax) == (1.0, 2.0)  # √1 … √4: its own range
    viridis = matplotlib.colormaps["viridis"]
    assert share.to_rgba(0.55) == pytest.approx(viridis(0.55))
    assert cosine.to_rgba(0.2) == pytest.approx(viridis(0.6))  # 0.2 on [−1, 1]
