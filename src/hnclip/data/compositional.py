"""Readers for the field's compositionality benchmarks, in their published formats, and ARO's word-order negatives.

Every caption benchmark becomes one item table (``ITEM_COLUMNS``), one row per test item: ``benchmark``,
``subset``, ``item_id`` (str, unique within a table), ``image_path``, ``bbox`` ([x, y, w, h] floats to crop the
image to before encoding, as ARO does for VG-Relation / VG-Attribution; else None), ``positive`` (the true
caption), ``negatives`` (one or more false captions; the item is correct when s(image, positive) > s(image,
every negative)), and ``vg_id`` / ``coco_id`` / ``flickr_id`` (nullable Int64: the image in those collections,
for leakage checks). Winoground has its own table (``WINOGROUND_COLUMNS``), Visual Genome's image list another.
A missing image is an error, or with ``on_missing_image="skip"`` its rows are dropped, logged and counted in
``frame.attrs["dropped"]``, like every other skip.

Formats, as published (checked against the sources named; the unit tests hold records copied from them):

* SugarCrepe (RAIVNLab/sugar-crepe ``data/<category>.json``, read by ``main_eval.py`` and LAION-AI/CLIP_benchmark
  ``clip_benchmark/datasets/sugar_crepe.py``): one file per category, a JSON object ``{"<key>": {"filename":
  "000000085329.jpg", "caption": ..., "negative_caption": ...}}``; keys are decimal strings, not always
  contiguous (swap_obj.json lacks "108"); images are COCO val2017 ``images_dir/<filename>``, so the file name
  is the zero-padded COCO id. One negative per item; ``subset`` is the category; ``item_id`` "<category>:<key>".
* ARO VG-Relation / VG-Attribution (mertyg/vision-language-models-are-bows ``dataset_zoo/aro_datasets.py``): a
  JSON list of records with ``image_path`` (joined to the images folder), ``bbox_x``, ``bbox_y``, ``bbox_w``,
  ``bbox_h`` (the crop, PIL box (x, y, x + w, y + h)), ``true_caption``, ``false_caption``, and
  ``relation_name`` (VG-Relation) or ``attributes`` (VG-Attribution, two strings); ``image_id`` is read for
  ``vg_id`` (the image file's numeric stem when absent). The files live on Google Drive and no record of them
  was reachable: these are the fields ARO's code reads, not a checked record. ARO scores argmax over [false,
  true], so a tie is a failure, as here. Macro averages (``evaluate_scores`` and the notebook
  ``notebooks/Replicate ARO! VG-Relation, VG-Attribution.ipynb``): VG-Relation averages the per-relation
  accuracies over every relation not in the notebook's exclusion list (``ARO_VG_RELATION_EXCLUDED``, verbatim;
  issue #37: the json keeps them, the results drop them); VG-Attribution averages over attribute pairs
  ``f"{attributes[0]}_{attributes[1]}"`` with at least 25 items (``ARO_VG_ATTRIBUTION_MIN_COUNT``). ``subset``
  is "vg_relation:<relation_name>" / "vg_attribution:<a0>_<a1>", ARO's groups; :func:`aro_macro_accuracy`
  applies both rules.
* COCO-Order / Flickr30k-Order (same file, ``COCO_Order`` / ``Flickr30k_Order``): BLIP's Karpathy test files
  (salesforce/BLIP ``data/coco_karpathy_dataset.py``, ``data/flickr30k_dataset.py``): a JSON list of
  ``{"image": "val2014/COCO_val2014_000000391895.jpg" | "flickr30k-images/1007129816.jpg", "caption": [5
  strings]}``, the image at ``images_dir/<image>``. Each caption is an item: positive = ``pre_caption(caption,
  30)``, negatives = ``pre_caption(perturbation(caption), 30)`` for ARO's four perturbations, in ARO's order.
  ARO counts an item correct when argmax over [true, perturbed...] is 0, so a perturbation that leaves the
  caption unchanged ties and counts for the model; dropping such a negative (done here, counted) keeps that
  under the strict rule. The perturbations are rebuilt here, seeded (``ORDER_PERTURBATIONS_SOURCE``).
* Winoground (facebook/winoground on the Hugging Face hub, its loading script ``winoground.py`` and
  ``statistics/compute_statistics.py``): ``data/examples.jsonl``, one JSON object a line with ``id`` (int),
  ``image_0``, ``image_1`` (file stems such as "ex_0_img_0"), ``caption_0``, ``caption_1``, ``tag``,
  ``secondary_tag`` (may be ""), ``num_main_preds`` (int), ``collapsed_tag`` ("Object", "Relation", "Both");
  images are ``images/<stem>.png`` inside ``data/images.zip`` (pass the extracted ``images`` folder). The hub's
  later Parquet conversion (images embedded) is not read here.
* Visual Genome ``image_data.json`` (visualgenome.org; huggingface/datasets ``datasets/visual_genome``): a JSON
  list of ``{"width", "url", "height", "image_id", "coco_id", "flickr_id"}``, the last two null when the image
  is not from that collection.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from hnclip.data import (
    DataFormatError,
    OnMissingImage,
    check_images_dir,
    missing_image_files,
    record_field,
    rows_with_images,
    string_field,
)
from hnclip.data import load_json as load_data_json

log = logging.getLogger(__name__)

ITEM_COLUMNS = ("benchmark", "subset", "item_id", "image_path", "bbox", "positive", "negatives", "vg_id", "coco_id",
                "flickr_id")
ID_COLUMNS = ("vg_id", "coco_id", "flickr_id")
WINOGROUND_COLUMNS = ("item_id", "image_0", "image_1", "caption_0", "caption_1", "tag", "secondary_tag",
                      "num_main_preds", "collapsed_tag")
VG_IMAGE_COLUMNS = ("vg_id", "coco_id", "flickr_id")


class CompositionalFormatError(DataFormatError):
    """A compositionality benchmark file breaks its published format; the message names the file and record."""


# --------------------------------------------------------------------------------------------------------
# Loading JSON with errors that name the file and record


def load_json(path: str | os.PathLike) -> Any:
    return load_data_json(path, CompositionalFormatError)


def load_jsonl(path: str | os.PathLike) -> list[tuple[int, Any]]:
    """(line number, record) of each non-blank line of a JSON-lines file."""
    path = Path(path)
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")
    except UnicodeDecodeError as error:
        raise CompositionalFormatError(f"{path}: not valid UTF-8 (byte {error.start}: {error.reason})") from error
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise CompositionalFormatError(f"{path}: line {number}: malformed JSON: {error.msg}") from error
    return records


def _field(path: Path, record: Any, key: str, what: str) -> Any:
    return record_field(path, record, key, what, CompositionalFormatError)


def _string(path: Path, record: Any, key: str, what: str) -> str:
    return string_field(path, record, key, what, CompositionalFormatError)


def _integer(path: Path, value: Any, what: str, key: str) -> int:
    """An id written as a JSON integer or a string of digits (bools refused: ``True`` is not an id)."""
    if type(value) is int:
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    raise CompositionalFormatError(f"{path}: {what}: {key!r} must be an integer, got {value!r}")


def _number(path: Path, record: Any, key: str, what: str) -> float:
    value = _field(path, record, key, what)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CompositionalFormatError(f"{path}: {what}: {key!r} must be a number, got {value!r}")
    return float(value)


def _list_of_strings(path: Path, record: Any, key: str, what: str) -> list[str]:
    value = _field(path, record, key, what)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise CompositionalFormatError(f"{path}: {what}: {key!r} must be a list of strings, got {value!r}")
    return value


def _id_from_name(path: Path, name: str, pattern: re.Pattern, what: str) -> int:
    match = pattern.search(name)
    if match is None:
        raise CompositionalFormatError(f"{path}: {what}: image name {name!r} does not match {pattern.pattern!r}")
    return int(match.group(1))


# --------------------------------------------------------------------------------------------------------
# Item tables


def _item_frame(
    rows: list[dict], *, referenced_by: Path, on_missing_image: OnMissingImage, dropped: Mapping[str, int] | None = None
) -> pd.DataFrame:
    """Rows → an item table (``ITEM_COLUMNS``, ids as nullable Int64), minus the rows of missing images."""
    n_read = len(rows)
    rows, missing = rows_with_images(rows, id_key="item_id", what="item", referenced_by=referenced_by,
                                     on_missing_image=on_missing_image, error=CompositionalFormatError)
    data = {column: [row[column] for row in rows] for column in ITEM_COLUMNS}
    for column in ID_COLUMNS:  # straight to Int64: through float64 a None would turn the ids into floats first
        data[column] = pd.array(data[column], dtype="Int64")
    frame = pd.DataFrame(data, columns=list(ITEM_COLUMNS))
    frame.attrs["dropped"] = {**(dropped or {}), "missing_image": n_read - len(rows)}
    frame.attrs["missing_images"] = sorted(Path(p).name for p in missing)
    return frame


def _item(benchmark: str, subset: str, item_id: str, image_path: str, positive: str, negatives: list[str], *,
          bbox: list[float] | None = None, vg_id: int | None = None, coco_id: int | None = None,
          flickr_id: int | None = None) -> dict:
    return {"benchmark": benchmark, "subset": subset, "item_id": item_id, "image_path": image_path, "bbox": bbox,
            "positive": positive, "negatives": negatives, "vg_id": vg_id, "coco_id": coco_id, "flickr_id": flickr_id}


# --------------------------------------------------------------------------------------------------------
# SugarCrepe

SUGARCREPE_CATEGORIES = ("replace_obj", "replace_att", "replace_rel", "swap_obj", "swap_att", "add_obj", "add_att")
SUGARCREPE_AGGREGATES = {
    "replace": ("replace_obj", "replace_att", "replace_rel"),
    "swap": ("swap_obj", "swap_att"),
    "add": ("add_obj", "add_att"),
}
# COCO 2017 file names are the image id zero-padded to 12 digits.
COCO2017_NAME = re.compile(r"^(\d{12})\.jpg$")


def _sugarcrepe_rows(path: Path, category: str, images_dir: Path) -> list[dict]:
    document = load_json(path)
    if not isinstance(document, dict):
        raise CompositionalFormatError(f"{path}: expected a JSON object of items keyed by index, got "
                                       f"{type(document).__name__}")
    rows = []
    for key, record in document.items():
        what = f"item {key!r}"
        filename = _string(path, record, "filename", what)
        rows.append(_item(
            "sugarcrepe", category, f"{category}:{key}", str(images_dir / filename),
            _string(path, record, "caption", what), [_string(path, record, "negative_caption", what)],
            coco_id=_id_from_name(path, filename, COCO2017_NAME, what),
        ))
    return rows


def read_sugarcrepe(
    json_dir: str | os.PathLike,
    images_dir: str | os.PathLike,
    *,
    categories: Sequence[str] = SUGARCREPE_CATEGORIES,
    on_missing_image: OnMissingImage = "error",
) -> pd.DataFrame:
    """SugarCrepe's ``<category>.json`` files in ``json_dir`` (COCO val2017 images in ``images_dir``), one item each.

    Every requested category's file must be there: a benchmark silently missing a category would report a
    different aggregate.
    """
    unknown = sorted(set(categories) - set(SUGARCREPE_CATEGORIES))
    if unknown:
        raise ValueError(f"unknown SugarCrepe categories {unknown}; known: {SUGARCREPE_CATEGORIES}")
    json_dir, images_dir = Path(json_dir), check_images_dir(images_dir)
    rows = []
    for category in categories:
        path = json_dir / f"{category}.json"
        if not path.is_file():
            raise FileNotFoundError(f"SugarCrepe category file {path} is missing")
        rows += _sugarcrepe_rows(path, category, images_dir)
    return _item_frame(rows, referenced_by=json_dir, on_missing_image=on_missing_image)


# --------------------------------------------------------------------------------------------------------
# ARO: VG-Relation and VG-Attribution

VG_RELATION = "vg_relation"
VG_ATTRIBUTION = "vg_attribution"
# Relations ARO's notebook drops before its VG-Relation macro average (named `symmetric` there), verbatim.
ARO_VG_RELATION_EXCLUDED = (
    'adjusting', 'attached to', 'between', 'bigger than', 'biting', 'boarding', 'brushing', 'chewing',
    'cleaning', 'climbing', 'close to', 'coming from', 'coming out of', 'contain', 'crossing', 'dragging',
    'draped over', 'drinking', 'drinking from', 'driving', 'driving down', 'driving on', 'eating from',
    'eating in', 'enclosing', 'exiting', 'facing', 'filled with', 'floating in', 'floating on', 'flying',
    'flying above', 'flying in', 'flying over', 'flying through', 'full of', 'going down', 'going into',
    'going through', 'grazing in', 'growing in', 'growing on', 'guiding', 'hanging from', 'hanging in',
    'hanging off', 'hanging over', 'higher than', 'holding onto', 'hugging', 'in between', 'jumping off',
    'jumping on', 'jumping over', 'kept in', 'larger than', 'leading', 'leaning over', 'leaving', 'licking',
    'longer than', 'looking in', 'looking into', 'looking out', 'looking over', 'looking through',
    'lying next to', 'lying on top of', 'making', 'mixed with', 'mounted on', 'moving', 'on the back of',
    'on the edge of', 'on the front of', 'on the other side of', 'opening', 'painted on', 'parked at',
    'parked beside', 'parked by', 'parked in', 'parked in front of', 'parked near', 'parked next to',
    'perched on', 'petting', 'piled on', 'playing', 'playing in', 'playing on', 'playing with', 'pouring',
    'reaching for', 'reading', 'reflected on', 'riding on', 'running in', 'running on', 'running through',
    'seen through', 'sitting behind', 'sitting beside', 'sitting by', 'sitting in front of', 'sitting near',
    'sitting next to', 'sitting under', 'skiing down', 'skiing on', 'sleeping in', 'sleeping on', 'smiling at',
    'sniffing', 'splashing', 'sprinkled on', 'stacked on', 'standing against', 'standing around',
    'standing behind', 'standing beside', 'standing in front of', 'standing near', 'standing next to',
    'staring at', 'stuck in', 'surrounding', 'swimming in', 'swinging', 'talking to', 'topped with', 'touching',
    'traveling down', 'traveling on', 'tying', 'typing on', 'underneath', 'wading in', 'waiting for',
    'walking across', 'walking by', 'walking down', 'walking next to', 'walking through', 'working in',
    'working on', 'worn on', 'wrapped around', 'wrapped in', 'by', 'of', 'near', 'next to', 'with', 'beside',
    'on the side of', 'around',
)
# ARO's VG_Attribution.evaluate_scores skips attribute pairs with fewer items than this.
ARO_VG_ATTRIBUTION_MIN_COUNT = 25
VG_IMAGE_NAME = re.compile(r"^(\d+)\.\w+$")


def _vg_bbox(path: Path, record: Any, what: str) -> list[float]:
    return [_number(path, record, key, what) for key in ("bbox_x", "bbox_y", "bbox_w", "bbox_h")]


def _vg_id(path: Path, record: Any, image_name: str, what: str) -> int:
    """The record's ``image_id``, else the numeric stem of its image file (VG files are ``<image_id>.jpg``)."""
    if isinstance(record, dict) and "image_id" in record:
        return _integer(path, record["image_id"], what, "image_id")
    return _id_from_name(path, Path(image_name).name, VG_IMAGE_NAME, what)


