"""Evaluation of CLIP encoders: HNC pairwise accuracy, zero-shot classification, feature drift, statistics.

Kept import-light on purpose: the submodules import torch and open_clip, this package does not.
"""
