"""LLaVA-1.5 stage: export a fine-tuned open_clip tower into a HF LLaVA checkpoint and evaluate it on VQA.

Kept import-light on purpose: torch/transformers load only when a submodule is imported.
"""