def _relation_group(path: Path, record: Any, what: str) -> str:
    return _string(path, record, "relation_name", what)


def _attribution_group(path: Path, record: Any, what: str) -> str:
    attributes = _list_of_strings(path, record, "attributes", what)
    if len(attributes) != 2:
        raise CompositionalFormatError(f"{path}: {what}: 'attributes' must hold two attributes, got {attributes!r}")
    return f"{attributes[0]}_{attributes[1]}"  # ARO's own group key


def _read_vg(
    json_path: str | os.PathLike, images_dir: str | os.PathLike, part: str,
    group_of: Callable[[Path, Any, str], str], on_missing_image: OnMissingImage,
) -> pd.DataFrame:
    path = Path(json_path)
    records = load_json(path)
    if not isinstance(records, list):
        raise CompositionalFormatError(f"{path}: expected a JSON list of test cases, got {type(records).__name__}")
    images_dir = check_images_dir(images_dir)
    rows, degenerate = [], 0
    for index, record in enumerate(records):
        what = f"test case #{index}"
        image_name = _string(path, record, "image_path", what)
        bbox = _vg_bbox(path, record, what)
        if bbox[2] <= 0 or bbox[3] <= 0:  # an empty crop cannot be encoded
            log.warning("%s: %s has an empty box %s; skipped", path, what, bbox)
            degenerate += 1
            continue
        rows.append(_item(
            "aro", f"{part}:{group_of(path, record, what)}", f"{part}:{index}", str(images_dir / image_name),
            _string(path, record, "true_caption", what), [_string(path, record, "false_caption", what)],
            bbox=bbox, vg_id=_vg_id(path, record, image_name, what),
        ))
    return _item_frame(rows, referenced_by=path, on_missing_image=on_missing_image,
                       dropped={"degenerate_bbox": degenerate})


