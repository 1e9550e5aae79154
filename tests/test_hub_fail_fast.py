"""Hub names fail fast: an offline variable, or an unreachable hub, gives one line naming the argument at once
(no minute of "Retrying in Ns"), and a name in the local Hugging Face cache still loads from it.

Every test isolates the caches in tmp_path and resets the once-per-process probe."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from fastgrpo.cli import main
from fastgrpo.train import hub

MODEL, DATASET = "nonexistent-org/nonexistent-model", "some-org/missing-ds"


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Empty caches under tmp_path, no offline variable, a fresh probe memo; returns the caches."""
    import datasets
    from huggingface_hub import constants

    caches = tmp_path / "hub", tmp_path / "datasets"
    for c in caches:
        c.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(caches[0]))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", caches[1])
    for var in (*hub.OFFLINE_VARS, "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hub, "_PROBED", {})
    monkeypatch.setattr(hub, "_ANNOUNCED", set())
    return caches


def _no_probe(monkeypatch):
    def probe(*a, **k):
        raise AssertionError("the hub was probed")

    monkeypatch.setattr(hub, "probe_hub", probe)


def _unreachable(monkeypatch, calls=None):
    def probe(endpoint, timeout=hub.PROBE_TIMEOUT_S):
        if calls is not None:
            calls.append(endpoint)
        return "ConnectError: [Errno -2] Name or service not known"

    monkeypatch.setattr(hub, "probe_hub", probe)


def _local_data(tmp_path) -> str:
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"}\n')
    return str(path)


def _fake_local_model(tmp_path) -> str:
    """Enough of a model folder for the checks before loading (the dataset fails first)."""
    folder = tmp_path / "local-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"")
    return str(folder)


def _train(tmp_path, model, dataset, *extra):
    argv = ["train", "--model", model, "--dataset", dataset, "--output_dir", str(tmp_path / "run")]
    return main([*argv, "--max_steps", "1", "--disable_tqdm", "true", *extra])


def _error_line(capsys) -> str:
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("fastgrpo train: error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize("var", hub.OFFLINE_VARS)
def test_offline_variable_refuses_an_uncached_model_without_the_network(isolated, tmp_path, monkeypatch, capsys, var):
    monkeypatch.setenv(var, "1")
    _no_probe(monkeypatch)
    start = time.monotonic()
    assert _train(tmp_path, MODEL, _local_data(tmp_path)) == 2
    assert time.monotonic() - start < 5
    err = _error_line(capsys)
    assert f"could not load model {MODEL!r} (--model): it is not a local folder, {var}=1 keeps" in err
    assert str(isolated[0]) in err and "Retrying" not in err


def test_offline_variable_refuses_an_uncached_dataset_without_the_network(isolated, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _no_probe(monkeypatch)
    assert _train(tmp_path, _fake_local_model(tmp_path), DATASET) == 2
    err = _error_line(capsys)
    assert f"could not load dataset {DATASET!r} (--dataset): it is not a local file or folder, HF_HUB_OFFLINE=1" in err


def test_unreachable_hub_refuses_a_model_in_one_line(isolated, tmp_path, monkeypatch, capsys):
    calls = []
    _unreachable(monkeypatch, calls)
    start = time.monotonic()
    assert _train(tmp_path, MODEL, _local_data(tmp_path)) == 2
    assert time.monotonic() - start < 5
    err = _error_line(capsys)
    assert err == (
        f"fastgrpo train: error: could not load model {MODEL!r} (--model): it is not a local folder, the Hugging "
        "Face Hub (https://huggingface.co) is unreachable (ConnectError: [Errno -2] Name or service not known), "
        f"and the local cache ({isolated[0]}) holds no copy; pass a local folder, or set HF_ENDPOINT to a mirror "
        "you can reach"
    )
    assert calls == ["https://huggingface.co"]


def test_unreachable_hub_refuses_a_dataset_in_one_line(isolated, tmp_path, monkeypatch, capsys):
    _unreachable(monkeypatch)
    assert _train(tmp_path, _fake_local_model(tmp_path), DATASET) == 2
    err = _error_line(capsys)
    assert f"could not load dataset {DATASET!r} (--dataset): it is not a local file or folder" in err
    assert "is unreachable (ConnectError" in err and str(isolated[1]) in err


def test_a_closed_port_endpoint_is_found_unreachable_quickly(isolated, tmp_path, monkeypatch, capsys):
    """The real probe, no stand-in: HF_ENDPOINT at a closed local port (the discard port)."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    assert _train(tmp_path, MODEL, _local_data(tmp_path)) == 2
    assert time.monotonic() - start < 10
    err = _error_line(capsys)
    assert "(--model)" in err and "Hub (http://127.0.0.1:9) is unreachable" in err


def test_the_probe_is_bounded_when_the_request_hangs(monkeypatch):
    """A name lookup or connect that hangs cannot hold the run: the probe gives up after its timeout."""
    import huggingface_hub.utils

    release = threading.Event()

    class Hanging:
        def head(self, *a, **k):
            release.wait(30)

    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: Hanging())
    start = time.monotonic()
    try:
        assert hub.probe_hub("https://example.invalid", timeout=0.2) == "no answer within 0.2 s"
    finally:
        release.set()
    assert time.monotonic() - start < 3


def test_an_http_answer_means_reachable(monkeypatch):
    import huggingface_hub.utils

    class Answers:
        def head(self, *a, **k):
            return object()

    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: Answers())
    assert hub.probe_hub("https://hub.example", timeout=1) is None


def test_a_reachable_hub_changes_nothing(isolated, monkeypatch):
    monkeypatch.setattr(hub, "probe_hub", lambda endpoint, timeout=hub.PROBE_TIMEOUT_S: None)
    assert hub.hub_source("--model", MODEL, "model") is False
    assert hub.hub_source("--dataset", DATASET, "dataset") is False


def test_local_paths_never_reach_the_probe(isolated, tmp_path, monkeypatch, capsys):
    _no_probe(monkeypatch)
    assert _train(tmp_path, str(tmp_path / "no-such-model"), str(tmp_path / "no-such.jsonl")) == 2
    assert "dataset file" in _error_line(capsys)


def test_check_hub_sources_refuses_before_anything_loads(isolated, tmp_path, monkeypatch):
    """The early call (the trainer's first step): the model is checked, the dataset too; a resume skips
    the model (it may load from the checkpoint alone)."""
    from fastgrpo.train.config import Config

    _unreachable(monkeypatch)
    cfg = Config()
    cfg.model.model, cfg.data.dataset = MODEL, _local_data(tmp_path)
    with pytest.raises(ValueError, match=r"\(--model\)"):
        hub.check_hub_sources(cfg)
    cfg.train.resume_from_checkpoint = "latest"
    hub.check_hub_sources(cfg)
    cfg.data.dataset = DATASET
    with pytest.raises(ValueError, match=r"\(--dataset\)"):
        hub.check_hub_sources(cfg)


def test_local_data_suffixes_match_the_loader():
    from fastgrpo.train.data import _LOCAL_FORMATS

    assert set(hub.LOCAL_DATA_SUFFIXES) == set(_LOCAL_FORMATS)


# ---- a name in the local cache loads from it


def _cache_model(hub_cache: Path, repo_id: str, tmp_path: Path) -> None:
    """A tiny random Qwen2 and the embedded task's tokenizer, laid out as huggingface_hub caches a repo."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from fastgrpo.train.embedded_task import build_tokenizer

    commit = "0" * 40
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    tokenizer = build_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def _cache_dataset(datasets_cache: Path, repo_id: str, tmp_path: Path) -> None:
    """A dataset as ``datasets`` leaves it after a first load (``org___name/config/version/hash``)."""
    import datasets

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"{a}+{a}=", "answer": str(2 * a)}) + "\n" for a in range(8)))
    scratch = tmp_path / "scratch"
    datasets.load_dataset("json", data_files={"train": [str(rows)]}, split="train", cache_dir=str(scratch))
    (built,) = [p for p in scratch.glob("json/*/*/*") if p.is_dir()]
    org, name = repo_id.split("/")
    target = datasets_cache / f"{org}___{name}" / "default" / "0.0.0" / "0123abcd"
    target.mkdir(parents=True)
    info = json.loads((built / "dataset_info.json").read_text())
    (target / "dataset_info.json").write_text(json.dumps({**info, "config_name": "default", "dataset_name": name}))
    shutil.copy(built / "json-train.arrow", target / f"{name}-train.arrow")


