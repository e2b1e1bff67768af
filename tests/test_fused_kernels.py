"""The fused kernels (`methods/fused_kernel.py`) give the bits of the torch code they stand in
for, and the staged loader uses them only once they are checked."""

from __future__ import annotations

import math
import random
import threading
from pathlib import Path

import pytest
import torch

from mergekit_pcb.methods import ops
from mergekit_pcb.methods.compiled import StagedKernel
from mergekit_pcb.threads import torch_threads


@pytest.fixture(scope="module")
def kernel():
    loaded = ops.FUSED.wait(timeout=300)
    assert loaded is not None, "the fused kernels did not load or did not match torch"
    return loaded


def _torch_path(fn, *args, **kwargs):
    """`fn` with the fused kernels unloaded: the torch code."""
    kept = ops.FUSED._kernel
    ops.FUSED._kernel = None
    try:
        return fn(*args, **kwargs)
    finally:
        ops.FUSED._kernel = kept


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_combine_by_hand(kernel):
    """Three tasks, four entries: sign election, disjoint mean, λ, as methods.md."""
    base = torch.tensor([1.0, 0.0, -1.0, 2.0])
    deltas = [torch.tensor([0.5, -1.0, 0.0, 0.25]),
              torch.tensor([-0.25, -2.0, 0.0, -0.5]),
              torch.tensor([1.0, 3.0, 0.0, 0.0])]
    out = ops._run_combine(kernel, base, deltas, [1.0, 1.0, 1.0], 2.0, True, True)
    # entry 0: Σ = 1.25 > 0 → mean of 0.5 and 1.0 = 0.75; entry 1: Σ = 0 elects +, only 3.0
    # agrees; entry 2: nothing agrees (divisor 1) → 0; entry 3: Σ = −0.25 → −0.5 alone
    assert out.tolist() == [1.0 + 2 * 0.75, 0.0 + 2 * 3.0, -1.0, 2.0 - 2 * 0.5]
    plain = ops._run_combine(kernel, base, deltas, [0.5, 1.0, 0.5], 1.0, False, False)
    assert plain.tolist() == [1.0 + 0.25 - 0.25 + 0.5, -0.5 - 2.0 + 1.5, -1.0, 2.125 - 0.5]


def test_combine_matches_torch_on_every_shape_and_flag(kernel):
    """Fused against torch on one thread: 1–15 tasks, tensors split in torch's 64K chunks
    and not, every tail length class, zero and negative weights, all flags."""
    rng = random.Random(0)
    g = torch.Generator().manual_seed(1)
    shapes = [(4096,), (4099,), (70_001,), (300, 517), (1 << 17,), ((1 << 17) + 33,)]
    with torch_threads(1):
        for case in range(48):
            m = case % 15 + 1
            shape = shapes[case % len(shapes)]
            base = torch.randn(shape, generator=g)
            deltas = [torch.randn(shape, generator=g)
                      * torch.exp(3 * torch.randn(shape, generator=g)) for _ in range(m)]
            for d in deltas:
                d[d.abs() < 0.5] = 0
            weights = [rng.choice([1.0, 0.5, -0.7, 2.0, 0.0]) for _ in range(m)]
            flags = dict(lambda_=rng.choice([1.0, 0.9]), normalize=rng.random() < 0.5,
                         sign_consensus=rng.random() < 0.6)
            fused = ops._fused_combine(base, deltas, weights, flags["lambda_"],
                                       flags["normalize"], flags["sign_consensus"])
            assert fused is not None
            expected = _torch_path(ops.combine_task_vectors, base, deltas, weights, **flags)
            assert _same_bits(fused, expected), (m, shape, weights, flags)


def test_the_tail_columns_take_torchs_other_order(kernel):
    """torch sums the columns past the last whole group of vectors in another order; on
    rows (1, 2⁻²⁴, 2⁻²⁴, 0, −1) the two orders give 0 and 2⁻²³, so a kernel that summed
    every column in row order would differ from torch in the tail."""
    n = 4096 + 37
    rows = [torch.full((n,), v) for v in (1.0, 2.0**-24, 2.0**-24, 0.0, -1.0)]
    base = torch.zeros(n)
    with torch_threads(1):
        expected = _torch_path(ops.combine_task_vectors, base, rows, [1.0] * 5)
        fused = ops._fused_combine(base, rows, [1.0] * 5, 1.0, False, False)
    tail = n - ops.tail_start(n)
    assert tail > 0 and int(torch.count_nonzero(expected)) == tail
    assert fused is not None and _same_bits(fused, expected)