def read_vg_relation(
    json_path: str | os.PathLike, images_dir: str | os.PathLike, *, on_missing_image: OnMissingImage = "error"
) -> pd.DataFrame:
    """ARO's ``visual_genome_relation.json``: subset "vg_relation:<relation_name>", item id "vg_relation:<index>"."""
    return _read_vg(json_path, images_dir, VG_RELATION, _relation_group, on_missing_image)


def read_vg_attribution(
    json_path: str | os.PathLike, images_dir: str | os.PathLike, *, on_missing_image: OnMissingImage = "error"
) -> pd.DataFrame:
    """ARO's ``visual_genome_attribution.json``: subset "vg_attribution:<a0>_<a1>", item id "vg_attribution:<i>"."""
    return _read_vg(json_path, images_dir, VG_ATTRIBUTION, _attribution_group, on_missing_image)


# --------------------------------------------------------------------------------------------------------
# ARO: COCO-Order and Flickr30k-Order

ORDER_PERTURBATIONS_SOURCE = (
    "built here from ARO's dataset_zoo/perturbations.py (TextShuffler), seeded per caption with "
    "numpy.random.default_rng([seed, record_index, caption_index]); not ARO's own draws (ARO generates them "
    "at load time from the global RNG, spaCy en_core_web_sm tags and nltk.word_tokenize, and publishes no files)"
)
ARO_MAX_WORDS = 30  # COCO_Order / Flickr30k_Order truncate every caption option to 30 words
MAX_REDRAWS = 100
Tagger = Callable[[str], list[tuple[str, str]]]
NOUN_TAGS = frozenset({"NN", "NNS", "NNP", "NNPS"})
ADJECTIVE_TAGS = frozenset({"JJ", "JJR", "JJS"})


