"""nevergrad behind ask/tell, seeded, and rebuilt after a kill by replaying its log.

nevergrad's optimizers draw from the parametrization's `random_state`: seeded, the same
asks and tells give the same points (checked for every optimizer offered, with 1 to 3
workers). So the run state is the log of evaluated points and scores; `--resume` builds a
fresh optimizer with the seed, asks and tells the logged batches again (checking that each
asked point is the logged one, bit for bit), and goes on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from mergekit_pcb.errors import UserError

# What nevergrad is told for a candidate that could not be scored (NaN, an error): worse
# than any real loss, and finite, which every optimizer accepts.
FAILED_LOSS = 1e30
# The initial mutation spread: sigma = (upper - lower) / SPREAD per coordinate. nevergrad's
# bounded Array defaults to SPREAD = 6 (the range spans 6 sigma, its docstring), and its
# local optimizers start with a step well under one sigma (Cobyla, which NGOpt picks for
# one worker, and CMA, which its metamodel wraps for several): measured, their first 24
# candidates spanned 13-25 % of a coordinate's range, so NGOpt stayed next to the start.
# With SPREAD = 2 (sigma = half the range, centred on the midpoint) they span 39-75 %, and
# the optimizers that draw N(0, sigma) points (DE, PSO, RandomSearch) draw a normal folded
# once into the box by the "bouncing" bound, which is near uniform (density 0.48 at a bound
# against 0.51 at the centre, in units of 1/half-range). A smaller SPREAD would pile points
# on the bounds (nevergrad bounces once, then clips).
SPREAD = 2.0
_patched = False


def _import_nevergrad() -> Any:
    global _patched
    try:
        import nevergrad as ng
        from nevergrad.optimization import metamodel, optimizerlib
    except ImportError:
        raise UserError("coefficient-search needs nevergrad: pip install 'nevergrad>=1.0.12'"
                        ) from None
    if not _patched:
        # nevergrad 1.0.12's metamodel step calls float() on a 1-element array, which
        # numpy >= 2.3 refuses (TypeError). Turn that into nevergrad's own MetaModelFailure,
        # on which the optimizer takes its documented fallback (the base optimizer's ask).
        original = optimizerlib.learn_on_k_best

        def learn_on_k_best(*args: Any, **kwargs: Any) -> Any:
            try:
                return original(*args, **kwargs)
            except TypeError as e:
                raise metamodel.MetaModelFailure(str(e)) from None

        optimizerlib.learn_on_k_best = learn_on_k_best
        _patched = True
    return ng


def nevergrad_version() -> str:
    return str(_import_nevergrad().__version__)


class Search:
    """An optimizer over a box, asked in batches."""

    def __init__(self, name: str, low: Sequence[float], high: Sequence[float], budget: int,
                 batch: int, seed: int, spread: float = SPREAD) -> None:
        import numpy as np

        ng = _import_nevergrad()
        self._np = np
        lower, upper = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
        param = ng.p.Array(shape=(len(low),), lower=lower, upper=upper)
        param.set_mutation(sigma=(upper - lower) / spread)
        param.random_state = np.random.RandomState(seed)
        self.opt = ng.optimizers.registry[name](parametrization=param, budget=budget,
                                                num_workers=batch)
        self._pending: list[Any] = []

    def ask(self, k: int) -> list[list[float]]:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # nevergrad warns about budgets and CMA popsizes
            self._pending = [self.opt.ask() for _ in range(k)]
        return [[float(v) for v in c.value] for c in self._pending]

    def tell(self, losses: Sequence[float]) -> None:
        import warnings

        assert len(losses) == len(self._pending)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for c, loss in zip(self._pending, losses, strict=True):
                self.opt.tell(c, loss if math.isfinite(loss) else FAILED_LOSS)
        self._pending = []

    def replay(self, batches: Sequence[Sequence[tuple[list[float], float]]]) -> None:
        """Ask and tell the logged batches again; each asked point must be the logged one."""
        for n, batch in enumerate(batches):
            asked = self.ask(len(batch))
            for j, (got, (logged, _)) in enumerate(zip(asked, batch, strict=True)):
                if got != logged:
                    raise UserError(f"--resume: the optimizer does not replay its log (batch "
                                    f"{n}, candidate {j} differs); the run cannot be resumed "
                                    "with this nevergrad, use --force to start over")
            self.tell([loss for _, loss in batch])


def loss_of(score: float | None, maximize: bool) -> float:
    """nevergrad minimizes."""
    if score is None or not math.isfinite(score):
        return FAILED_LOSS
    return -score if maximize else score


__all__ = ["FAILED_LOSS", "SPREAD", "Search", "loss_of", "nevergrad_version"]