def test_torch_keeps_what_the_kernel_does_not_reproduce(kernel):
    """More than one torch thread, 16 or more tasks, small tensors, other dtypes: torch."""
    base = torch.zeros(8192)
    deltas = [torch.ones(8192)] * 3
    with torch_threads(2):
        assert ops._fused_combine(base, deltas, [1.0] * 3, 1.0, True, True) is None
    with torch_threads(1):
        assert ops._fused_combine(base, deltas, [1.0] * 3, 1.0, True, True) is not None
        assert ops._fused_combine(base, [torch.ones(8192)] * 16, [1.0] * 16, 1.0, True,
                                  True) is None
        assert ops._fused_combine(base[:100], [d[:100] for d in deltas], [1.0] * 3, 1.0, True,
                                  True) is None
        assert ops._fused_combine(base.double(), [d.double() for d in deltas], [1.0] * 3,
                                  1.0, True, True) is None


def test_trim_matches_torch(kernel):
    """The TIES trim by histogram kernels against torch's, including −0 for dropped
    negative entries; with equal magnitudes at the cut the kernel declines and the
    tie-break decides, as before."""
    g = torch.Generator().manual_seed(2)
    for shape, density, coarse in (((4096,), 0.5, False), ((70_001,), 0.1, False),
                                   ((300, 517), 0.9, False), ((1 << 20,), 0.01, False),
                                   ((300, 517), 0.5, True), ((70_001,), 0.2, True)):
        d = torch.randn(shape, generator=g)
        if coarse:  # magnitudes in steps of 1/8: ties at every cut
            d = (d * 8).round() / 8
        n = d.numel()
        k = max(1, int(density * n))
        fused = ops._fused_trim(d, k, kernel)
        expected = _torch_path(ops.magnitude_trim, d, density)
        assert (fused is None) == coarse
        if fused is not None:
            assert _same_bits(fused, expected)
            assert int(torch.count_nonzero(fused)) == k
        assert _same_bits(ops.magnitude_trim(d, density), expected)


def test_staged_kernel_loads_after_enough_work_and_only_when_checked():
    loads: list[str] = []

    def load() -> str:
        loads.append("load")
        return "kernel"

    staged = StagedKernel("probe", 100, load, lambda k: k == "kernel", register=False)
    staged.count(60)
    assert staged.ready() is None and loads == []  # below the threshold: not loading
    staged.count(60)
    assert staged.wait(timeout=30) == "kernel" and loads == ["load"]
    staged.count(1000)
    assert loads == ["load"]  # loaded once
    refused = StagedKernel("refused", 0, load, lambda k: False, register=False)
    assert refused.wait(timeout=30) is None
    broken = StagedKernel("broken", 0, lambda: 1 / 0, lambda k: True, register=False)
    assert broken.wait(timeout=30) is None