def aro_pre_caption(caption: str, max_words: int | None = ARO_MAX_WORDS) -> str:
    """BLIP's / ARO's ``pre_caption``: lower-case, drop ``.!"()*#:;~``, squeeze spaces, keep ``max_words`` words."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    return caption if max_words is None or len(words) <= max_words else " ".join(words[:max_words])


_TOKEN = re.compile(r"n't|[A-Za-z0-9]+(?:[-.'][A-Za-z0-9]+)*|'[A-Za-z]+|[^\sA-Za-z0-9]")


def tokenize_caption(caption: str) -> list[str]:
    """Words, clitics ("n't", "'s") and punctuation marks as separate tokens, like nltk.word_tokenize on captions.

    ARO tokenizes with nltk.word_tokenize (trigram shuffles) and spaCy (noun/adjective shuffles); neither's
    data can be installed here, and on caption text both split exactly these pieces.
    """
    caption = re.sub(r"(\w)n't\b", r"\1 n't", caption)
    caption = re.sub(r"(\w)('s|'re|'ve|'ll|'d|'m)\b", r"\1 \2", caption, flags=re.IGNORECASE)
    return _TOKEN.findall(caption)


# The heuristic tagger's lexicon. Only the noun / adjective / other split matters to the perturbations, so
# the closed classes are listed and everything else falls back on suffixes, then on "noun".
_CLOSED_CLASS = {
    "DT": "a an the this that these those some any each every no another all both either neither",
    "PRP$": "his her their its my your our",
    "PRP": "he she it they them him we us i you me himself herself itself themselves someone something "
           "somebody everyone anyone",
    "IN": "on in at of with near by under over behind above below beside besides between among across through "
          "into onto from for about around along against toward towards during inside outside atop upon within "
          "without beneath underneath past like than while as if because",
    "CC": "and or but nor yet",
    "TO": "to",
    "RB": "very too together here there not n't up down out off away back next also just almost only still again "
          "outdoors indoors nearby ahead",
    "WDT": "which what who whom whose where when how",
    "VBZ": "is has does 's sits stands holds rides looks eats plays walks flies lays lies waits carries wears "
           "watches stares runs jumps sleeps hangs rests shows swings throws catches grazes drinks contains "
           "covers features leans talks uses reads smiles poses cuts pulls pushes crosses drives goes gets "
           "takes makes seems appears",
    "VBP": "are have do 're 've am sit stand hold ride look eat play walk fly lay lie wait carry wear watch stare "
           "run jump sleep hang rest swing throw catch graze drink lean talk use read smile pose pull push cross "
           "drive go get take make seem appear",
    "VBD": "was were did had sat stood rode ate flew laid went got took",
    "VBN": "been done gone seen taken made held left",
    "VB": "be",
    "MD": "can could will would may might must should",
    "CD": "one two three four five six seven eight nine ten eleven twelve twenty dozen hundred",
}
_ADJECTIVES = set(
    "red orange yellow green blue purple pink brown black white gray grey silver golden tan beige dark light bright "
    "colorful big small large little tall short long huge giant tiny wide narrow high low young old new empty full "
    "open closed clean dirty wet dry hot cold warm cool fresh wooden busy crowded snowy grassy sunny cloudy "
    "rocky sandy stuffed several many few much other different same various single double beautiful pretty cute "
    "happy sad modern male female adult elderly professional cheap fancy heavy thin thick round square flat "
    "nice good great striped multiple".split()
)
_NOT_GERUND = set("building ceiling clothing painting ring king wing thing something nothing evening morning string "
                  "swing icing frosting topping railing sibling stuffing pudding".split())
_NOT_ADVERB = set("family fly belly jelly lily rally holly bully ally".split())
_NOT_PARTICIPLE = set("moped speed steed breed hundred tweed seaweed".split())
_ADJECTIVE_SUFFIXES = ("ous", "ful", "ive", "able", "ible", "less", "ish")
_WORD_TAGS = {word: tag for tag, words in _CLOSED_CLASS.items() for word in words.split()}


def _heuristic_tag(token: str) -> str:
    word = token.lower()
    if not any(ch.isalnum() for ch in word):
        return "." if word in ".!?" else ","
    if word.isdigit():
        return "CD"
    if word in _WORD_TAGS:
        return _WORD_TAGS[word]
    if word in _ADJECTIVES or (len(word) > 5 and word.endswith(_ADJECTIVE_SUFFIXES)):
        return "JJ"
    if len(word) > 4 and word.endswith("ing") and word not in _NOT_GERUND:
        return "VBG"
    if len(word) > 4 and word.endswith("ed") and word not in _NOT_PARTICIPLE:
        return "VBN"
    if len(word) > 4 and word.endswith("ly") and word not in _NOT_ADVERB:
        return "RB"
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return "NNS"
    return "NN"


def heuristic_pos_tagger(caption: str) -> list[tuple[str, str]]:
    """(token, Penn tag) of each token of :func:`tokenize_caption`, from a lexicon and suffix rules.

    The fallback for spaCy's en_core_web_sm, which ARO uses and which cannot be installed here (no official
    build on PyPI; see :func:`spacy_pos_tagger` where it is installed). Built for caption English: function
    words, common caption verbs and adjectives are listed, -ing / -ed / -ly and adjective suffixes decide next,
    and any other word is a noun. It errs towards "noun" (an unknown verb is shuffled with the nouns).
    """
    return [(token, _heuristic_tag(token)) for token in tokenize_caption(caption)]


def spacy_pos_tagger(model: str = "en_core_web_sm") -> Tagger:
    """ARO's own tagger, spaCy ``model``'s fine-grained tags, where that model is installed (loaded once)."""
    import spacy  # optional: not a dependency of this project

    nlp = spacy.load(model)
    return lambda caption: [(token.text, token.tag_) for token in nlp(caption)]


def _shuffled_groups(tokens: Sequence[str], groups: Iterable[Sequence[int]], rng: np.random.Generator) -> str:
    """``tokens`` with the tokens at each group of positions permuted among themselves, joined by spaces."""
    out = list(tokens)
    for positions in groups:
        order = rng.permutation(len(positions))
        for target, source in zip(positions, order):
            out[target] = tokens[positions[source]]
    return " ".join(out)


def _draw(caption: str, draw: Callable[[], str], ensure_different: bool) -> str:
    """One draw; with ``ensure_different``, redrawn until it differs from ``caption`` as ARO's model sees both
    (after :func:`aro_pre_caption`), up to ``MAX_REDRAWS`` draws (the last is kept: no arrangement may differ)."""
    candidate = draw()
    if ensure_different:
        original = aro_pre_caption(caption, None)
        for _ in range(MAX_REDRAWS - 1):
            if aro_pre_caption(candidate, None) != original:
                break
            candidate = draw()
    return candidate


def shuffle_nouns_and_adjectives(
    caption: str, rng: np.random.Generator, *, tagger: Tagger = heuristic_pos_tagger, ensure_different: bool = True
) -> str:
    """ARO's ``shuffle_nouns_and_adj``: nouns (NN*) permuted among the noun positions, adjectives (JJ*) among theirs."""
    tagged = tagger(caption)
    tokens = [token for token, _ in tagged]
    nouns = [k for k, (_, tag) in enumerate(tagged) if tag in NOUN_TAGS]
    adjectives = [k for k, (_, tag) in enumerate(tagged) if tag in ADJECTIVE_TAGS]
    return _draw(caption, lambda: _shuffled_groups(tokens, (nouns, adjectives), rng), ensure_different)


