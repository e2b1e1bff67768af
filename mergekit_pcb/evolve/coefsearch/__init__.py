"""Coefficient search: a derivative-free optimizer (nevergrad) tunes a merge's numbers
(per-model `weight`, `lambda`, ...) against a fitness, as in the PCB paper's "PCB + ES".

Each candidate is scored on a merge built from parts cached once (`fastpath`), and the
result is written by the merge engine from `best_recipe.yaml`, so `pcbmerge run` on that
recipe gives the same bits.
"""

from __future__ import annotations
