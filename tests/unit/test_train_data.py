"""Training data streamed from disk: exactly the batches the eager path made by decoding every image up front, for
any number of loader workers, any start step and any rank; captions from a compact token bank; validation read a
batch at a time with the one-shot result."""

import multiprocessing

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from hnclip.loader import ImageReadError
from hnclip.models import create_clip
from hnclip import loader as loader_module
from hnclip.loader import ImageFiles, default_loader_workers, image_batches
from hnclip.train.data import BatchMaker, BatchPlan, CachedImages, CaptionBank, PairData, read_shards
from hnclip.train.trainer import DEFAULT_IMAGE_CACHE_BYTES, Trainer, TrainSettings
from tests.unit.test_train import _settings, _write_pairs

BATCH, SEED, K_HARD, M_EXTRA = 8, 5, 2, 3


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return _write_pairs(tmp_path_factory.mktemp("pairs"))


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return create_clip("hnclip-tiny")


@pytest.fixture(scope="module")
def data(shard):
    return PairData.from_pairs(read_shards([shard]))


def _plan(data) -> BatchPlan:
    return BatchPlan(data, BATCH, seed=SEED, k_hard=K_HARD, m_extra=M_EXTRA)


def _streaming_maker(data, clip) -> BatchMaker:
    _, preprocess, tokenizer = clip
    captions = CaptionBank.tokenize(tokenizer, data.captions)
    return BatchMaker(_plan(data), ImageFiles(data.image_paths, preprocess), captions)


def _eager_reference(data, clip):
    """The eager path as it was: every image decoded into one tensor, every caption into one int64 table."""
    _, preprocess, tokenizer = clip
    images = []
    for path in data.image_paths:
        with Image.open(path) as image:
            images.append(preprocess(image.convert("RGB")))
    return torch.stack(images), tokenizer(list(data.captions))