def test_a_merge_gives_the_same_bits_before_and_after_the_kernels_load(kernel):
    """The kernels load on a background thread while merges run: which merges use them
    must not show in the results."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(50_000, generator=g)
    models = [base + 0.01 * torch.randn(50_000, generator=g) for _ in range(4)]
    from mergekit_pcb.methods.ties import ties_merge

    with torch_threads(1):
        fused = ties_merge(base, models, [1.0, 0.5, 1.0, 2.0], [0.3] * 4)
        plain = _torch_path(ties_merge, base, models, [1.0, 0.5, 1.0, 2.0], [0.3] * 4)
    assert _same_bits(fused, plain)


@pytest.mark.parametrize("nonnegative", [False, True])
def test_streaming_select_by_histogram_kernels(nonnegative):
    """The exact order statistics by the histogram kernels equal a full sort's, and the
    counts equal torch's rounds, on values with −0.0, +0.0 and many ties, in chunks."""
    from mergekit_pcb.methods import selection

    assert selection.HISTOGRAMS.wait(timeout=300) is not None
    g = torch.Generator().manual_seed(4)
    n = 200_003
    values = torch.randn(n, generator=g) * torch.exp(6 * torch.randn(n, generator=g))
    values[::5] = -0.0
    values[1::7] = 0.0
    values[2::9] = (values[2::9] * 4).round() / 4
    if nonnegative:
        values = values.abs()
    ks = [0, 17, n // 5, n // 5 + 1, n // 2, n - 1]
    results = []
    for kernel in (selection.HISTOGRAMS.ready(), None):
        kept = selection.HISTOGRAMS._kernel
        selection.HISTOGRAMS._kernel = kernel
        try:
            select = selection.StreamingSelect(ks, nonnegative=nonnegative)
            for chunk in values.split(50_000):
                select.observe_high(chunk)
            select.finish_high()
            for chunk in values.split(30_000):
                select.observe_low(chunk)
            select.finish_low()
        finally:
            selection.HISTOGRAMS._kernel = kept
        results.append((select.values, select.counts_below, select.counts_equal))
    assert results[0] == results[1]
    ordered = torch.sort(values).values
    assert results[0][0] == [float(ordered[k]) for k in ks]
    assert results[0][1] == [int((values < ordered[k]).sum()) for k in ks]


@pytest.mark.parametrize("inter", ["consensus", "normalized", "pairwise"])
def test_pcb_combine_matches_torch(inter):
    """PCB's soft-weighted mean by the fused kernel against torch, with the statistics of a
    real per-tensor PCB (clip bounds, score thresholds) over 2–9 tasks."""
    from mergekit_pcb.methods import pcb

    kernel = pcb.KERNELS.wait(timeout=300)
    assert kernel is not None
    g = torch.Generator().manual_seed(5)
    for m, shape in ((2, (5000,)), (5, (300, 101)), (9, (70_001,))):
        base = torch.randn(shape, generator=g)
        tau = [0.01 * torch.randn(shape, generator=g) for _ in range(m)]
        tau[0][..., ::3] = 0.0
        d = base.numel()
        lo_k, hi_k = pcb.clip_indices(d, 0.01)
        stats = []
        for t in tau:
            a = t.abs()
            stats.append(pcb.RowStats(pcb._kth(a, lo_k, True), pcb._kth(a, hi_k, True),
                                      float(a.min()), float(a.max())))
        scores = pcb.pcb_scores(tau, stats, inter)
        stats = [pcb.RowStats(s.clip_low, s.clip_high, s.abs_min, s.abs_max,
                              pcb._kth(b, pcb.drop_index(d, 0.2)), float(b.max()))
                 for s, b in zip(stats, scores, strict=True)]
        weights = [1.0 - 0.3 * i for i in range(m)]
        fused = pcb._fused_combine(kernel, base, tau, scores, stats, weights, 1.25)
        expected = pcb._combine(base, tau, scores, stats, weights, 1.25)
        assert _same_bits(fused, expected), (m, shape)
        assert _same_bits(pcb.pcb_combine(base, tau, scores, stats, weights, 1.25), expected)
        # no task with a score span (every score at its threshold): θ₀ itself, as torch
        flat = [pcb.RowStats(s.clip_low, s.clip_high, s.abs_min, s.abs_max, 1.0, 1.0)
                for s in stats]
        assert _same_bits(pcb.pcb_combine(base, tau, scores, flat, weights, 1.25),
                          pcb._combine(base, tau, scores, flat, weights, 1.25))


def test_pcb_consensus_scores_match_torch():
    """PCB's consensus scores by the fused kernels (Σⱼτⱼ in torch's order, the intra
    exponents) against torch, over 2–15 tasks and tensors with and without tail columns;
    an all-equal task (empty clip span) too."""
    from mergekit_pcb.methods import pcb

    kernel = pcb.KERNELS.wait(timeout=300)
    assert kernel is not None
    g = torch.Generator().manual_seed(6)
    with torch_threads(1):
        for m, shape in ((2, (4096,)), (4, (300, 101)), (7, (70_001,)), (15, (5000, 3))):
            tau = [0.01 * torch.randn(shape, generator=g) for _ in range(m)]
            tau[-1] = torch.full(shape, 0.02)  # |τ| all equal: empty clip span
            d = tau[0].numel()
            lo_k, hi_k = pcb.clip_indices(d, 0.01)
            stats = [pcb.RowStats(pcb._kth(t.abs(), lo_k, True), pcb._kth(t.abs(), hi_k, True),
                                  float(t.abs().min()), float(t.abs().max())) for t in tau]
            fused = pcb.pcb_scores(tau, stats, "consensus")
            expected = pcb._scores(tau, stats, "consensus")
            assert all(_same_bits(a, b) for a, b in zip(fused, expected, strict=True)), m
            assert torch.equal(fused[-1], expected[-1]) and not torch.equal(fused[0], fused[1])


@pytest.mark.parametrize("recipe", [
    {"merge_method": "ties", "parameters": {"normalize": True}},
    {"merge_method": "ties", "parameters": {"scope": "global"}},
    {"merge_method": "pcb", "parameters": {"lambda": 1.2, "density": 0.2}},
    {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.8}},
])
def test_pcbmerge_run_writes_the_same_bytes_with_the_kernels_and_without(tmp_path, recipe,
                                                                         monkeypatch):
    """The README's claim, end to end: `pcbmerge run`'s output files, kernels loaded or not
    (and loaded, they are called)."""
    import hashlib

    import yaml
    from safetensors.torch import save_file

    from mergekit_pcb.engine import merge_recipe_file
    from mergekit_pcb.methods import pcb, selection

    kernels = [ops.FUSED, selection.HISTOGRAMS, pcb.KERNELS]
    loaded = [k.wait(timeout=300) for k in kernels]
    assert all(k is not None for k in loaded)
    g = torch.Generator().manual_seed(7)
    base = {"a.weight": torch.randn(96, 128, generator=g),
            "b.weight": torch.randn(5000, generator=g), "c.bias": torch.randn(64, generator=g)}
    for name in ("base", "m0", "m1", "m2", "m3"):
        (tmp_path / name).mkdir()
        tensors = base if name == "base" else {
            k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
    sparse = recipe["merge_method"] != "task_arithmetic"
    doc = {**recipe, "base_model": str(tmp_path / "base"),
           "models": [{"model": str(tmp_path / f"m{k}"),
                       "parameters": {"weight": 1.0 - 0.2 * k,
                                      **({"density": 0.3 + 0.1 * k} if sparse else {})}}
                      for k in range(4)]}
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(doc))
    calls = []
    for name in ("weighted_combine", "magnitude_rank_bits", "high_histogram", "pcb_combine",
                 "task_sum"):
        function = getattr(loaded[0], name)
        monkeypatch.setattr(loaded[0], name,
                            lambda *a, _f=function, _n=name: calls.append(_n) or _f(*a))
    digests = []
    for use in (True, False):
        calls.clear()
        for staged, kernel in zip(kernels, loaded, strict=True):
            staged._kernel = kernel if use else None
        try:
            merge_recipe_file(path, tmp_path / f"out-{use}")
        finally:
            for staged, kernel in zip(kernels, loaded, strict=True):
                staged._kernel = kernel
        files = sorted((tmp_path / f"out-{use}").glob("*.safetensors"))
        digests.append(hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest())
        assert bool(calls) == use
    assert digests[0] == digests[1]