def shuffle_all_but_nouns_and_adjectives(
    caption: str, rng: np.random.Generator, *, tagger: Tagger = heuristic_pos_tagger, ensure_different: bool = True
) -> str:
    """ARO's ``shuffle_allbut_nouns_and_adj``: every token that is neither noun nor adjective (punctuation
    included) permuted among those positions; nouns and adjectives stay put."""
    tagged = tagger(caption)
    tokens = [token for token, _ in tagged]
    others = [k for k, (_, tag) in enumerate(tagged) if tag not in NOUN_TAGS | ADJECTIVE_TAGS]
    return _draw(caption, lambda: _shuffled_groups(tokens, (others,), rng), ensure_different)


def _trigrams(tokens: Sequence[str]) -> list[list[str]]:
    """Consecutive groups of three tokens, the last one shorter when needed (ARO's ``get_trigrams``)."""
    return [list(tokens[k:k + 3]) for k in range(0, len(tokens), 3)]


def shuffle_within_trigrams(
    caption: str, rng: np.random.Generator, *, tokenizer: Callable[[str], list[str]] = tokenize_caption,
    ensure_different: bool = True,
) -> str:
    """ARO's ``shuffle_within_trigrams``: the tokens of each trigram permuted, the trigrams kept in order."""
    tokens = tokenizer(caption)
    groups = [range(k, min(k + 3, len(tokens))) for k in range(0, len(tokens), 3)]
    return _draw(caption, lambda: _shuffled_groups(tokens, [list(g) for g in groups], rng), ensure_different)