def _eager_batch(plan, cache, tokens, step, rank=0, world_size=1) -> dict:
    images, positives, hard, extra = plan.rows(step)
    local = slice(rank * len(images) // world_size, (rank + 1) * len(images) // world_size)
    images, positives, hard, extra = images[local], positives[local], hard[local], extra[local]
    return dict(images=cache[torch.from_numpy(images)], texts=tokens[torch.from_numpy(positives)],
                hard_negatives=tokens[torch.from_numpy(hard)], extra_negatives=tokens[torch.from_numpy(extra)],
                image_ids=torch.from_numpy(images))


def _assert_same_batch(batch, expected: dict) -> None:
    for field, tensor in expected.items():
        got = getattr(batch, field)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, field
        assert torch.equal(got, tensor), field


@pytest.mark.parametrize("num_workers", [0, 2])
def test_streamed_batches_equal_the_eager_path(data, clip, num_workers):
    cache, tokens = _eager_reference(data, clip)
    maker = _streaming_maker(data, clip)
    steps = range(0, 8)  # 3 batches per epoch: crosses two epoch boundaries
    streamed = list(maker.stream(steps.start, steps.stop, num_workers=num_workers))
    assert len(streamed) == len(steps)
    for step, batch in zip(steps, streamed):
        _assert_same_batch(batch, _eager_batch(maker.plan, cache, tokens, step))
        _assert_same_batch(maker.batch(step), _eager_batch(maker.plan, cache, tokens, step))


def test_a_stream_started_at_a_resume_step_continues_the_same_batches(data, clip):
    cache, tokens = _eager_reference(data, clip)
    maker = _streaming_maker(data, clip)
    for step, batch in zip(range(5, 9), maker.stream(5, 9, num_workers=1)):
        _assert_same_batch(batch, _eager_batch(maker.plan, cache, tokens, step))


@pytest.mark.parametrize("world_size", [2, 3])
def test_each_rank_streams_its_slice_of_the_global_batch(data, clip, world_size):
    cache, tokens = _eager_reference(data, clip)
    maker = _streaming_maker(data, clip)
    for rank in range(world_size):
        for step, batch in zip(range(2, 5), maker.stream(2, 5, rank, world_size, num_workers=1)):
            _assert_same_batch(batch, _eager_batch(maker.plan, cache, tokens, step, rank, world_size))
    shares = [maker.batch(4, rank, world_size).image_ids for rank in range(world_size)]
    assert torch.equal(torch.cat(shares), maker.batch(4).image_ids)


def test_the_legacy_cache_and_token_table_still_make_the_same_batches(data, clip):
    cache, tokens = _eager_reference(data, clip)
    legacy = BatchMaker(_plan(data), cache, tokens)
    assert isinstance(legacy.images, CachedImages)
    for step in (0, 4):
        _assert_same_batch(legacy.batch(step), _eager_batch(legacy.plan, cache, tokens, step))


def test_caption_bank_gives_back_the_tokenizer_rows(data, clip):
    _, _, tokenizer = clip
    table = tokenizer(list(data.captions))
    bank = CaptionBank.tokenize(tokenizer, data.captions, chunk=5)  # several chunks joined
    assert len(bank) == len(data.captions) and bank.context_length == table.shape[1]
    assert bank.tokens.dtype == np.uint16  # CLIP's 49,408 ids
    assert len(bank.tokens) == int((table != 0).sum())  # trimmed: no padding stored
    assert bank.nbytes < table.numel() * table.element_size() / 4
    everything = bank.take(np.arange(len(bank)))
    assert everything.dtype == torch.int64 and torch.equal(everything, table)
    index = np.array([[3, 0, 3], [7, 1, 2]])
    assert torch.equal(bank.take(index), table[torch.from_numpy(index)])


def test_caption_bank_widens_its_id_type_only_when_ids_need_it():
    small = torch.tensor([[49406, 5, 49407, 0], [0, 0, 0, 0], [1, 2, 3, 4]])  # an empty row, a full row
    large = torch.tensor([[70000, 9, 0, 0]])
    huge = torch.tensor([[2**40, 0, 0, 0]])
    assert CaptionBank.from_tokens(small).tokens.dtype == np.uint16
    assert CaptionBank.from_tokens(large).tokens.dtype == np.int32
    assert CaptionBank.from_tokens(huge).tokens.dtype == np.int64
    joined = CaptionBank.concatenate([CaptionBank.from_tokens(small), CaptionBank.from_tokens(large)])
    assert joined.tokens.dtype == np.int32
    assert torch.equal(joined.take(np.arange(4)), torch.cat([small, large]))
    assert torch.equal(CaptionBank.from_tokens(huge).take([0]), huge)


def test_caption_banks_of_different_widths_are_refused():
    with pytest.raises(ValueError, match=r"different context lengths \[3, 4\]"):
        CaptionBank.concatenate([CaptionBank.from_tokens(torch.ones(1, 4, dtype=torch.long)),
                                 CaptionBank.from_tokens(torch.ones(1, 3, dtype=torch.long))])


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_unreadable_image_names_its_file(tmp_path, clip, num_workers):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    files = ImageFiles([str(broken)], clip[1])
    before = set(multiprocessing.active_children())
    with pytest.raises(ImageReadError, match="broken.jpg"):
        list(image_batches(files, 1, num_workers=num_workers))
    # the worker ignores SIGTERM: one left waiting would keep the process from exiting
    assert set(multiprocessing.active_children()) <= before


def test_image_batches_cover_every_image_in_order(data, clip):
    cache, _ = _eager_reference(data, clip)
    files = ImageFiles(data.image_paths, clip[1])
    batches = list(image_batches(files, 7, num_workers=1))
    assert [len(b) for b in batches] == [7, 7, 7, 3]
    assert torch.equal(torch.cat(batches), cache)


def _trainer(shard, state_dir, num_workers, val=False, image_cache_bytes=0, **settings) -> Trainer:
    """A trainer that reads its images from disk per batch unless given an image cache."""
    torch.manual_seed(0)
    model, preprocess, tokenizer = create_clip("hnclip-tiny")
    pairs = pd.read_parquet(shard)
    base = TrainSettings(**_settings(batch_size=BATCH, hard_negatives_per_image=K_HARD, **settings))
    return Trainer(base, model, tokenizer, preprocess, pairs, pairs if val else None, state_dir,
                   num_workers=num_workers, image_cache_bytes=image_cache_bytes)


def _weights_after_steps(trainer: Trainer, steps: int) -> dict[str, torch.Tensor]:
    assert trainer.setup() == 0
    for step in range(steps):
        trainer.step(step)
    trainer.close_stream()
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_streamed_or_cached_and_any_worker_count_give_the_same_weights(shard, tmp_path):
    cached = _trainer(shard, tmp_path / "cached", 0, image_cache_bytes=2**30)
    expected = _weights_after_steps(cached, 5)
    assert isinstance(cached.batches.images, CachedImages)
    for num_workers in (0, 2):
        streamed = _trainer(shard, tmp_path / f"streamed{num_workers}", num_workers)
        weights = _weights_after_steps(streamed, 5)
        assert isinstance(streamed.batches.images, ImageFiles)  # no decoded image is held
        for key in expected:
            assert torch.equal(weights[key], expected[key]), (num_workers, key)


def test_images_are_kept_decoded_only_when_they_all_fit_the_cache(shard, tmp_path, data, clip):
    cache, _ = _eager_reference(data, clip)
    needed = cache.numel() * cache.element_size()
    fits = _trainer(shard, tmp_path / "fits", 0, image_cache_bytes=needed)
    fits.setup()
    assert isinstance(fits.batches.images, CachedImages) and torch.equal(fits.batches.images.tensor, cache)
    too_big = _trainer(shard, tmp_path / "too_big", 0, image_cache_bytes=needed - 1)
    too_big.setup()
    assert isinstance(too_big.batches.images, ImageFiles)
    model, preprocess, tokenizer = create_clip("hnclip-tiny")
    default = Trainer(fits.settings, model, tokenizer, preprocess, pd.read_parquet(shard), None, tmp_path / "default")
    assert default.image_cache_bytes == DEFAULT_IMAGE_CACHE_BYTES >= 6000 * 3 * 32 * 32 * 4  # the demo's train set


def test_a_step_out_of_sequence_reopens_the_stream_at_that_step(shard, tmp_path, data, clip):
    before = set(multiprocessing.active_children())
    trainer = _trainer(shard, tmp_path, 1)
    trainer.setup()
    expected = {step: trainer.batches.batch(step) for step in (0, 1, 4, 5)}
    for step in (4, 5, 0, 1):
        got = trainer._batch(step)
        _assert_same_batch(got, {f: getattr(expected[step], f) for f in
                                 ("images", "texts", "hard_negatives", "extra_negatives", "image_ids")})
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 1  # the open stream's loader worker
    trainer.close_stream()
    assert trainer._stream is None and not workers & set(multiprocessing.active_children())


def test_validation_reads_images_in_batches_with_the_one_shot_result(shard, tmp_path):
    trainer = _trainer(shard, tmp_path, 1, val=True, val_pairs=40, image_cache_bytes=2**30)
    trainer.setup()
    val = trainer.val
    assert isinstance(val["images"], ImageFiles) and len(val["images"]) > 2 * BATCH  # several batches
    assert isinstance(trainer.batches.images, CachedImages)  # validation streams even when training keeps its images
    accuracy = trainer.validate()
    # the previous validate: every val image decoded into one tensor, encoded in one call
    model = trainer.model.eval()
    with torch.no_grad():
        everything = torch.stack([val["images"].read(i) for i in range(len(val["images"]))])
        images = torch.nn.functional.normalize(model.encode_image(everything), dim=-1)
        positive = trainer._encode_normalised_text(val["positive"])
        negative = trainer._encode_normalised_text(val["negative"])
        image = images[val["image_index"]]
        expected = float(((image * positive).sum(-1) > (image * negative).sum(-1)).float().mean())
        streamed = trainer._encode_normalised_val_images()
    torch.testing.assert_close(streamed, images, rtol=0, atol=1e-6)  # batch shape may move the last float bit
    assert accuracy == expected


@pytest.mark.parametrize(
    "threads, device, ranks, cpus, expected",
    [(1, "cpu", None, None, 0), (1, "cuda", None, None, 1), (4, "cpu", None, None, 3), (64, "cuda", None, None, 8),
     (1, "cuda", "4", 32, 7), (1, "cuda", "4", 2, 1)],
)
def test_default_loader_workers(monkeypatch, threads, device, ranks, cpus, expected):
    monkeypatch.setattr(loader_module.torch, "get_num_threads", lambda: threads)
    if ranks is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", ranks)
        monkeypatch.setattr(loader_module.os, "sched_getaffinity", lambda _pid: set(range(cpus)), raising=False)
    assert default_loader_workers(torch.device(device)) == expected
