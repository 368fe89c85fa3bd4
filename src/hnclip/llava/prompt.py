"""LLaVA-1.5's evaluation prompt and image preprocessing, built by hand to match the published protocol.

Sources (docs/data.md, "The LLaVA-1.5 evaluation protocol"): the ``vicuna_v1`` conversation of
``haotian-liu/LLaVA`` ``llava/conversation.py`` (system line, ``sep=" "``, roles USER/ASSISTANT, the
assistant turn left open as ``"ASSISTANT:"``), the short-answer instruction of LLaVA's VQA question files,
and ``expand2square`` padding with the image processor's mean colour. ``llava-hf``'s chat template drops the
system line and its processor centre-crops without padding, so neither is used here.

TextVQA, checked against all 5,000 records of LLaVA's ``llava_textvqa_val_v051_ocr.jsonl`` and lmms-eval's
``textvqa_doc_to_text``: the question is asked as ``str.capitalize()`` writes it (TextVQA's questions are lower
case; "what is the brand of this camera?" → "What is the brand of this camera?"), and the OCR line is
``Reference OCR token: `` followed by the tokens joined with ``", "``, present even when the image has no
tokens (then it ends with the space). VQA v2 questions are asked as written (the dataset capitalises them).

Import-light on purpose (torch and PIL load in the functions that need them): the workflow reads the prompt
variants when it plans the VQA jobs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch
    from PIL import Image

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
OCR_LINE_PREFIX = "Reference OCR token: "
IMAGE_TOKEN = "<image>"
# LLaVA's expand2square colour: tuple(int(255 * m) for m in OPENAI_CLIP_MEAN).
LLAVA_PAD_COLOUR = (122, 116, 104)
PROMPT_VARIANT = "llava15_vicuna_v1_short_answer"
# Datasets whose questions LLaVA-1.5 rewrites before asking them, and how.
CAPITALISED_DATASETS = frozenset({"textvqa"})


def asked_question(question: str, dataset: str | None = None) -> str:
    """The question as LLaVA-1.5 asks it: TextVQA's through ``str.capitalize()``, any other as written."""
    return question.capitalize() if dataset in CAPITALISED_DATASETS else question


def llava15_user_message(question: str, *, ocr_tokens: Sequence[str] | None = None, with_image: bool = True) -> str:
    """The user turn: ``<image>`` (first turn only), the question, the OCR line unless ``ocr_tokens`` is None
    (an empty list writes it empty, as LLaVA does), the short-answer instruction."""
    if not question or not question.strip():
        raise ValueError("empty question: a LLaVA prompt needs question text")
    lines = [IMAGE_TOKEN] if with_image else []
    lines.append(question.strip())
    if ocr_tokens is not None:
        lines.append(OCR_LINE_PREFIX + ", ".join(str(token) for token in ocr_tokens))
    lines.append(SHORT_ANSWER_INSTRUCTION)
    return "\n".join(lines)


def llava15_prompt(question: str, *, ocr_tokens: Sequence[str] | None = None) -> str:
    """The full LLaVA-1.5 ``vicuna_v1`` prompt for one VQA question, ending with the open ``ASSISTANT:`` turn.

    ``ocr_tokens`` None leaves the OCR line out; the question goes in as given (see :func:`asked_question`).
    """
    return f"{SYSTEM_PROMPT} USER: {llava15_user_message(question, ocr_tokens=ocr_tokens)} ASSISTANT:"


def llava15_followup_turn(question: str, *, ocr_tokens: Sequence[str] | None = None) -> str:
    """A later turn of a training conversation about the same image, to follow the previous answer's ``</s>``.

    LLaVA-1.5's instruction data asks all of an image's VQA questions in one multi-turn conversation; only
    the first turn carries ``<image>`` and the system line (``vicuna_v1``: ``sep2="</s>"`` then ``USER: ...``).
    """
    return f"USER: {llava15_user_message(question, ocr_tokens=ocr_tokens, with_image=False)} ASSISTANT:"


def prompt_variant(use_ocr: bool, dataset: str | None = None) -> str:
    """The name recorded with each prediction, so scores never mix protocols (OCR line or not, question as written
    or capitalised); a job resumes only from predictions of the same variant."""
    variant = PROMPT_VARIANT + ("_capitalised" if dataset in CAPITALISED_DATASETS else "")
    return variant + ("_ocr" if use_ocr else "")


def num_image_tokens(vision_config, vision_feature_select_strategy: str = "default") -> int:
    """How many ``<image>`` placeholders one image needs: one per patch feature the projector emits.

    transformers 5's LLaVA scatters image features into the positions of ``<image>`` tokens and checks
    that the counts match, so the prompt must carry one token per patch (576 for ViT-L/14 at 336 px);
    the ``"default"`` strategy drops CLS, ``"full"`` keeps it.
    """
    patches = (vision_config.image_size // vision_config.patch_size) ** 2
    if vision_feature_select_strategy == "default":
        return patches
    if vision_feature_select_strategy == "full":
        return patches + 1
    raise ValueError(f"unknown vision_feature_select_strategy {vision_feature_select_strategy!r}")


def expand_image_tokens(prompt: str, n_tokens: int, image_token: str = IMAGE_TOKEN) -> str:
    """Repeat the single ``<image>`` of ``prompt`` ``n_tokens`` times (what ``LlavaProcessor`` does)."""
    found = prompt.count(image_token)
    if found != 1:
        raise ValueError(f"prompt must contain exactly one {image_token}, found {found}: {prompt[:80]!r}")
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    return prompt.replace(image_token, image_token * n_tokens)


def pad_colour_from_mean(image_mean: Sequence[float]) -> tuple[int, int, int]:
    """LLaVA's rule for the padding colour: the processor's mean, scaled to 0..255 and truncated."""
    return tuple(int(255 * m) for m in image_mean)  # type: ignore[return-value]


def pad_to_square(image: Image.Image, background: tuple[int, int, int] = LLAVA_PAD_COLOUR) -> Image.Image:
    """Centre ``image`` on a square canvas of colour ``background`` (LLaVA's ``expand2square``).

    A square image is returned unchanged; otherwise the short side is padded, with the odd pixel (if
    any) going to the bottom/right as in LLaVA (offset ``(long - short) // 2``).
    """
    from PIL import Image

    image = image.convert("RGB")
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), tuple(background))
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def preprocess_images(
    images: Sequence[Image.Image], image_processor, background: tuple[int, int, int] = LLAVA_PAD_COLOUR
) -> torch.Tensor:
    """Pad each image to a square, then apply the CLIP image processor; returns ``pixel_values`` (N, 3, H, W)."""
    squared = [pad_to_square(image, background) for image in images]
    return image_processor(images=squared, return_tensors="pt")["pixel_values"]
