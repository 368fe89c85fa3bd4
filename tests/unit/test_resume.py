"""Resume state that knows where it came from: a job continues only the state that the same job made."""

import json
import logging
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from hnclip.resume import (
    FINGERPRINT_FILE,
    claim_state_dir,
    fingerprint_differences,
    input_digest,
    job_fingerprint,
    release_state_dir,
    source_digest,
)
from hnclip.provenance import sha256_file
from hnclip.train import train_job
from hnclip.train.trainer import Trainer
from tests.unit.test_train import _settings, _write_pairs


# ---- the state directory ---------------------------------------------------------------------------------------
def _fingerprint(**settings):
    return {"settings": {"lr": 0.001, **settings}, "inputs": {"a.parquet": "00"}, "code": "c1", "torch": "2"}


def test_a_new_state_dir_records_the_fingerprint(tmp_path):
    state = tmp_path / "state"
    assert claim_state_dir(state, _fingerprint()) is False
    assert json.loads((state / FINGERPRINT_FILE).read_text()) == _fingerprint()


def test_the_same_fingerprint_keeps_the_state(tmp_path):
    state = tmp_path / "state"
    claim_state_dir(state, _fingerprint())
    (state / "state.json").write_text("{}")
    assert claim_state_dir(state, _fingerprint()) is True
    assert (state / "state.json").exists()


def test_another_fingerprint_sets_the_state_aside_and_says_why(tmp_path, caplog):
    state = tmp_path / "state"
    claim_state_dir(state, _fingerprint())
    (state / "state.json").write_text('{"step": 400}')
    with caplog.at_level(logging.WARNING, logger="hnclip.resume"):
        assert claim_state_dir(state, _fingerprint(lr=0.01)) is False
    assert "settings.lr: 0.001 -> 0.01" in caplog.text
    assert not (state / "state.json").exists()
    assert json.loads((state / FINGERPRINT_FILE).read_text()) == _fingerprint(lr=0.01)
    stale = tmp_path / "state.stale"
    assert (stale / "state.json").read_text() == '{"step": 400}'
    # a second change replaces the stale copy: at most one per job takes disk
    (state / "state.json").write_text('{"step": 7}')
    claim_state_dir(state, _fingerprint(lr=0.1))
    assert (stale / "state.json").read_text() == '{"step": 7}'


def test_a_state_without_fingerprint_is_never_resumed(tmp_path, caplog):
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.json").write_text('{"step": 400}')
    with caplog.at_level(logging.WARNING, logger="hnclip.resume"):
        assert claim_state_dir(state, _fingerprint()) is False
    assert "it has no fingerprint" in caplog.text
    assert not (state / "state.json").exists()


def test_release_removes_the_state(tmp_path):
    state = tmp_path / "state"
    claim_state_dir(state, _fingerprint())
    release_state_dir(state)
    assert not state.exists()
    release_state_dir(state)  # nothing left: no error


def test_differences_name_every_changed_leaf():
    old = {"settings": {"lr": 1, "steps": 5}, "inputs": {"w": "aa"}, "code": "x"}
    new = {"settings": {"lr": 2, "steps": 5}, "inputs": {"w": "bb", "v": "cc"}, "code": "x"}
    assert fingerprint_differences(old, new) == [
        "inputs.v: '<absent>' -> 'cc'", "inputs.w: 'aa' -> 'bb'", "settings.lr: 1 -> 2",
    ]


def test_input_digest_covers_file_contents_and_directory_members(tmp_path):
    folder = tmp_path / "checkpoint"
    (folder / "sub").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / "sub" / "weights.bin").write_bytes(b"\x00" * 10)
    before = input_digest(folder)
    assert before == input_digest(folder)
    (folder / "sub" / "weights.bin").write_bytes(b"\x00" * 9 + b"\x01")
    assert input_digest(folder) != before
    (folder / "sub" / "weights.bin").write_bytes(b"\x00" * 10)
    assert input_digest(folder) == before
    (folder / "sub" / "weights.bin").rename(folder / "weights.bin")  # same bytes, another name
    assert input_digest(folder) != before
    assert input_digest(folder / "config.json") == "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        input_digest(tmp_path / "nowhere")


def test_source_digest_is_a_sha256_of_the_package():
    assert len(source_digest()) == 64 and int(source_digest(), 16) >= 0
    assert job_fingerprint({"x": 1}, [])["code"] == source_digest()


# ---- training jobs -----------------------------------------------------------------------------------------------
class Interrupted(Exception):
    """Stands for a killed job: raised after a checkpointed step, before the outputs are written."""


def _spec(shard: Path, out: Path, **settings) -> dict:
    return dict(
        settings=_settings(**settings), model_name="hnclip-tiny", init_weights=None, train_shards=[str(shard)],
        val_shards=[str(shard)], state_dir=str(out / "state"), out_weights=str(out / "model.safetensors"),
        out_log=str(out / "train_log.csv"), out_provenance=str(out / "provenance.json"), config={"test": True},
        device="cpu",
    )


