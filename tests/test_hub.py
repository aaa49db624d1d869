"""Hub ids and aliases resolve through huggingface_hub's cache, offline (no network in tests)."""

import shutil

import pytest

from memcli.loading.checkpoints import CheckpointError, resolve_checkpoint

from .support import fixture_checkpoint, point_hf_cache


def _fake_cache(hf_home, repo_id, source):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def test_alias_resolves_from_hf_home_offline(tmp_path, monkeypatch):
    hf_home = tmp_path / "hf"
    point_hf_cache(monkeypatch, hf_home)
    snapshot = _fake_cache(hf_home, "YuWangX/memoryllm-8b", fixture_checkpoint("memoryllm-8b-tiny"))
    assert resolve_checkpoint("memoryllm-8b").resolve() == snapshot.resolve()
    assert resolve_checkpoint("YuWangX/memoryllm-8b").resolve() == snapshot.resolve()


def test_missing_model_offline_is_one_clear_line(tmp_path, monkeypatch):
    point_hf_cache(monkeypatch, tmp_path / "empty")
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint("mplus-8b")
    message = str(err.value)
    assert "\n" not in message and "not downloaded" in message and "memcli pull" in message


def test_local_folder_wins_and_nonsense_is_refused(tmp_path):
    folder = fixture_checkpoint("memoryllm-7b-tiny")
    assert resolve_checkpoint(str(folder)) == folder
    with pytest.raises(CheckpointError, match="neither a folder nor a hub id"):
        resolve_checkpoint(str(tmp_path / "no-such-model.bin"))