def shuffle_trigrams(
    caption: str, rng: np.random.Generator, *, tokenizer: Callable[[str], list[str]] = tokenize_caption,
    ensure_different: bool = True,
) -> str:
    """ARO's ``shuffle_trigrams``: the trigrams permuted, each trigram's tokens kept in order."""
    trigrams = _trigrams(tokenizer(caption))

    def draw() -> str:
        return " ".join(" ".join(trigrams[k]) for k in rng.permutation(len(trigrams)))

    return _draw(caption, draw, ensure_different)


def order_negatives(
    caption: str, rng: np.random.Generator, *, tagger: Tagger = heuristic_pos_tagger, ensure_different: bool = True
) -> list[str]:
    """The four perturbations of ``caption`` in ARO's order (nouns/adjectives, all but, within trigrams, trigrams)."""
    return [
        shuffle_nouns_and_adjectives(caption, rng, tagger=tagger, ensure_different=ensure_different),
        shuffle_all_but_nouns_and_adjectives(caption, rng, tagger=tagger, ensure_different=ensure_different),
        shuffle_within_trigrams(caption, rng, ensure_different=ensure_different),
        shuffle_trigrams(caption, rng, ensure_different=ensure_different),
    ]


ORDER_COLLECTIONS = {
    # Karpathy test images: "val2014/COCO_val2014_000000391895.jpg" and "flickr30k-images/1007129816.jpg".
    "coco": re.compile(r"_(\d+)\.jpg$"),
    "flickr30k": re.compile(r"(?:^|/)(\d+)\.jpg$"),
}


