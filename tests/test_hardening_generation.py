"""Generation never turns a broken model or a failed allocation into silent junk or a raw
RuntimeError (issue 11: silent garbage, limits)."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from gptneo_cli.errors import WeightsError, is_out_of_memory
from gptneo_cli.fast import FastCausalLM
from gptneo_cli.generation import GenerationConfig, generate, stream
from gptneo_cli.hub import BUNDLED_DIR
from gptneo_cli.modeling import GPTNeoForCausalLM
from gptneo_cli.tokenizer import load_tokenizer

LOADERS = [GPTNeoForCausalLM.from_pretrained, FastCausalLM.from_pretrained]


@pytest.fixture
def poisoned(tmp_path):
    """Factory: a copy of the bundled demo model with one tensor filled with `value`."""

    def make(value: float, name: str = "transformer.ln_f.weight"):
        folder = tmp_path / f"tiny-{value}"
        shutil.copytree(BUNDLED_DIR / "tiny", folder)
        tensors = load_file(str(folder / "model.safetensors"))
        tensors[name] = torch.full_like(tensors[name], value)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder

    return make


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
@pytest.mark.parametrize("load", LOADERS, ids=["reference", "fast"])
def test_non_finite_logits_stop_generation_with_a_clear_error(poisoned, value, greedy, load):
    folder = poisoned(value)
    model, tokenizer = load(folder), load_tokenizer(folder)
    config = GenerationConfig(max_new_tokens=5, do_sample=not greedy, seed=1)
    with pytest.raises(WeightsError, match="NaN or infinite scores.*checkpoint is likely corrupt"):
        generate(model, tokenizer, "Once upon a time", config)
    with pytest.raises(WeightsError, match="likely corrupt"):
        for _ in stream(model, tokenizer, "Once upon a time", config):
            pass


def test_a_sound_model_still_generates(poisoned):
    folder = poisoned(1.0)  # ln_f all ones: finite, just a different model
    model, tokenizer = FastCausalLM.from_pretrained(folder), load_tokenizer(folder)
    [result] = generate(
        model, tokenizer, "Once", GenerationConfig(max_new_tokens=4, do_sample=False)
    )
    assert result.completion_tokens == 4


def test_an_allocation_failure_mid_generation_is_a_memory_error(monkeypatch):
    model = FastCausalLM.from_pretrained(BUNDLED_DIR / "tiny")
    tokenizer = load_tokenizer(BUNDLED_DIR / "tiny")
    real = model.forward
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:  # after the prefill and one decode step
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't "
                "allocate memory: you tried to allocate 123456789012 bytes."
            )
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "forward", failing)
    with pytest.raises(MemoryError, match="out of memory while generating"):
        generate(
            model,
            tokenizer,
            "Once",
            GenerationConfig(max_new_tokens=8, do_sample=False, ignore_eos=True),
        )


@pytest.mark.parametrize(
    "exc, oom",
    [
        (
            RuntimeError(
                "DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 bytes"
            ),
            True,
        ),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
        (MemoryError(), True),
        (RuntimeError("shape mismatch"), False),
        (ValueError("out of memory"), False),
    ],
)
def test_out_of_memory_is_recognised(exc, oom):
    assert is_out_of_memory(exc) is oom


def test_more_sequences_than_memory_can_hold_are_refused_before_any_row_is_built(monkeypatch):
    from gptneo_cli import generation, preflight

    model = FastCausalLM.from_pretrained(BUNDLED_DIR / "tiny")
    tokenizer = load_tokenizer(BUNDLED_DIR / "tiny")
    built = []
    monkeypatch.setattr(generation, "_Row", lambda *a, **k: built.append(1))
    config = GenerationConfig(max_new_tokens=5, do_sample=True, num_return_sequences=10**9)
    with pytest.raises(
        preflight.OutOfMemoryError,
        match="out of memory: 1000000000 sequences at once need more than",
    ):
        generate(model, tokenizer, "x", config)
    assert built == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_finite_check_finds_any_bad_score_and_never_a_good_one(dtype):
    """all_finite sums the scores instead of checking each: one NaN, +inf or -inf anywhere
    (and +inf next to -inf) must still be found, and large finite scores in a half type,
    whose own sum would overflow, must not be taken for bad ones."""
    from gptneo_cli.generation import all_finite

    big = torch.full((8, 50257), 6.0e4 if dtype == torch.float16 else 1.0e4, dtype=dtype)
    assert bool(all_finite(big)) and bool(all_finite(-big))
    for bad in ([float("nan")], [float("inf")], [float("-inf")], [float("inf"), float("-inf")]):
        scores = torch.randn(3, 101).to(dtype)
        for i, value in enumerate(bad):
            scores[i, 7 * i + 5] = value
        assert not bool(all_finite(scores))
