"""download_model.py in every mode, each in its own temporary model store."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, store_entries


def download(home, *args, **env):
    full_env = {**os.environ, "BENTOML_HOME": str(home), **env}
    return subprocess.run(
        [sys.executable, "download_model.py", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def entries(home):
    return store_entries(home)


def test_random_init_is_labelled_and_idempotent(tmp_path):
    first = download(tmp_path, "--random-init", "--tiny")
    assert first.returncode == 0, first.stderr
    tag = first.stdout.strip()
    assert tag.startswith("gpt2:")
    assert "RANDOM WEIGHTS" in first.stderr
    again = download(tmp_path, "--random-init", "--tiny")
    assert again.stdout.strip() == (
        f"{tag} (already imported from random:gpt2-tiny:seed0; --force to import again)"
    )
    stored = entries(tmp_path)
    assert list(stored) == [tag]
    info = stored[tag].info
    assert info.labels == {"source": "random", "architecture": "gpt2", "weights": "random"}
    assert info.metadata["random_weights"] is True
    assert info.metadata["parameters"] == 3_382_080  # tiny GPT-2, tied embeddings
    assert info.metadata["context_length"] == 1024
    forced = download(tmp_path, "--random-init", "--tiny", "--force")
    assert forced.returncode == 0 and forced.stdout.strip() != tag
    assert len(entries(tmp_path)) == 2


@pytest.fixture
def hf_dir(tmp_path, tiny_model, tokenizer):
    path = tmp_path / "hf"
    tiny_model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_from_dir_imports_a_hugging_face_directory(tmp_path, hf_dir):
    result = download(tmp_path / "store", "--from-dir", str(hf_dir), "--name", "mygpt")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("mygpt:")
    again = download(tmp_path / "store", "--from-dir", str(hf_dir), "--name", "mygpt")
    assert "already imported" in again.stdout


def test_from_dir_takes_the_seed_tutorials_layout(tmp_path, tiny_model, tokenizer):
    seed = tmp_path / "local_model" / "gpt2"
    tiny_model.save_pretrained(seed / "model")
    tokenizer.save_pretrained(seed / "tokenizer")
    result = download(tmp_path / "store", "--from-dir", str(seed))
    assert result.returncode == 0, result.stderr
    meta = next(iter(entries(tmp_path / "store").values())).info.metadata
    assert meta["source"] == f"dir:{seed}" and meta["random_weights"] is False


def test_from_dir_that_is_not_a_model_fails_clearly(tmp_path):
    result = download(tmp_path / "store", "--from-dir", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: --from-dir {tmp_path}: not a Hugging Face model")
    assert "Traceback" not in result.stderr


def test_unreachable_hub_exits_2_with_one_message_naming_the_offline_options(tmp_path):
    # The hub made unreachable on purpose: a closed port on loopback.
    result = download(tmp_path / "store", HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(
        "error: The Hugging Face Hub (http://127.0.0.1:9) is unreachable: "
    )
    assert "--from-dir PATH" in result.stderr and "--random-init" in result.stderr
    assert entries(tmp_path / "store") == {}


def test_hub_path_imports_from_the_hub_cache(tmp_path, tiny_model, tokenizer):
    # The real hub code path (from_pretrained by model id), served from a hub
    # cache laid out as the hub client writes it, in offline mode.
    repo = tmp_path / "hub" / "models--gpt2"
    snapshot = repo / "snapshots" / ("0" * 40)
    tiny_model.save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    result = download(tmp_path / "store", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    assert result.returncode == 0, result.stderr
    meta = next(iter(entries(tmp_path / "store").values())).info.metadata
    assert meta["source"] == "hub:gpt2@main"
    assert meta["hub_id"] == "gpt2" and meta["random_weights"] is False
