"""The synthetic relational world: shapes with colours, sizes and spatial relations, written in the formats of
GQA, HNC, VQA v2, TextVQA and an ImageNet-style folder tree (docs/demo.md, "The world and the models")."""

from hnclip.synth.build import write_world, zeroshot_class_names
from hnclip.synth.config import WorldConfig, WorldConfigError
from hnclip.synth.language import caption_is_true, parse_caption

__all__ = ["WorldConfig", "WorldConfigError", "write_world", "caption_is_true", "parse_caption", "zeroshot_class_names"]
