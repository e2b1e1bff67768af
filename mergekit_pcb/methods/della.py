"""`della` and `della_linear`: DELLA-Merging's MagPrune (Deep et al., 2024), as mergekit
0.1.5 defines it.

Per model and tensor, each task-vector entry survives with a probability that grows with
its magnitude rank along dim 1 (the input features of a 2-D weight; a 1-D tensor is one
row): pᵢ = density − ε + 2ε·(rankᵢ − 1)/(m − 1). With `rescale` (the default) survivors
are scaled back to the L1 norm of the unpruned task vector, as mergekit does (the paper
divides each by its pᵢ). Then TIES's sign election with `normalize` (`della`), or plain
task arithmetic (`della_linear`). Draws come from the engine's generator for (seed,
tensor, model position), so a seed fixes the masks on any machine; they are not
mergekit's draws (mergekit uses torch's global generator).
"""

from __future__ import annotations

import torch

from mergekit_pcb.errors import CheckpointError, RecipeError
from mergekit_pcb.methods.base import (
    DENSITY,
    LAMBDA,
    WEIGHT,
    MergeMethod,
    ParamSpec,
    Range,
    TensorInputs,
)
from mergekit_pcb.methods.ops import (
    combine_weighted,
    della_magprune,
    della_magprune_in_rows,
    sliceable,
)
from mergekit_pcb.methods.ties import INT8_MASK

# One range for every method with an `epsilon` (test_hostile_recipes: one rule per name).
# DELLA needs density ± ε inside (0, 1), so ε < 0.5 whatever the density.
EPSILON_RANGE = Range(0.0, 0.5, high_open=True)
EPSILON = ParamSpec("epsilon", 0.15, "spread of the keep probabilities around density "
                    "(density ± epsilon must lie in (0, 1))", per_model=True,
                    bounds=EPSILON_RANGE)
RESCALE_DELLA = ParamSpec("rescale", True, "scale survivors back to the task vector's L1 "
                          "norm (mergekit's rescale)", kind=bool)


class _Della(MergeMethod):
    uses_rng = True
    sign_consensus = False

    def merge(self, inputs: TensorInputs) -> torch.Tensor:
        assert inputs.base is not None and inputs.generators is not None
        rescale = bool(inputs.params["rescale"])
        deltas = []
        for i, (m, p, g) in enumerate(zip(inputs.models, inputs.model_params,
                                          inputs.generators, strict=True)):
            d, e = p["density"], p["epsilon"]
            if d < 1 and not (d - e > 0 and d + e < 1):
                # mergekit raises this mid-merge too. It is not a plan-time check because
                # every value inside a parameter's range must validate with the defaults
                # (density 1e-6 with the default epsilon 0.15 would not).
                raise RecipeError(
                    f"models[{i}].parameters: {self.name} needs density ± epsilon inside "
                    f"(0, 1), got density {d:g}, epsilon {e:g} (tensor '{inputs.name}')")
            shape = inputs.base.shape
            per_row = shape[1] if len(shape) >= 2 else inputs.base.numel()
            if p["density"] < 1 and per_row == 1:
                # One entry per row: the rank normalisation is 0/0 (mergekit fails too).
                raise CheckpointError(
                    f"tensor '{inputs.name}': {self.name} ranks entries along each row and "
                    f"shape {list(shape)} has one per row; route it to another "
                    "method with a tensors: rule")
            if len(shape) >= 2 and sliceable(inputs) is not None:
                # A large matrix a block of rows at a time: one tensor's worth of scratch
                # instead of a dozen (ranks, their ranks, probabilities, draws, masks).
                deltas.append(della_magprune_in_rows(inputs.base, m, d, e, g, rescale))
                continue
            deltas.append(della_magprune(m - inputs.base, d, e, g, rescale))
        return combine_weighted(inputs, deltas, sign_consensus=self.sign_consensus)


class Della(_Della):
    name = "della"
    summary = "DELLA MagPrune (rank-based random drop), then TIES sign election"
    sign_consensus = True
    params = (WEIGHT, DENSITY, EPSILON, LAMBDA,
              ParamSpec("normalize", True, "divide by the sum of the agreeing weights",
                        kind=bool),
              RESCALE_DELLA, INT8_MASK)


class DellaLinear(_Della):
    name = "della_linear"
    summary = "DELLA MagPrune (rank-based random drop), then task arithmetic"
    params = (WEIGHT, DENSITY, EPSILON, LAMBDA,
              ParamSpec("normalize", False, "divide by the sum of the weights", kind=bool),
              RESCALE_DELLA, INT8_MASK)
