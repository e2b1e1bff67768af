"""Out-of-sample restoration by reprogramming (`osr-reprogram`).

A frozen image-restoration model f is wrapped by a small trainable module so that it
handles degradations it was not trained on, without changing f (Jiang and Han, IEEE TIP
2024, "Generalizing to Out-of-Sample Degradations via Model Reprogramming"). Layers:
`config` (the recipe schema), `frozen` (loading f and hashing its weights), `fourier` and
`modules` (the modules' math), `data` (paired images), `metrics`, `train`, `restore`
(applying a trained module) and `run` (the recipe's plan and run).
"""

METHOD = "osr-reprogram"
FORMAT_VERSION = "1"
MODULE_FILE = "module.safetensors"

__all__ = ["FORMAT_VERSION", "METHOD", "MODULE_FILE"]