def _interrupt_after(monkeypatch, step: int) -> None:
    original = Trainer.save_checkpoint

    def save_then_stop(self, at_step):
        original(self, at_step)
        if at_step >= step:
            raise Interrupted(at_step)

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_stop)


def _interrupted_run(monkeypatch, spec: dict, step: int = 6) -> None:
    with monkeypatch.context() as patch:
        _interrupt_after(patch, step)
        with pytest.raises(Interrupted):
            train_job(spec)
    assert json.loads((Path(spec["state_dir"]) / "state.json").read_text())["step"] == step


def _weights(spec: dict) -> dict[str, torch.Tensor]:
    return load_file(spec["out_weights"])


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert [key for key in a if not torch.equal(a[key], b[key])] == []


@pytest.fixture
def shard(tmp_path):
    folder = tmp_path / "pairs"
    folder.mkdir()
    return _write_pairs(folder)


@pytest.fixture
def reference(shard, tmp_path):
    """A straight run of each setting used below, for bit-for-bit comparison."""
    runs = {}
    for name, settings in {"lr1e-3": {}, "lr5e-3": {"lr": 5e-3}}.items():
        spec = _spec(shard, tmp_path / f"straight-{name}", **settings)
        train_job(spec)
        runs[name] = _weights(spec)
    return runs


def test_an_interrupted_job_with_unchanged_inputs_resumes_bit_identically(shard, tmp_path, reference, monkeypatch,
                                                                         caplog):
    spec = _spec(shard, tmp_path / "cell")
    _interrupted_run(monkeypatch, spec)
    with caplog.at_level(logging.INFO):
        train_job(spec)
    assert "continuing the state in" in caplog.text and "resuming from" in caplog.text
    assert caplog.text.count("saved resume state at step 12") == 1  # the last checkpoint is the final state
    _assert_same_weights(_weights(spec), reference["lr1e-3"])
    assert not Path(spec["state_dir"]).exists()  # finished: nothing left to resume
    assert pd.read_csv(spec["out_log"])["step"].tolist() == list(range(1, 13))


def test_a_changed_setting_retrains_from_scratch(shard, tmp_path, reference, monkeypatch, caplog):
    _interrupted_run(monkeypatch, _spec(shard, tmp_path / "cell"))
    changed = _spec(shard, tmp_path / "cell", lr=5e-3)
    with caplog.at_level(logging.INFO):
        train_job(changed)
    assert "setting aside the state" in caplog.text and "settings.train.lr: 0.001 -> 0.005" in caplog.text
    assert "resuming from" not in caplog.text
    _assert_same_weights(_weights(changed), reference["lr5e-3"])
    assert pd.read_csv(changed["out_log"])["step"].tolist() == list(range(1, 13))


def test_a_changed_input_file_retrains_from_scratch(shard, tmp_path, reference, monkeypatch, caplog):
    spec = _spec(shard, tmp_path / "cell")
    _interrupted_run(monkeypatch, spec)
    pairs = pd.read_parquet(shard)
    pairs.loc[0, "negative"] = "a changed caption"
    pairs.to_parquet(shard)
    with caplog.at_level(logging.INFO):
        train_job(spec)
    assert f"inputs.{shard}: '" in caplog.text and "resuming from" not in caplog.text
    straight = _spec(shard, tmp_path / "straight-changed")
    train_job(straight)
    _assert_same_weights(_weights(spec), _weights(straight))


def test_a_forced_rerun_of_a_finished_job_trains_again(shard, tmp_path, caplog):
    spec = _spec(shard, tmp_path / "cell")
    train_job(spec)
    first = _weights(spec)
    Path(spec["out_weights"]).unlink()
    with caplog.at_level(logging.INFO):
        train_job(spec)
    assert "starting fresh in" in caplog.text and "resuming from" not in caplog.text
    _assert_same_weights(_weights(spec), first)
    # the provenance records the digests the fingerprint took, and they are the files' own
    recorded = json.loads(Path(spec["out_provenance"]).read_text())["inputs"]
    assert recorded == {path: sha256_file(path) for path in [*spec["train_shards"], *spec["val_shards"]]}


def test_a_state_from_another_code_version_is_set_aside(shard, tmp_path, monkeypatch, caplog):
    spec = _spec(shard, tmp_path / "cell")
    _interrupted_run(monkeypatch, spec)
    fingerprint_file = Path(spec["state_dir"]) / FINGERPRINT_FILE
    recorded = json.loads(fingerprint_file.read_text())
    fingerprint_file.write_text(json.dumps({**recorded, "code": "0" * 64}))
    with caplog.at_level(logging.INFO):
        train_job(spec)
    assert f"code: '{'0' * 64}' -> '{source_digest()}'" in caplog.text
    assert "resuming from" not in caplog.text
    assert (tmp_path / "cell" / "state.stale" / "state.json").exists()
    shutil.rmtree(tmp_path / "cell" / "state.stale")
