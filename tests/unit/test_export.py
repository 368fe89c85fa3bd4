"""open_clip → HF CLIP vision conversion and the LLaVA tower swap, on tiny models built from configs (no downloads).

Every parameter is jittered away from its initial value, so a missed, transposed or swapped tensor (LayerNorm
weights left at 1, q and k swapped, ``proj`` not transposed) changes the outputs and fails the comparison.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from hnclip.llava.export import (
    ExportVerificationError,
    TowerMismatchError,
    UnsupportedTowerError,
    _verify_reloaded,
    check_tower_fits_llava,
    hf_vision_config_from_open_clip,
    llava_tower_state_dict,
    replace_vision_tower,
    to_hf_vision_model,
)
from hnclip.llava.tower_delta import (
    DELTA_FILE,
    TOWER_FILE,
    DeltaError,
    export_tower_delta,
    load_llava,
    write_full_checkpoint,
)

TOLERANCE = 1e-5
TINY_TEXT_CFG = {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}

# name → open_clip model config. Widths, patches, activations and eps differ so that a hard-coded value shows.
TINY_CONFIGS = {
    "hnclip-test-qgelu": {
        "embed_dim": 64, "quick_gelu": True, "text_cfg": TINY_TEXT_CFG,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 3, "head_width": 32},
    },
    "hnclip-test-gelu": {
        "embed_dim": 48, "text_cfg": TINY_TEXT_CFG,
        "vision_cfg": {"image_size": 36, "patch_size": 12, "width": 96, "layers": 2, "head_width": 32,
                       "mlp_ratio": 2.5, "norm_kwargs": {"eps": 1e-6}},
    },
    # LayerNorm after class-token pooling equals pooling after LayerNorm: accepted, and must still match.
    "hnclip-test-ln-after-pool": {
        "embed_dim": 40, "quick_gelu": True, "text_cfg": TINY_TEXT_CFG,
        "vision_cfg": {"image_size": 32, "patch_size": 16, "width": 64, "layers": 2, "head_width": 16,
                       "final_ln_after_pool": True},
    },
}
REFUSED_CONFIGS = {
    "ls_init_value": ({"ls_init_value": 0.1}, "LayerScale"),
    "avg_pool": ({"pool_type": "avg"}, "pool_type 'avg'"),
    "no_ln_pre": ({"no_ln_pre": True}, "no_ln_pre"),
    "qk_norm": ({"qk_norm": True}, "CustomResidualAttentionBlock"),
    "attn_pool": ({"attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 4}, "attentional pooling"),
}


@pytest.fixture(scope="module", autouse=True)
def registered_configs(tmp_path_factory):
    """Register the tiny configs with open_clip the public way (JSON files + add_model_config)."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("open_clip_configs")
    configs = dict(TINY_CONFIGS)
    base = TINY_CONFIGS["hnclip-test-qgelu"]
    for name, (extra, _) in REFUSED_CONFIGS.items():
        configs[f"hnclip-test-refused-{name}"] = {**base, "vision_cfg": {**base["vision_cfg"], **extra}}
    for name, config in configs.items():
        (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)


