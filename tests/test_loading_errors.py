"""Config parsing and every loading failure: each gives one clear error naming the problem."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import gptneo_cli
from gptneo_cli.config import GPTNeoConfig, expand_attention_types
from gptneo_cli.errors import ConfigError, WeightsError

LM = gptneo_cli.GPTNeoForCausalLM


def test_attention_types_expand_one_entry_per_layer():
    assert expand_attention_types([[["global", "local"], 6]]) == ["global", "local"] * 6
    config = GPTNeoConfig.from_dict(
        {
            "model_type": "gpt_neo",
            "num_layers": 3,
            "attention_types": [[["local"], 1], [["global"], 2]],
        }
    )
    assert config.attention_layers == ["local", "global", "global"]


def test_config_defaults_and_derived_values():
    config = GPTNeoConfig.from_dict(
        {
            "model_type": "gpt_neo",
            "hidden_size": 64,
            "num_heads": 4,
            "num_layers": 2,
            "attention_types": [[["global", "local"], 1]],
            "intermediate_size": None,
            "dtype": "bfloat16",
        }
    )
    assert config.inner_size == 256 and config.head_dim == 16
    assert config.torch_dtype == "bfloat16"
    assert config.window_size == 256 and config.eos_token_id == 50256
    assert config.to_dict()["model_type"] == "gpt_neo"


def test_config_reads_labels():
    config = GPTNeoConfig.from_dict(
        {
            "model_type": "gpt_neo",
            "num_layers": 1,
            "attention_types": [[["global"], 1]],
            "id2label": {"0": "neg", "1": "pos"},
        }
    )
    assert config.num_labels == 2 and config.id2label == {0: "neg", 1: "pos"}
    assert config.label2id == {"neg": 0, "pos": 1}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2'"),
        ({"num_layers": 5}, "expand to 4 layers but num_layers is 5"),
        ({"attention_layers": ["global"] * 4}, "attention_layers does not match"),
        ({"attention_types": [[["sparse"], 4]]}, "unknown attention type"),
        ({"hidden_size": 30}, "not divisible"),
        ({"activation_function": "swiglu"}, "activation_function"),
    ],
)
def test_bad_configs_are_refused(change, message):
    data = {
        "model_type": "gpt_neo",
        "hidden_size": 32,
        "num_heads": 4,
        "num_layers": 4,
        "attention_types": [[["global", "local"], 2]],
    }
    data.update(change)
    with pytest.raises(ConfigError, match=message):
        GPTNeoConfig.from_dict(data)


def test_wrong_model_type_names_the_type_found(tiny_checkpoint):
    folder, _ = tiny_checkpoint("causal_lm", "one_layer")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="not a GPT-Neo model.*'llama'"):
        LM.from_pretrained(folder)


def test_missing_config_json(tiny_checkpoint):
    folder, _ = tiny_checkpoint("causal_lm", "one_layer")
    (folder / "config.json").unlink()
    with pytest.raises(ConfigError, match="no config.json"):
        LM.from_pretrained(folder)


def test_missing_folder(tmp_path):
    with pytest.raises(gptneo_cli.errors.ModelNotFoundError):
        LM.from_pretrained(tmp_path / "nope")


def test_no_weights(tiny_checkpoint):
    folder, _ = tiny_checkpoint("causal_lm", "one_layer")
    (folder / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no weights"):
        LM.from_pretrained(folder)


def _rewrite(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_tensor_is_listed(tiny_checkpoint):
    folder, _ = tiny_checkpoint("causal_lm", "local_first")
    _rewrite(folder, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(WeightsError, match=r"missing 1 tensor\(s\): transformer.h.1.mlp.c_fc.bias"):
        LM.from_pretrained(folder)


def test_wrongly_shaped_tensor_is_listed(tiny_checkpoint):
    folder, _ = tiny_checkpoint("causal_lm", "local_first")

    def shrink(t):
        t["transformer.ln_f.weight"] = torch.ones(7)

    _rewrite(folder, shrink)
    with pytest.raises(
        WeightsError,
        match=r"wrongly shaped.*transformer.ln_f.weight \[7\] "
        r"\(expected \[48\]\)",
    ):
        LM.from_pretrained(folder)


def test_unexpected_tensor_is_listed(tiny_checkpoint):
    folder, _ = tiny_checkpoint("causal_lm", "one_layer")

    def add(t):
        t["transformer.h.7.mlp.c_fc.weight"] = torch.ones(2)

    _rewrite(folder, add)
    with pytest.raises(WeightsError, match="unexpected 1 tensor.*transformer.h.7.mlp.c_fc.weight"):
        LM.from_pretrained(folder)


def test_old_attention_buffers_are_ignored(tiny_checkpoint):
    folder, ref = tiny_checkpoint("causal_lm", "one_layer")

    def add(t):
        t["transformer.h.0.attn.attention.bias"] = torch.ones(1, 1, 64, 64, dtype=torch.bool)
        t["transformer.h.0.attn.attention.masked_bias"] = torch.tensor(-1e9)
        t["lm_head.weight"] = t["transformer.wte.weight"].clone()

    _rewrite(folder, add)
    model = LM.from_pretrained(folder)
    ids = torch.randint(0, 101, (1, 5))
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, ref(ids).logits, atol=1e-5)


def test_truncated_safetensors(tiny_checkpoint):
    folder, _ = tiny_checkpoint("causal_lm", "one_layer")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        LM.from_pretrained(folder)


def test_garbage_safetensors(tiny_checkpoint):
    folder, _ = tiny_checkpoint("causal_lm", "one_layer")
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 50)
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        LM.from_pretrained(folder)


class Payload:
    """Unpickling this would run code in a full pickle; weights_only must refuse it."""

    def __reduce__(self):
        return (print, ("pwned",))


def test_bin_with_a_pickled_object_is_refused(tiny_checkpoint, capsys):
    folder, _ = tiny_checkpoint("causal_lm", "one_layer", fmt="bin")
    path = folder / "pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    state["evil"] = Payload()
    with open(path, "wb") as handle:
        torch.save(state, handle)
    with pytest.raises(WeightsError, match="refused: it is not a plain tensor checkpoint"):
        LM.from_pretrained(folder)
    assert "pwned" not in capsys.readouterr().out


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_bin_refusal_names_the_object_in_one_plain_line(tiny_checkpoint, capsys, zip_format):
    folder, _ = tiny_checkpoint("causal_lm", "one_layer", fmt="bin")
    path = folder / "pytorch_model.bin"
    state = torch.load(path, weights_only=True)
    state["evil"] = Payload()
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(WeightsError) as info:
        LM.from_pretrained(folder)
    message = str(info.value)
    assert "unsupported global" in message and "print" in message
    assert "weights_only" not in message
    assert "\n" not in message and "\x1b" not in message  # not torch's escaped paragraphs
    assert "weights_only` set to `False" not in message  # never advise a full pickle
    assert "pwned" not in capsys.readouterr().out


def test_legacy_bin_format_loads(tiny_checkpoint):
    """torch.save before torch 1.6 wrote a non-zip format that torch cannot memory-map."""
    folder, ref = tiny_checkpoint("causal_lm", "local_first", fmt="bin")
    path = folder / "pytorch_model.bin"
    torch.save(torch.load(path, weights_only=True), path, _use_new_zipfile_serialization=False)
    model = LM.from_pretrained(folder)
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        assert (model(ids).logits - ref(ids).logits).abs().max().item() < 1e-5


def test_bin_holding_something_else_than_tensors(tiny_checkpoint):
    folder, _ = tiny_checkpoint("causal_lm", "one_layer", fmt="bin")
    torch.save({"a": [1, 2, 3]}, folder / "pytorch_model.bin")
    with pytest.raises(WeightsError, match="name -> tensor mapping"):
        LM.from_pretrained(folder)


def test_input_longer_than_2048_positions(tmp_path):
    config = GPTNeoConfig.from_dict(
        {
            "model_type": "gpt_neo",
            "vocab_size": 11,
            "hidden_size": 8,
            "num_heads": 2,
            "num_layers": 1,
            "attention_types": [[["local"], 1]],
        }
    )
    model = LM(config).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 2048, dtype=torch.long)).logits.shape == (1, 2048, 11)
        with pytest.raises(ValueError, match="2049 positions is longer than the model's 2048"):
            model(torch.zeros(1, 2049, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the model's 2048 positions"):
        model.new_cache(1, 4096)


def test_bad_device_and_dtype(tiny_checkpoint):
    folder, _ = tiny_checkpoint("causal_lm", "one_layer")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        LM.from_pretrained(folder, device="tpu")
    with pytest.raises(ValueError, match="unknown dtype 'int4'"):
        LM.from_pretrained(folder, dtype="int4")
    with pytest.raises(gptneo_cli.errors.BackendError, match="CUDA is not available"):
        LM.from_pretrained(folder, device="cuda")
