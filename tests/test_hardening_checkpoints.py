"""A hostile or broken checkpoint: it reads nothing outside its folder, and every defect in
it is one clear error before anything large is built (issue 11: security, limits, garbage)."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import gptneo_cli
from gptneo_cli import preflight
from gptneo_cli.config import GPTNeoConfig
from gptneo_cli.errors import ConfigError, HubError, WeightsError
from gptneo_cli.fast import FastCausalLM
from gptneo_cli.hub import shards_from_index, weights_present
from gptneo_cli.paths import name_problem

LM = gptneo_cli.GPTNeoForCausalLM
LOADERS = [LM.from_pretrained, FastCausalLM.from_pretrained]


def _shard_to(folder, name):
    """Turn a single-file checkpoint into a one-shard index that names `name`."""
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: name for k in tensors}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return tensors


# ---- what a checkpoint may reference ---------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "../outside.safetensors",
        "sub/../../outside.safetensors",
        "ABSOLUTE",
        "..\\outside.safetensors",
        "C:\\x.safetensors",
    ],
)
@pytest.mark.parametrize("load", LOADERS, ids=["reference", "fast"])
def test_a_shard_outside_the_folder_is_refused_before_it_is_opened(
    tiny_checkpoint, tmp_path, monkeypatch, name, load
):
    folder, _ = tiny_checkpoint("causal_lm", "one_layer")
    outside = tmp_path / "outside.safetensors"
    name = str(outside) if name == "ABSOLUTE" else name
    tensors = _shard_to(folder, name)
    save_file(tensors, str(outside))  # a perfectly loadable file: it must still be refused
    opened = []
    real_open = type(outside).open

    def spy(self, *args, **kwargs):
        opened.append(self.name)
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(type(outside), "open", spy)
    with pytest.raises(WeightsError, match="only read files inside its own folder"):
        load(folder)
    assert "outside.safetensors" not in opened


def test_a_symlinked_shard_leading_outside_is_refused(tiny_checkpoint, tmp_path):
    folder, _ = tiny_checkpoint("causal_lm", "one_layer")
    tensors = _shard_to(folder, "model-00001.safetensors")
    save_file(tensors, str(tmp_path / "elsewhere.safetensors"))
    os.symlink(tmp_path / "elsewhere.safetensors", folder / "model-00001.safetensors")
    with pytest.raises(WeightsError, match="resolves outside the model folder"):
        LM.from_pretrained(folder)


def test_a_hub_cache_snapshot_with_blob_symlinks_loads(tiny_checkpoint, tmp_path):
    """The Hugging Face cache layout: snapshot files are symlinks into ../../blobs/."""
    folder, ref = tiny_checkpoint("causal_lm", "one_layer")
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    tensors = load_file(str(folder / "model.safetensors"))
    names = sorted(tensors)
    half = len(names) // 2
    for shard, part in (
        ("model-1.safetensors", names[:half]),
        ("model-2.safetensors", names[half:]),
    ):
        blob = repo / "blobs" / f"blob-{shard}"
        save_file({k: tensors[k] for k in part}, str(blob))
        os.symlink(os.path.join("..", "..", "blobs", blob.name), snapshot / shard)
    weight_map = {
        k: "model-1.safetensors" if k in names[:half] else "model-2.safetensors" for k in names
    }
    (repo / "blobs" / "index").write_text(json.dumps({"weight_map": weight_map}))
    os.symlink("../../blobs/index", snapshot / "model.safetensors.index.json")
    shutil.copy(folder / "config.json", repo / "blobs" / "config")
    os.symlink("../../blobs/config", snapshot / "config.json")
    model = LM.from_pretrained(snapshot)
    ids = torch.randint(0, 101, (1, 6))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)
    assert weights_present(snapshot)


def test_the_hub_never_fetches_a_shard_named_outside_the_repo(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "../../../../etc/passwd"}}))
    with pytest.raises(HubError, match="inside its own folder"):
        shards_from_index(index)
    assert not weights_present(tmp_path)


@pytest.mark.parametrize(
    "name, ok",
    [
        ("model-00001-of-00002.safetensors", True),
        ("sub/shard.safetensors", True),
        ("", False),
        ("/etc/passwd", False),
        ("a/../../b", False),
        ("x\x00y", False),
        (3, False),
    ],
)
def test_shard_names_are_checked_as_text(name, ok):
    assert (name_problem(name) is None) == ok


# ---- tensors that do not fit ------------------------------------------------------------


def test_a_wrongly_shaped_tensor_is_listed_once(tiny_checkpoint):
    folder, _ = tiny_checkpoint("causal_lm", "one_layer")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["transformer.h.0.mlp.c_fc.bias"] = torch.ones(5)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError) as info:
        LM.from_pretrained(folder)
    message = str(info.value)
    assert "wrongly shaped 1 tensor(s): transformer.h.0.mlp.c_fc.bias [5]" in message
    assert "missing" not in message


@pytest.mark.parametrize("load", LOADERS, ids=["reference", "fast"])
def test_an_integer_dtype_in_the_header_is_refused(tiny_checkpoint, load):
    """F32 -> I32 keeps every byte size, so only the dtype itself can tell."""
    folder, _ = tiny_checkpoint("causal_lm", "one_layer")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    header["transformer.ln_f.weight"]["dtype"] = "I32"
    raw = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    assert len(raw) == length
    path.write_bytes(data[:8] + raw + data[8 + length :])
    with pytest.raises(
        WeightsError,
        match=r"integer data for floating-point parameters in 1 "
        r"tensor\(s\): transformer.ln_f.weight int32",
    ):
        load(folder)


# ---- .bin files that are not checkpoints ------------------------------------------------


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("content", ["random", "text", "empty", "raw_pickle", "zip_random"])
def test_a_bin_that_is_not_a_checkpoint_is_one_plain_line(tiny_checkpoint, capfd, content):
    folder, _ = tiny_checkpoint("causal_lm", "one_layer", fmt="bin")
    data = {
        "random": os.urandom(8192),
        "text": b"hello world\n" * 20,
        "empty": b"",
        "raw_pickle": pickle.dumps({"a": Payload()}),
        "zip_random": b"PK\x03\x04" + os.urandom(8192),
    }[content]
    (folder / "pytorch_model.bin").write_bytes(data)
    capfd.readouterr()  # the builder's own progress lines
    with pytest.raises(WeightsError) as info:
        LM.from_pretrained(folder)
    message = str(info.value)
    assert message.startswith("pytorch_model.bin is not a readable PyTorch checkpoint")
    assert "\n" not in message and "weights_only" not in message
    captured = capfd.readouterr()
    assert "pwned" not in captured.out and captured.err == ""


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_refused_pickle_says_what_and_why_without_advice_to_bypass(
    tiny_checkpoint, capfd, zip_format
):
    folder, _ = tiny_checkpoint("causal_lm", "one_layer", fmt="bin")
    path = folder / "pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    state["evil"] = Payload()
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(WeightsError) as info:
        LM.from_pretrained(folder)
    message = str(info.value)
    assert "was refused" in message and "system" in message and "could run code" in message
    assert "weights_only" not in message and "False" not in message
    assert "pwned" not in capfd.readouterr().out


# ---- config.json --------------------------------------------------------------------------


BASE = {
    "model_type": "gpt_neo",
    "hidden_size": 32,
    "num_heads": 4,
    "num_layers": 2,
    "attention_types": [[["global", "local"], 1]],
}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"layer_norm_epsilon": "abc"}, "layer_norm_epsilon must be a small positive number"),
        ({"layer_norm_epsilon": -1e-5}, "layer_norm_epsilon must be a small positive number"),
        ({"layer_norm_epsilon": 0}, "layer_norm_epsilon"),
        ({"layer_norm_epsilon": None}, "layer_norm_epsilon"),
        ({"id2label": {"zero": "neg", "one": "pos"}}, "id2label key must be an integer"),
        ({"id2label": ["neg", "pos"]}, "id2label and label2id must be JSON objects"),
        ({"label2id": {"neg": "x"}}, "label2id value must be an integer"),
        ({"vocab_size": 1.5}, "vocab_size must be a positive integer"),
        ({"num_labels": 0}, "num_labels must be a positive integer"),
        ({"intermediate_size": "big"}, "intermediate_size must be a positive integer"),
        ({"eos_token_id": -3}, "eos_token_id must be a token id"),
        ({"activation_function": ["gelu"]}, "activation_function"),
        ({"torch_dtype": 5}, "torch_dtype"),
        ({"attention_types": [[[["global"]], 2]]}, "unknown attention type"),
    ],
)
def test_bad_config_values_are_refused_when_read(change, message):
    with pytest.raises(ConfigError, match=message):
        GPTNeoConfig.from_dict({**BASE, **change})


def test_deeply_nested_config_json_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(
        '{"model_type": "gpt_neo", "x": ' + "[" * 100000 + "]" * 100000 + "}"
    )
    with pytest.raises(ConfigError, match="nested too deeply"):
        GPTNeoConfig.from_json_file(tmp_path)


def test_a_negative_epsilon_in_a_checkpoint_is_refused_on_load(tiny_checkpoint):
    folder, _ = tiny_checkpoint("causal_lm", "one_layer")
    data = json.loads((folder / "config.json").read_text())
    data["layer_norm_epsilon"] = -0.5
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="layer_norm_epsilon"):
        LM.from_pretrained(folder)


# ---- sizes: checked against the weights and the memory before building ----------------


@pytest.mark.parametrize("load", LOADERS, ids=["reference", "fast"])
@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"num_layers": 1_000_000, "attention_types": [[["global"], 1_000_000]]},
            "num_layers is 1000000 but the weights hold 1 layers",
        ),
        ({"vocab_size": 10_000_000}, r"vocab_size x hidden_size is \[10000000, 24\]"),
        ({"max_position_embeddings": 999}, "max_position_embeddings"),
        ({"intermediate_size": 7}, "intermediate_size"),
    ],
)
def test_a_config_the_weights_contradict_is_refused_before_building(
    tiny_checkpoint, monkeypatch, load, change, message
):
    folder, _ = tiny_checkpoint("causal_lm", "one_layer")
    data = json.loads((folder / "config.json").read_text())
    data.update(change)
    data.pop("attention_layers", None)
    (folder / "config.json").write_text(json.dumps(data))

    def built(*args, **kwargs):
        raise AssertionError("a model was built before the check")

    monkeypatch.setattr(gptneo_cli.modeling.GPTNeoModel, "__init__", built)
    with pytest.raises(WeightsError, match=message):
        load(folder)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_weights_larger_than_the_memory_are_refused_before_building(
    tiny_checkpoint, monkeypatch, fmt
):
    folder, _ = tiny_checkpoint("causal_lm", "one_layer", fmt=fmt)
    monkeypatch.setattr(preflight, "device_memory", lambda device: 1000)
    with pytest.raises(
        preflight.OutOfMemoryError,
        match=r"out of memory: this model's weights "
        r"alone need 0\.0 GB",
    ):
        LM.from_pretrained(folder)


def test_memory_check_uses_the_dtype_and_quantization():
    config = GPTNeoConfig.from_dict({"model_type": "gpt_neo"})  # 1.3B-shaped defaults
    count = config.num_parameters()
    assert preflight.weight_bytes(config, torch.float32) == 4 * count
    assert preflight.weight_bytes(config, torch.bfloat16) == 2 * count
    assert preflight.weight_bytes(config, torch.float32, "int8") == count
    assert preflight.device_memory(torch.device("cpu")) > 0
