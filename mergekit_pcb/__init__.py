"""mergekit-pcb: recipe-driven, streaming merges of fine-tuned checkpoints."""

__version__ = "0.1.0"