@pytest.mark.parametrize(("method", "passes"), [("ties", 0), ("pcb", 4)])
def test_a_merge_asks_for_the_kernels_only_when_it_is_large_enough(tmp_path, monkeypatch,
                                                                   method, passes):
    """Entries visited = each input's entries once per statistics pass and once to merge;
    at or above `KERNELS_WORTH` the merge asks for the kernels at its start."""
    import yaml
    from safetensors.torch import save_file

    from mergekit_pcb.engine import merge_recipe_file, stream

    shapes = {"a.weight": (40, 50), "b.bias": (70,)}
    for k, name in enumerate(("base", "m0", "m1", "m2")):
        (tmp_path / name).mkdir()
        save_file({n: torch.full(s, 0.01 * k) + torch.arange(math.prod(s)).reshape(s) / 1e4
                   for n, s in shapes.items()}, str(tmp_path / name / "model.safetensors"))
    path = tmp_path / "r.yml"
    path.write_text(yaml.safe_dump({
        "merge_method": method, "base_model": str(tmp_path / "base"),
        "models": [{"model": str(tmp_path / f"m{k}"), "parameters": {"density": 0.5}}
                   for k in range(3)]}))
    visits = (2000 + 70) * 3 * (1 + passes)
    requested = []
    monkeypatch.setattr(stream, "request_all", lambda: requested.append(True))
    for worth, expected in ((visits, [True]), (visits + 1, [])):
        requested.clear()
        monkeypatch.setattr(stream, "KERNELS_WORTH", worth)
        merge_recipe_file(path, tmp_path / f"out-{worth}")
        assert requested == expected


