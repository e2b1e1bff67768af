"""The `osr-reprogram` recipe: YAML validated into typed config (extra keys forbidden).

    merge_method: osr-reprogram
    model:                       # the frozen restorer: arch + weights, or hf
      arch: package.module:factory
      arch_kwargs: {width: 16}
      weights: denoiser.safetensors
      # hf: path/to/swin2sr     (a Hugging Face image-to-image model directory)
    data:                        # each split: folders paired by file name, or a tensor file
      train: {degraded: haze/train/degraded, clean: haze/train/clean}
      validation: {degraded: haze/val/degraded, clean: haze/val/clean}
      test: {tensors: haze-test.safetensors}   # held out: reported, never selected on
      reference: known/clean      # fda: images of f's known domain [default: train clean]
    parameters: {mode: wave, steps: 300}
    seed: 0
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from mergekit_pcb.errors import RecipeError, UserError
from mergekit_pcb.recipe.schema import StrictModel, validate_mapping
from mergekit_pcb.reprogram import METHOD
from mergekit_pcb.usercode import check_plain_data

MODES = ("wave", "fourier", "fda")
LOSSES = ("l1", "charbonnier")
SPLITS = ("train", "validation", "test")
DEFAULT_BETAS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)


class ModelSpec(StrictModel):
    """The frozen model: `arch` (code, with `arch_kwargs`) and `weights` (.safetensors), or
    `hf` (a local Hugging Face image-to-image model directory, e.g. Swin2SR)."""

    arch: str | None = None
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None
    hf: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if self.hf is not None and (self.arch is not None or self.weights is not None):
            raise ValueError("give either 'hf' or 'arch' with 'weights', not both")
        if self.hf is None and (self.arch is None or self.weights is None):
            raise ValueError("needs 'arch' and 'weights' (or 'hf')")
        if self.hf is not None and self.arch_kwargs:
            raise ValueError("'arch_kwargs' goes with 'arch', not with 'hf'")
        return self


class PairSource(StrictModel):
    """Paired images: folders `degraded` and `clean` (PNG/JPEG, paired by file name), or
    `tensors`, a .safetensors file holding `degraded` and `clean` as (N, C, H, W)."""

    degraded: str | None = None
    clean: str | None = None
    tensors: str | None = None

    @model_validator(mode="after")
    def _one_form(self) -> PairSource:
        folders = self.degraded is not None or self.clean is not None
        if folders == (self.tensors is not None):
            raise ValueError("needs either 'degraded' and 'clean' folders or 'tensors'")
        if folders and (self.degraded is None or self.clean is None):
            raise ValueError("needs both 'degraded' and 'clean'")
        return self


class DataSpec(StrictModel):
    train: PairSource
    validation: PairSource
    test: PairSource
    reference: str | None = None  # fda: a folder of images or a tensor file ('clean')


class Parameters(StrictModel):
    mode: Literal["wave", "fourier", "fda"] = "wave"
    channels: Literal[1, 3] = 3
    steps: int = Field(300, ge=0)
    batch_size: int = Field(8, ge=1)
    crop: int = Field(32, ge=4)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    loss: Literal["l1", "charbonnier"] = "charbonnier"
    ssim_weight: float = Field(0.1, ge=0)
    eval_every: int = Field(25, ge=1)
    patience: int = Field(4, ge=1)
    hidden: int = Field(16, ge=1, le=1024)
    bins: int = Field(16, ge=2, le=4096)
    beta: float | list[float] = Field(default_factory=lambda: list(DEFAULT_BETAS))
    fda_size: int = Field(64, ge=4, le=4096)

    @model_validator(mode="after")
    def _betas(self) -> Parameters:
        for b in self.betas:
            if not 0.0 <= b <= 1.0:
                raise ValueError(f"beta values lie in [0, 1] (normalized radial frequency), "
                                 f"got {b}")
        return self

    @property
    def betas(self) -> list[float]:
        return [self.beta] if isinstance(self.beta, (int, float)) else list(self.beta)


class ReprogramRecipe(StrictModel):
    merge_method: Literal["osr-reprogram"]
    name: str | None = None
    model: ModelSpec
    data: DataSpec
    parameters: Parameters = Field(default_factory=Parameters)
    seed: int | None = None


PARAMETER_DOCS = {
    "mode": "wave (amplitude/phase through f, the paper), fourier (amplitude gain by radial "
            "frequency), fda (low-frequency amplitude from reference images; no training)",
    "channels": "image channels (1 grey, 3 RGB)",
    "steps": "training steps (AdamW)",
    "batch_size": "random crops per step",
    "crop": "crop size in pixels (seeded random crops and flips)",
    "lr": "AdamW learning rate",
    "weight_decay": "AdamW weight decay",
    "loss": "pixel loss",
    "ssim_weight": "weight of (1 - SSIM) added to the pixel loss",
    "eval_every": "steps between validation evaluations",
    "patience": "evaluations without a better validation PSNR before stopping",
    "hidden": "wave: channels of the small input and fusion convolutions",
    "bins": "fourier: radial frequency bins of the gain (interpolated at any image size)",
    "beta": "fda: low-frequency band (normalized radial frequency); a list is chosen on "
            "validation, 0 is the identity",
    "fda_size": "fda: size of the stored mean amplitude spectrum",
}


def parse_reprogram_recipe(data: Any, source: str) -> ReprogramRecipe:
    recipe = validate_mapping(ReprogramRecipe, data, source)
    check_plain_data(recipe.model.arch_kwargs, f"{source}: model.arch_kwargs")
    arch = recipe.model.arch
    if arch is not None and (":" not in arch or arch.startswith(":") or arch.endswith(":")):
        raise RecipeError(f"{source}: model.arch: '{arch}' is not package.module:factory")
    if recipe.merge_method != METHOD:  # pragma: no cover - Literal already checks
        raise RecipeError(f"{source}: merge_method: expected {METHOD}")
    return recipe


def resolve_path(ref: str, root: Path, key: str, *, directory: bool | None) -> Path:
    """A recipe path: absolute, else relative to the recipe's directory, else to the cwd.
    `directory`: True a folder, False a file, None either."""
    p = Path(ref).expanduser()
    candidates = [p] if p.is_absolute() else [root / p, Path.cwd() / p]
    for c in candidates:
        try:
            if c.is_dir() if directory else c.is_file() if directory is False else c.exists():
                return c
        except OSError:
            continue
    what = {True: "folder", False: "file", None: "path"}[directory]
    raise UserError(f"{key}: {what} not found: {ref} (looked in "
                    f"{', '.join(dict.fromkeys(str(c.parent) for c in candidates))})")