def jittered_open_clip(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny open_clip model whose every parameter is moved off its init (LayerNorms off 1/0 included)."""
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def random_pixels(image_size: int, batch: int = 3, seed: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))


def open_clip_block_outputs(visual: torch.nn.Module, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Naive reference: the embeddings after ln_pre, then the output of each residual block (batch first)."""
    x = visual.ln_pre(
        torch.cat([visual.class_embedding.expand(pixels.shape[0], 1, -1),
                   visual.conv1(pixels).flatten(2).transpose(1, 2)], dim=1)
        + visual.positional_embedding
    )
    outputs = [x]
    for block in visual.transformer.resblocks:
        x = block(x)
        outputs.append(x)
    return outputs


def shapes_only_open_clip(name: str, **kwargs) -> torch.nn.Module:
    """A full-size open_clip model on the meta device: real shapes and modules, no weights, built in a blink."""
    with torch.device("meta"):
        return open_clip.create_model(name, pretrained=None, device="meta", **kwargs)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------------------------
# to_hf_vision_model
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_converted_tower_reproduces_open_clip(name):
    model = jittered_open_clip(name)
    hf = to_hf_vision_model(model)
    image_size = model.visual.image_size[0]
    pixels = random_pixels(image_size)
    with torch.no_grad():
        reference = open_clip_block_outputs(model.visual, pixels)
        image_features = model.encode_image(pixels)
        pooled_reference = model.visual.ln_post(reference[-1][:, 0])
        out = hf(pixel_values=pixels, output_hidden_states=True)
    # The reference really is open_clip's forward: its last block output gives encode_image.
    assert max_diff(pooled_reference @ model.visual.proj, image_features) <= TOLERANCE
    assert len(out.hidden_states) == len(reference)
    for layer, (ours, theirs) in enumerate(zip(out.hidden_states, reference)):
        assert max_diff(ours, theirs) <= TOLERANCE, f"hidden_states[{layer}]"
    assert max_diff(out.hidden_states[-2], reference[-2]) <= TOLERANCE  # what LLaVA reads
    assert max_diff(out.image_embeds, image_features) <= TOLERANCE
    with torch.no_grad():
        pooled = hf.vision_model(pixel_values=pixels).pooler_output
    assert max_diff(pooled, pooled_reference) <= TOLERANCE
    # The outputs are not trivially small: a 1e-5 tolerance means something at these magnitudes.
    assert image_features.abs().max() > 0.1 and reference[-2].abs().max() > 0.1


def test_config_derived_from_the_model_not_defaults():
    config = to_hf_vision_model(jittered_open_clip("hnclip-test-gelu")).config
    assert (config.hidden_size, config.intermediate_size, config.num_attention_heads) == (96, 240, 3)
    assert (config.num_hidden_layers, config.patch_size, config.image_size) == (2, 12, 36)
    assert (config.projection_dim, config.hidden_act, config.layer_norm_eps) == (48, "gelu", 1e-6)
    assert to_hf_vision_model(jittered_open_clip("hnclip-test-qgelu")).config.hidden_act == "quick_gelu"


def test_vit_l_14_336_maps_onto_llava_15_tower_shape():
    """The real tower (built on the meta device: shapes only, no weights, no download) is LLaVA-1.5's."""
    model = shapes_only_open_clip("ViT-L-14-336", force_quick_gelu=True)
    ours = hf_vision_config_from_open_clip(model)
    llava_15 = LlavaConfig().vision_config  # transformers' defaults are llava-1.5-7b's tower
    for field in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "patch_size",
                  "image_size", "projection_dim", "hidden_act", "layer_norm_eps"):
        assert getattr(ours, field) == getattr(llava_15, field), field
    check_tower_fits_llava(ours, LlavaConfig())


def test_vit_b_32_refused_by_llava_15_with_both_shapes():
    model = shapes_only_open_clip("ViT-B-32")
    with pytest.raises(TowerMismatchError) as error:
        check_tower_fits_llava(hf_vision_config_from_open_clip(model), LlavaConfig(), tower_name="ViT-B-32")
    message = str(error.value)
    assert "ViT-B-32 tower: width 768, patch 32, 224 px, 49 patch tokens" in message
    assert "LLaVA expects width 1024, patch 14, 336 px, 576 patch tokens" in message


@pytest.mark.parametrize("name", sorted(REFUSED_CONFIGS))
def test_unmappable_tower_is_refused_with_reason(name):
    _, reason = REFUSED_CONFIGS[name]
    model = open_clip.create_model(f"hnclip-test-refused-{name}", pretrained=None)
    with pytest.raises(UnsupportedTowerError, match=reason):
        to_hf_vision_model(model)


def test_model_without_vit_tower_is_refused():
    with pytest.raises(UnsupportedTowerError, match="no `visual`"):
        to_hf_vision_model(torch.nn.Linear(2, 2))
    resnet = shapes_only_open_clip("RN50")
    with pytest.raises(UnsupportedTowerError, match="ModifiedResNet"):
        to_hf_vision_model(resnet)


# ---------------------------------------------------------------------------------------------------------------
# LLaVA fit, swap and export
# ---------------------------------------------------------------------------------------------------------------


def tiny_llava_config(**vision_overrides) -> LlavaConfig:
    """A tiny LLaVA whose tower slot has the qgelu tower's shapes but another activation and head count."""
    vision = {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 3,
              "patch_size": 8, "image_size": 32, "projection_dim": 64, "hidden_act": "gelu", **vision_overrides}
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=100, max_position_embeddings=64)
    tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    return LlavaConfig(vision_config=CLIPVisionConfig(**vision).to_dict(), text_config=text.to_dict(),
                       image_token_index=99, image_seq_length=tokens)


def tiny_llava(seed: int = 3, **vision_overrides) -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(tiny_llava_config(**vision_overrides)).eval()


def test_width_mismatch_names_both_shapes():
    hf = to_hf_vision_model(jittered_open_clip("hnclip-test-qgelu"))
    llava_config = tiny_llava_config(hidden_size=96, intermediate_size=384)
    with pytest.raises(TowerMismatchError) as error:
        check_tower_fits_llava(hf.config, llava_config, tower_name="tiny")
    message = str(error.value)
    assert "tiny tower: width 64, patch 8, 32 px, 16 patch tokens" in message
    assert "LLaVA expects width 96, patch 8, 32 px, 16 patch tokens" in message
    assert "hidden_size 64 vs 96" in message