def test_loading_the_kernels_never_rewraps_sys_stdout(tmp_path):
    """numba colours error messages with colorama, whose init()/deinit() pair saves and
    restores sys.stdout; on a loader thread that raced click's CliRunner and left a closed
    stream as sys.stdout (a CI failure). Loading must never call colorama's init."""
    import os
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(
        "import colorama, colorama.initialise as ci\n"
        "calls = []\n"
        "orig = ci.init\n"
        "def init(*a, **k):\n"
        "    calls.append(1)\n"
        "    return orig(*a, **k)\n"
        "ci.init = colorama.init = init\n"
        "from mergekit_pcb.methods import compiled, ops, pcb, selection, sort_order\n"
        "compiled.request_all()\n"
        "loaded = [k.name for k in compiled._ALL if k.wait() is not None]\n"
        "print(len(calls), sorted(loaded))\n")
    env = {k: v for k, v in os.environ.items()
           if k != "NUMBA_DISABLE_ERROR_MESSAGE_HIGHLIGHTING"}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         check=True, env=env)
    calls, loaded = out.stdout.split(" ", 1)
    assert calls == "0"
    assert loaded.strip() == str(sorted(["fused-kernels", "histogram-kernels", "introsort-kernel",
                                         "pcb-kernels"]))


@pytest.mark.parametrize("flags", [(), ("--quiet",), ("--json",)])
def test_the_cli_says_when_its_exit_waits_for_a_kernel_build(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        flags: tuple[str, ...]) -> None:
    """A process that ends while a kernel loader still runs (what its exit then waits for)
    says so in one line on stderr, and only then; never with --quiet or --json. Only the
    process's entry point says it: a command run in process (a test) does not wait."""
    from conftest import write_recipe
    from safetensors.torch import load_file, save_file

    from mergekit_pcb.cli import KERNEL_BUILD_NOTE, main
    from mergekit_pcb.methods import compiled

    for i in range(2):
        save_file({"w": torch.full((4,), float(i))}, str(tmp_path / f"m{i}.safetensors"))
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "linear",
        "models": [{"model": str(tmp_path / f"m{i}.safetensors"),
                    "parameters": {"weight": 1.0}} for i in range(2)]})
    gate = threading.Event()
    probe = StagedKernel("probe", 0, lambda: "kernel" if gate.wait(30) else None,
                         lambda k: k == "kernel", register=False)
    monkeypatch.setattr(compiled, "_ALL", [probe])  # the kernels the exit would wait for
    monkeypatch.setattr("mergekit_pcb.cli.KERNEL_NOTE_AFTER_S", 0.1)

    def notes(out: str) -> int:
        capsys.readouterr()
        with pytest.raises(SystemExit) as done:  # the process's entry point, run in process
            main(["run", str(recipe), "-o", str(tmp_path / out), *flags])
        assert done.value.code == 0, capsys.readouterr().err
        assert load_file(str(tmp_path / out / "model.safetensors"))["w"].tolist() == [0.5] * 4
        return capsys.readouterr().err.splitlines().count(KERNEL_BUILD_NOTE)

    try:
        assert notes("before") == 0 and not probe.loading()  # no loader started
        probe.request()
        assert notes("while") == (0 if flags else 1) and probe.loading()
    finally:
        gate.set()
    assert probe.wait(timeout=30) == "kernel"
    assert notes("after") == 0  # loaded: nothing to wait for


def test_still_loading_lets_a_quick_load_finish_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loader that ends within `wait_s` is not reported (a cached load, about 1.6 s, is
    not the build the note speaks of); one that runs past it is."""
    from mergekit_pcb.methods import compiled

    gate = threading.Event()
    probe = StagedKernel("probe", 0, lambda: "kernel" if gate.wait(30) else None,
                         lambda k: k == "kernel", register=False)
    monkeypatch.setattr(compiled, "_ALL", [probe])
    assert compiled.still_loading(10) == []  # never requested: nothing to wait for
    probe.request()
    try:
        assert compiled.still_loading(0.05) == ["probe"]
        threading.Timer(0.2, gate.set).start()  # the load ends well within the wait
        assert compiled.still_loading(20) == []
    finally:
        gate.set()
    assert probe.ready() == "kernel"