def read_order_captions(
    karpathy_json: str | os.PathLike,
    images_dir: str | os.PathLike,
    *,
    benchmark_subset: str,
    seed: int,
    collection: str,
    max_words: int = ARO_MAX_WORDS,
    tagger: Tagger = heuristic_pos_tagger,
    redraw_identical: bool = False,
    on_missing_image: OnMissingImage = "error",
) -> pd.DataFrame:
    """COCO-Order / Flickr30k-Order items from a Karpathy caption file (BLIP's ``coco_karpathy_test.json`` /
    ``flickr30k_test.json``), one item per caption: benchmark "aro", subset ``benchmark_subset`` ("coco_order" /
    "flickr30k_order"), item id "<subset>:<record>:<caption>", ``coco_id`` or ``flickr_id`` from the image name.

    The negatives are :func:`order_negatives` drawn from ``numpy.random.default_rng([seed, record, caption])``,
    so an item's negatives do not depend on the other records. ``redraw_identical=False`` (default) draws as
    ARO does, once; a negative that comes out equal to the positive after ``pre_caption`` is dropped (ARO's tie
    rule counts it for the model, so it cannot change a result) and counted in ``attrs["dropped"]
    ["identical_negative"]``; an item left with none is dropped and counted as "no_distinct_negative".
    ``redraw_identical=True`` redraws such perturbations instead (a harder benchmark than ARO's).
    """
    if collection not in ORDER_COLLECTIONS:
        raise ValueError(f"collection must be one of {sorted(ORDER_COLLECTIONS)}, got {collection!r}")
    path = Path(karpathy_json)
    records = load_json(path)
    if not isinstance(records, list):
        raise CompositionalFormatError(f"{path}: expected a JSON list of images, got {type(records).__name__}")
    images_dir = check_images_dir(images_dir)
    rows, dropped = [], Counter({"identical_negative": 0, "no_distinct_negative": 0})
    for index, record in enumerate(records):
        what = f"image #{index}"
        image = _string(path, record, "image", what)
        image_id = _id_from_name(path, image, ORDER_COLLECTIONS[collection], what)
        for number, caption in enumerate(_list_of_strings(path, record, "caption", what)):
            rng = np.random.default_rng([seed, index, number])
            positive = aro_pre_caption(caption, max_words)
            perturbed = order_negatives(caption, rng, tagger=tagger, ensure_different=redraw_identical)
            negatives = [n for n in (aro_pre_caption(p, max_words) for p in perturbed) if n != positive]
            dropped["identical_negative"] += len(perturbed) - len(negatives)
            if not negatives:
                dropped["no_distinct_negative"] += 1
                continue
            rows.append(_item(
                "aro", benchmark_subset, f"{benchmark_subset}:{index}:{number}", str(images_dir / image), positive,
                negatives, coco_id=image_id if collection == "coco" else None,
                flickr_id=image_id if collection == "flickr30k" else None,
            ))
    if dropped["no_distinct_negative"]:
        log.warning("%s: dropped %d captions whose perturbations all equal the caption", path,
                    dropped["no_distinct_negative"])
    return _item_frame(rows, referenced_by=path, on_missing_image=on_missing_image, dropped=dict(dropped))


# --------------------------------------------------------------------------------------------------------
# Winoground

WINOGROUND_IMAGE_EXTENSION = ".png"  # the loading script's IMAGE_EXTENSION; images.zip holds images/<stem>.png


def _winoground_image(images_dir: Path, stem: str) -> str:
    return str(images_dir / (stem if stem.endswith(WINOGROUND_IMAGE_EXTENSION) else stem + WINOGROUND_IMAGE_EXTENSION))


def _winoground_row(path: Path, number: int, record: Any, images_dir: Path) -> dict:
    what = f"line {number}"
    item_id = _field(path, record, "id", what)
    if type(item_id) is not int:
        raise CompositionalFormatError(f"{path}: {what}: 'id' must be an integer, got {item_id!r}")
    what = f"line {number} (id {item_id})"
    num_main_preds = _field(path, record, "num_main_preds", what)
    if type(num_main_preds) is not int:
        raise CompositionalFormatError(f"{path}: {what}: 'num_main_preds' must be an integer, got {num_main_preds!r}")
    row = {"item_id": item_id, "num_main_preds": num_main_preds}
    for key in ("image_0", "image_1"):
        row[key] = _winoground_image(images_dir, _string(path, record, key, what))
    for key in ("caption_0", "caption_1", "tag", "secondary_tag", "collapsed_tag"):
        row[key] = _string(path, record, key, what)
    return row


def read_winoground(
    examples_jsonl: str | os.PathLike, images_dir: str | os.PathLike, *, on_missing_image: OnMissingImage = "error"
) -> pd.DataFrame:
    """Winoground's ``examples.jsonl``, one row per example (``WINOGROUND_COLUMNS``); ``images_dir`` is the
    ``images`` folder of ``images.zip``. An example with a missing image is dropped whole under "skip"."""
    path = Path(examples_jsonl)
    images_dir = check_images_dir(images_dir)
    rows = [_winoground_row(path, number, record, images_dir) for number, record in load_jsonl(path)]
    ids = Counter(row["item_id"] for row in rows)
    repeated = [item_id for item_id, count in ids.items() if count > 1]
    if repeated:
        raise CompositionalFormatError(f"{path}: example ids appear more than once: {repeated[:5]}")
    missing = missing_image_files((p for row in rows for p in (row["image_0"], row["image_1"])),
                                  referenced_by=path, on_missing_image=on_missing_image)
    kept = [row for row in rows if row["image_0"] not in missing and row["image_1"] not in missing]
    if len(kept) < len(rows):
        log.warning("%s: dropped %d examples of %d missing images", path, len(rows) - len(kept), len(missing))
    frame = pd.DataFrame(kept, columns=list(WINOGROUND_COLUMNS))
    frame.attrs["dropped"] = {"missing_image": len(rows) - len(kept)}
    frame.attrs["missing_images"] = sorted(Path(p).name for p in missing)
    return frame