def test_feature_layer_outside_the_tower_is_a_mismatch():
    hf = to_hf_vision_model(jittered_open_clip("hnclip-test-qgelu"))
    llava_config = tiny_llava_config()
    check_tower_fits_llava(hf.config, llava_config)  # -2 of 3 layers is fine
    llava_config.vision_feature_layer = -5
    with pytest.raises(TowerMismatchError, match="vision_feature_layer -5 outside 3 layers"):
        check_tower_fits_llava(hf.config, llava_config)


def test_replace_swaps_every_tower_tensor_and_nothing_else(caplog):
    llava = tiny_llava()
    before = {k: v.clone() for k, v in llava.state_dict().items()}
    hf = to_hf_vision_model(jittered_open_clip("hnclip-test-qgelu"))
    replace_vision_tower(llava, hf)
    after = llava.state_dict()
    assert set(after) == set(before)
    tower = {k.removeprefix("model.vision_tower."): v for k, v in after.items() if k.startswith("model.vision_tower.")}
    expected = llava_tower_state_dict(hf)
    assert set(tower) == set(expected) and len(tower) == 3 + 2 + 2 + 3 * 16  # embeddings, 2 LNs, 3 blocks
    for key, value in expected.items():
        assert torch.equal(tower[key], value), key
        assert not torch.equal(before[f"model.vision_tower.{key}"], value), f"{key} was not actually replaced"
    for key, value in before.items():
        if not key.startswith("model.vision_tower."):
            assert torch.equal(after[key], value), f"{key} touched"
    # The tower's own architecture travels with it (LLaVA's slot said gelu, 4 heads): the swapped model computes
    # the converted tower's features, not the right weights run through the old slot's activation and heads.
    assert (llava.config.vision_config.hidden_act, llava.config.vision_config.num_attention_heads) == ("quick_gelu", 2)
    assert "uses quick_gelu where the base LLaVA's tower used gelu" in caplog.text
    pixels = random_pixels(32, batch=2)
    with torch.no_grad():
        features = torch.stack(llava.get_image_features(pixel_values=pixels).pooler_output)
        hf_tokens = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        assert max_diff(features, llava.model.multi_modal_projector(hf_tokens)) <= TOLERANCE


def test_replace_refuses_a_tower_that_does_not_fit():
    llava = tiny_llava()
    hf = to_hf_vision_model(jittered_open_clip("hnclip-test-gelu"))
    with pytest.raises(TowerMismatchError, match="width 96"):
        replace_vision_tower(llava, hf)


