"""Zero-shot classification: does fine-tuning keep CLIP's recognition?

Readers for an ImageNet-style folder tree and for CIFAR-10/100's official python format, a prompt-ensemble
classifier (CLIP's recipe: average the normalised text features of several templates per class), top-1
predictions, and results-table rows.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from hnclip.evaluate.encode import Preprocess, encode_images, encode_texts
from hnclip.loader import ImageSource
from hnclip.evaluate.stats import accuracy_rows, align_reference

DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a {}.",
    "a picture of a {}.",
    "an image showing a {}.",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
BENCHMARK = "zeroshot"
METRIC = "top1"
ITEM_KEY = ("item_id",)


class DatasetFormatError(ValueError):
    """A classification dataset on disk is not in the expected layout; the message names the path."""


@dataclass(frozen=True)
class ClassificationSet:
    """Images with integer labels into ``classnames``; ``item_ids`` identify items across models."""

    images: Sequence[ImageSource]
    labels: np.ndarray
    classnames: list[str]
    item_ids: list[str]

    def __post_init__(self) -> None:
        if not len(self.images) == len(self.labels) == len(self.item_ids):
            raise ValueError(
                f"{len(self.images)} images, {len(self.labels)} labels and {len(self.item_ids)} item ids"
            )


def class_name_from_folder(folder: str) -> str:
    """``golden_retriever`` → ``golden retriever``."""
    return folder.replace("_", " ")


def read_image_folder(root: str | os.PathLike) -> ClassificationSet:
    """Read ``root/{class_folder}/*.jpg`` (and other image suffixes); classes in sorted folder order.

    Item ids are paths relative to ``root``, so results of two models line up whatever the mount point.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetFormatError(f"image folder root {root} does not exist or is not a directory")
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    if not folders:
        raise DatasetFormatError(f"image folder root {root} has no class folders")
    images: list[Path] = []
    labels: list[int] = []
    for label, folder in enumerate(folders):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DatasetFormatError(f"class folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        images.extend(files)
        labels.extend([label] * len(files))
    return ClassificationSet(
        images=[str(p) for p in images],
        labels=np.asarray(labels, dtype=np.int64),
        classnames=[class_name_from_folder(f.name) for f in folders],
        item_ids=[p.relative_to(root).as_posix() for p in images],
    )


# --- CIFAR ----------------------------------------------------------------------------------------
# The official CIFAR "python version" archives store each batch as a pickle. That is the data format
# itself, not a checkpoint: call these readers only on the extracted official archive from the
# configured dataset path. The unpickler below additionally refuses any global other than the few
# numpy reconstructors a CIFAR batch needs, so a tampered file cannot run code.

_CIFAR_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    # Python 3 writes bytes into protocol-2 pickles via _codecs.encode (re-saved CIFAR copies); harmless.
    ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR_ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        if module == "_codecs":
            import codecs

            return codecs.encode
        return getattr(np, name)


def _numpy_reconstruct() -> Callable:
    """numpy's array reconstructor; CIFAR's files name ``numpy.core``, a deprecated alias in numpy 2."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    return multiarray._reconstruct


def load_cifar_pickle(path: str | os.PathLike) -> dict[bytes, object]:
    """Load one CIFAR batch/meta file (bytes keys, as written by Python 2)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"CIFAR file {path} is missing")
    try:
        with path.open("rb") as handle:
            content = _CifarUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as error:
        raise DatasetFormatError(f"CIFAR file {path} is not a valid CIFAR batch: {error}") from error
    if not isinstance(content, dict):
        raise DatasetFormatError(f"CIFAR file {path} holds a {type(content).__name__}, expected a dict")
    return content


def _cifar_field(content: dict, key: bytes, path: Path) -> object:
    if key not in content:
        raise DatasetFormatError(f"CIFAR file {path} lacks key {key!r}; has {sorted(content)}")
    return content[key]


def _cifar_images(content: dict, path: Path) -> np.ndarray:
    """N×3072 rows (1024 red, 1024 green, 1024 blue, each row-major 32×32) → N×32×32×3 uint8."""
    data = np.asarray(_cifar_field(content, b"data", path), dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetFormatError(f"CIFAR file {path}: data has shape {data.shape}, expected N×3072")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _cifar_directory(root: Path, folder_name: str) -> Path:
    """Accept either the extracted folder itself or its parent directory."""
    return root / folder_name if (root / folder_name).is_dir() else root


def read_cifar10(root: str | os.PathLike, split: str = "test") -> ClassificationSet:
    """CIFAR-10 python format: ``batches.meta``, ``data_batch_1..5`` (train) and ``test_batch``."""
    directory = _cifar_directory(Path(root), "cifar-10-batches-py")
    batch_names = {"test": ["test_batch"], "train": [f"data_batch_{i}" for i in range(1, 6)]}
    if split not in batch_names:
        raise ValueError(f"CIFAR-10 split must be one of {sorted(batch_names)}, got {split!r}")
    meta_path = directory / "batches.meta"
    names = _cifar_field(load_cifar_pickle(meta_path), b"label_names", meta_path)
    classnames = [class_name_from_folder(name.decode()) for name in names]
    images, labels, item_ids = [], [], []
    for name in batch_names[split]:
        path = directory / name
        content = load_cifar_pickle(path)
        batch_images = _cifar_images(content, path)
        images.append(batch_images)
        labels.extend(_cifar_field(content, b"labels", path))
        item_ids.extend(f"{name}/{i}" for i in range(len(batch_images)))
    return _cifar_set(np.concatenate(images), labels, classnames, item_ids, meta_path)


def read_cifar100(root: str | os.PathLike, split: str = "test") -> ClassificationSet:
    """CIFAR-100 python format: ``meta`` (fine label names) and one file per split (``train``, ``test``)."""
    directory = _cifar_directory(Path(root), "cifar-100-python")
    if split not in ("train", "test"):
        raise ValueError(f"CIFAR-100 split must be 'train' or 'test', got {split!r}")
    meta_path = directory / "meta"
    names = _cifar_field(load_cifar_pickle(meta_path), b"fine_label_names", meta_path)
    classnames = [class_name_from_folder(name.decode()) for name in names]
    path = directory / split
    content = load_cifar_pickle(path)
    images = _cifar_images(content, path)
    item_ids = [f"{split}/{i}" for i in range(len(images))]
    return _cifar_set(images, _cifar_field(content, b"fine_labels", path), classnames, item_ids, meta_path)


def _cifar_set(
    images: np.ndarray, labels: Sequence[int], classnames: list[str], item_ids: list[str], meta_path: Path
) -> ClassificationSet:
    label_array = np.asarray(labels, dtype=np.int64)
    if label_array.size and (label_array.min() < 0 or label_array.max() >= len(classnames)):
        raise DatasetFormatError(
            f"CIFAR labels span {label_array.min()}..{label_array.max()}, "
            f"but {meta_path} names {len(classnames)} classes"
        )
    # One array per image keeps the ClassificationSet interface (a sequence of images) without copies.
    return ClassificationSet(list(images), label_array, classnames, item_ids)


# --- classifier and predictions -------------------------------------------------------------------

def zero_shot_classifier(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """C×D class embeddings: per class, the mean of its normalised prompt features, renormalised."""
    if not templates:
        raise ValueError("at least one prompt template is needed")
    for template in templates:
        if "{}" not in template:
            raise ValueError(f"prompt template {template!r} has no '{{}}' for the class name")
    prompts = [template.format(name) for name in classnames for template in templates]
    features = encode_texts(
        model, tokenizer, prompts, batch_size=batch_size, device=device, progress=progress
    )
    per_class = features.reshape(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1)


def zero_shot_predictions(
    model: torch.nn.Module,
    preprocess: Preprocess,
    images: Sequence[ImageSource],
    classifier: torch.Tensor,
    *,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    num_workers: int = 0,
    progress: bool = True,
) -> np.ndarray:
    """Top-1 class index per image: argmax of the cosine similarity to each class embedding."""
    image_features = encode_images(
        model, images, preprocess, batch_size=batch_size, device=device, num_workers=num_workers,
        progress=progress,
    )
    return (image_features @ classifier.T).argmax(dim=1).numpy()


def zeroshot_correctness(dataset: ClassificationSet, predictions: np.ndarray) -> pd.DataFrame:
    """Per-item results (item_id, label, prediction, correct): what later models are compared against."""
    predictions = np.asarray(predictions)
    if predictions.shape != dataset.labels.shape:
        raise ValueError(f"{predictions.shape[0]} predictions for {dataset.labels.shape[0]} items")
    per_item = pd.DataFrame({
        "item_id": dataset.item_ids,
        "label": dataset.labels,
        "prediction": predictions.astype(np.int64),
    })
    per_item["correct"] = per_item["label"] == per_item["prediction"]
    repeated = per_item["item_id"].duplicated()
    if repeated.any():
        first = per_item.loc[repeated, "item_id"].iloc[0]
        raise DatasetFormatError(f"item id {first!r} appears more than once")
    return per_item


def zeroshot_report(
    per_item: pd.DataFrame,
    classnames: Sequence[str],
    *,
    model: str,
    dataset: str | None = None,
    reference: Mapping[str, pd.DataFrame] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    benchmark: str = BENCHMARK,
) -> list[dict]:
    """Results-table rows of top-1 accuracy: 'all' and each class (``class:<name>``).

    Items are independent (one image each), so the bootstrap resamples items. ``reference`` maps a name
    to another model's ``zeroshot_correctness`` frame on the same items (joined on ``item_id``); rows
    then carry ``delta_vs_<name>`` and exact-McNemar ``p_vs_<name>``. ``dataset``, when given, is
    written into every row so several zero-shot sets can share the results table.
    """
    labels = per_item["label"].to_numpy()
    subsets = [("all", np.ones(len(per_item), dtype=bool))]
    subsets += [(f"class:{name}", labels == index) for index, name in enumerate(classnames)]
    references = {
        name: align_reference(per_item, frame, ITEM_KEY, name) for name, frame in (reference or {}).items()
    }
    base = {"model": model, "benchmark": benchmark}
    if dataset is not None:
        base["dataset"] = dataset
    return accuracy_rows(
        per_item["correct"].to_numpy(), None, subsets, base=base, metric=METRIC, references=references,
        n_boot=n_boot, seed=seed, level=level,
    )
