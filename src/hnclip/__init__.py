"""hnc-clip: fine-tune CLIP with Hard Negative Captions and test the tower inside LLaVA-1.5."""
from importlib.metadata import PackageNotFoundError, version as _v

try:
    __version__ = _v("hnclip")
except PackageNotFoundError:  # run from a source tree on PYTHONPATH (e.g. a bare GPU machine), not installed
    __version__ = "0+source"