def write_base_checkpoint(directory: Path, dtype: torch.dtype = torch.float32) -> LlavaForConditionalGeneration:
    """A base tiny LLaVA as the synth stage would write it: weights, tokenizer, processor, chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    llava = tiny_llava().to(dtype)
    llava.save_pretrained(directory)
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate("red blue circle square left".split())}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    (directory / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return llava


def test_a_tower_delta_assembles_the_swapped_llava(tmp_path):
    base_dir, delta_dir = tmp_path / "base", tmp_path / "delta"
    base = write_base_checkpoint(base_dir)
    model = jittered_open_clip("hnclip-test-qgelu")
    summary = export_tower_delta(base_dir, model, delta_dir, tower_name="tiny")

    assert sorted(p.name for p in delta_dir.iterdir()) == [DELTA_FILE, TOWER_FILE]  # no LLM, no tokenizer
    assembled = load_llava(delta_dir).eval()
    hf = to_hf_vision_model(model)
    base_state, new_state = base.state_dict(), assembled.state_dict()
    assert set(base_state) == set(new_state)
    for key, value in base_state.items():
        if not key.startswith("model.vision_tower."):
            assert torch.equal(new_state[key], value), f"{key} changed"
    for key, value in llava_tower_state_dict(hf).items():
        assert torch.equal(new_state[f"model.vision_tower.{key}"], value), key
    # the tower's own architecture travels with it (the base's slot says gelu and 4 heads)
    assert (assembled.config.vision_config.hidden_act, assembled.config.vision_config.num_attention_heads) == (
        "quick_gelu", 2)

    # The whole path: LLaVA's image features are open_clip's penultimate patch tokens through the base projector.
    pixels = random_pixels(32, batch=2)
    with torch.no_grad():
        features = torch.stack(assembled.get_image_features(pixel_values=pixels).pooler_output)
        open_clip_tokens = open_clip_block_outputs(model.visual, pixels)[-2][:, 1:]
        assert max_diff(features, base.model.multi_modal_projector(open_clip_tokens)) <= TOLERANCE

    assert summary["tower"]["hidden_size"] == 64 and summary["tower"]["patch_tokens"] == 16
    assert summary["tower"]["hidden_act"] == "quick_gelu" and summary["base_tower"]["hidden_act"] == "gelu"
    assert summary["dtype"] == "float32" and summary["tower_tensors"] == 55
    assert not list(tmp_path.glob(".delta.*"))  # no temporary directory left behind


def test_the_complete_checkpoint_of_a_delta_loads_with_from_pretrained(tmp_path):
    from transformers import AutoTokenizer

    base_dir, delta_dir, full_dir = tmp_path / "base", tmp_path / "delta", tmp_path / "full"
    write_base_checkpoint(base_dir)
    export_tower_delta(base_dir, jittered_open_clip("hnclip-test-qgelu"), delta_dir)
    summary = write_full_checkpoint(delta_dir, full_dir)

    full = LlavaForConditionalGeneration.from_pretrained(full_dir).state_dict()
    assembled = load_llava(delta_dir).state_dict()
    assert full.keys() == assembled.keys()
    for key, value in assembled.items():
        assert torch.equal(full[key], value), key
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.jinja"):
        assert (full_dir / name).read_bytes() == (base_dir / name).read_bytes(), name
        assert name in summary["copied_files"]
    assert AutoTokenizer.from_pretrained(full_dir)("red circle left")["input_ids"] == [3, 5, 7]


def test_a_float16_base_gets_a_float16_tower_of_two_bytes_a_parameter(tmp_path):
    base_dir, delta_dir = tmp_path / "base", tmp_path / "delta"
    write_base_checkpoint(base_dir, dtype=torch.float16)
    summary = export_tower_delta(base_dir, jittered_open_clip("hnclip-test-qgelu"), delta_dir)
    assert summary["dtype"] == "float16"
    tower_bytes = (delta_dir / TOWER_FILE).stat().st_size
    assert 2 * summary["tower_parameters"] < tower_bytes < 2 * summary["tower_parameters"] + 16_000  # + header
    assembled = load_llava(delta_dir)
    assert {p.dtype for p in assembled.parameters()} == {torch.float16}


def test_a_delta_refuses_a_base_it_was_not_exported_against(tmp_path):
    base_dir, delta_dir = tmp_path / "base", tmp_path / "delta"
    write_base_checkpoint(base_dir)
    export_tower_delta(base_dir, jittered_open_clip("hnclip-test-qgelu"), delta_dir)
    config = json.loads((base_dir / "config.json").read_text())
    (base_dir / "config.json").write_text(json.dumps({**config, "image_token_id": 5}))
    with pytest.raises(DeltaError, match="exported against another base.*sha256.config.json"):
        load_llava(delta_dir)
    with pytest.raises(DeltaError, match="does not exist here; pass base_dir="):
        load_llava(delta_dir, base_dir=tmp_path / "elsewhere")


def test_failed_export_leaves_no_output(tmp_path):
    base_dir, out_dir = tmp_path / "base", tmp_path / "out"
    write_base_checkpoint(base_dir)
    with pytest.raises(TowerMismatchError, match="width 96"):
        export_tower_delta(base_dir, jittered_open_clip("hnclip-test-gelu"), out_dir)
    assert not out_dir.exists() and not list(tmp_path.glob(".out.*"))


def test_export_refuses_other_pixel_normalisation(tmp_path):
    base_dir = tmp_path / "base"
    write_base_checkpoint(base_dir)
    model = jittered_open_clip("hnclip-test-qgelu")
    model.visual.preprocess_cfg = {**model.visual.preprocess_cfg, "mean": (0.5, 0.5, 0.5)}
    with pytest.raises(TowerMismatchError, match="preprocessor_config.json"):
        export_tower_delta(base_dir, model, tmp_path / "out")


def test_verification_catches_a_tensor_that_did_not_round_trip(tmp_path):
    base_dir = tmp_path / "base"
    base = write_base_checkpoint(base_dir)
    tower = {k: v.clone() for k, v in base.model.vision_tower.state_dict().items()}
    _verify_reloaded(base_dir, tower, {})  # the base checkpoint is its own exact round trip
    tower["encoder.layers.1.mlp.fc1.bias"][0] += 1e-3
    with pytest.raises(ExportVerificationError, match="encoder.layers.1.mlp.fc1.bias"):
        _verify_reloaded(base_dir, tower, {})