@pytest.mark.parametrize("how", ["unreachable", "offline"])
def test_a_cached_name_is_not_refused(isolated, tmp_path, monkeypatch, capsys, how):
    model, dataset = "fake-org/tiny-model", "fake-org/tiny-ds"
    _cache_model(isolated[0], model, tmp_path)
    _cache_dataset(isolated[1], dataset, tmp_path)
    if how == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        _no_probe(monkeypatch)
    else:
        _unreachable(monkeypatch)
    # The loaders must not ask the hub either: every request huggingface_hub's client would send is recorded
    # and fails as an unreachable hub does.
    import huggingface_hub.utils

    client, requests = type(huggingface_hub.utils.get_session()), []

    def send(self, request, *a, **k):
        requests.append(str(request.url))
        raise OSError("the hub is unreachable in this test")

    monkeypatch.setattr(client, "send", send)
    start = time.monotonic()
    flags = ["--num_generations", "2", "--per_device_train_batch_size", "4", "--max_completion_length", "4",
             "--reward_funcs", "accuracy", "--beta", "0"]  # fmt: skip
    assert _train(tmp_path, model, dataset, *flags) == 0, capsys.readouterr().err
    assert time.monotonic() - start < 30
    assert requests == []
    out, err = capsys.readouterr()
    if how == "unreachable":
        assert f"--model {model}: the Hugging Face Hub is unreachable" in out
        assert f"--dataset {dataset}: the Hugging Face Hub is unreachable" in out
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 1