def winoground_scores(s: Any) -> dict[str, np.ndarray]:
    """The paper's per-example scores from similarities ``s[..., c, i]`` (caption c, image i), strict:

    text = s(c0,i0) > s(c1,i0) and s(c1,i1) > s(c0,i1); image = s(c0,i0) > s(c0,i1) and s(c1,i1) > s(c1,i0);
    group = both. Keys "text_score", "image_score", "group_score"; arrays of the leading shape of ``s``.
    """
    s = np.asarray(s, dtype=np.float64)
    if s.ndim < 2 or s.shape[-2:] != (2, 2):
        raise ValueError(f"similarities must have shape (..., 2, 2) (caption, image), got {s.shape}")
    text = (s[..., 0, 0] > s[..., 1, 0]) & (s[..., 1, 1] > s[..., 0, 1])
    image = (s[..., 0, 0] > s[..., 0, 1]) & (s[..., 1, 1] > s[..., 1, 0])
    return {"text_score": text, "image_score": image, "group_score": text & image}


# --------------------------------------------------------------------------------------------------------
# Visual Genome image list


def _optional_id(path: Path, record: Any, key: str, what: str) -> int | None:
    value = _field(path, record, key, what)
    return None if value is None else _integer(path, value, what, key)


def read_vg_image_data(path: str | os.PathLike) -> pd.DataFrame:
    """Visual Genome's ``image_data.json``: ``vg_id``, ``coco_id``, ``flickr_id`` (nullable Int64), a row an image."""
    path = Path(path)
    records = load_json(path)
    if not isinstance(records, list):
        raise CompositionalFormatError(f"{path}: expected a JSON list of images, got {type(records).__name__}")
    rows = []
    for index, record in enumerate(records):
        what = f"image #{index}"
        vg_id = _integer(path, _field(path, record, "image_id", what), what, "image_id")
        what = f"image {vg_id}"
        rows.append((vg_id, _optional_id(path, record, "coco_id", what), _optional_id(path, record, "flickr_id", what)))
    repeated = [vg_id for vg_id, count in Counter(row[0] for row in rows).items() if count > 1]
    if repeated:
        raise CompositionalFormatError(f"{path}: image ids appear more than once: {repeated[:5]}")
    return pd.DataFrame({column: pd.array([row[k] for row in rows], dtype="Int64")
                         for k, column in enumerate(VG_IMAGE_COLUMNS)})


# --------------------------------------------------------------------------------------------------------
# Accuracies


def micro_accuracy(correct: Sequence[bool] | np.ndarray) -> float:
    """The fraction of items correct."""
    correct = np.asarray(correct, dtype=bool)
    if correct.size == 0:
        raise ValueError("no items to score")
    return float(correct.mean())


def group_accuracies(correct: Sequence[bool] | np.ndarray, groups: Sequence[str]) -> pd.DataFrame:
    """Per group: ``accuracy`` and ``count`` (sorted by group), ARO's per-relation / per-pair records."""
    correct = np.asarray(correct, dtype=float)
    if len(correct) != len(groups):
        raise ValueError(f"{len(correct)} correctness values for {len(groups)} groups")
    frame = pd.DataFrame({"correct": correct, "group": np.asarray(groups, dtype=object)})
    per_group = frame.groupby("group", sort=True)["correct"].agg(["mean", "size"])
    return per_group.rename(columns={"mean": "accuracy", "size": "count"})


def macro_accuracy(
    correct: Sequence[bool] | np.ndarray, groups: Sequence[str], *, exclude: Iterable[str] = (), min_count: int = 1
) -> float:
    """The unweighted mean of the group accuracies, over groups not in ``exclude`` with at least ``min_count`` items."""
    per_group = group_accuracies(correct, groups)
    kept = per_group[(per_group["count"] >= min_count) & ~per_group.index.isin(list(exclude))]
    if kept.empty:
        raise ValueError("no group left to average")
    return float(kept["accuracy"].mean())


def subset_part(subset: str) -> str:
    """The part an item's subset belongs to: "vg_relation" of "vg_relation:on", a SugarCrepe category as it is."""
    return subset.split(":", 1)[0]


def aro_macro_accuracy(correct: Sequence[bool] | np.ndarray, subsets: Sequence[str]) -> dict[str, float]:
    """ARO's VG-Relation and VG-Attribution macro accuracies from item subsets "<part>:<group>".

    VG-Relation: mean over relations outside ``ARO_VG_RELATION_EXCLUDED``; VG-Attribution: mean over attribute
    pairs with at least ``ARO_VG_ATTRIBUTION_MIN_COUNT`` items. Items of other subsets are ignored; a part with
    no items is absent from the result.
    """
    correct = np.asarray(correct, dtype=bool)
    parts = np.array([subset_part(subset) for subset in subsets], dtype=object)
    names = [subset.split(":", 1)[-1] for subset in subsets]
    rules = {VG_RELATION: {"exclude": ARO_VG_RELATION_EXCLUDED, "min_count": 1},
             VG_ATTRIBUTION: {"exclude": (), "min_count": ARO_VG_ATTRIBUTION_MIN_COUNT}}
    result = {}
    for part, rule in rules.items():
        mask = parts == part
        if mask.any():
            result[part] = macro_accuracy(correct[mask], [n for n, m in zip(names, mask) if m], **rule)
    return result
