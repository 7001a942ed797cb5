"""Fine-tuning and classifier training on tiny models and data (a few steps each).

What is proved here: the loss goes down; an interrupted run resumes to exactly the state of
an uninterrupted one; the saved folders load in transformers with the same logits as ours;
the classifier learns a trivially learnable task, reports its validation accuracy, and its
folder works with `gptneo classify`; data reading, packing and the schedule do what they say.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers_cli import run_cli

from gptneo_cli.config import GPTNeoConfig
from gptneo_cli.errors import GPTNeoError
from gptneo_cli.modeling import GPTNeoForCausalLM, GPTNeoForSequenceClassification
from gptneo_cli.tokenizer import Tokenizer
from gptneo_cli.training import (
    CHECKPOINT_DIR,
    TRAINER_STATE,
    Document,
    TrainConfig,
    TrainingInterrupted,
    autocast_dtype,
    evaluate_lm,
    finetune,
    lr_factor,
    pack_blocks,
    prepare_lm_data,
    read_documents,
    train_bpe_tokenizer,
)
from gptneo_cli.training.classifier import (
    ClassifierConfig,
    fit_classifier,
    label_names,
    read_labeled,
    split_examples,
)

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "def sub(a, b):\n    return a - b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i * i)\n",
    "import os\nprint(os.getcwd())\n",
    "while True:\n    break\n",
    "def mul(a, b):\n    return a * b\n",
    "x = [i for i in range(5)]\n",
]


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random GPT-Neo with odd shapes (3 heads, local layer first, small window) and its
    own tiny BPE, saved in Hub format by our code."""
    folder = tmp_path_factory.mktemp("base")
    tok = train_bpe_tokenizer(TEXTS * 20, vocab_size=300)
    tok.save(folder)
    config = GPTNeoConfig(
        vocab_size=tok.vocab_size + 3,
        max_position_embeddings=64,
        hidden_size=24,
        num_layers=2,
        num_heads=3,
        intermediate_size=40,
        window_size=8,
        attention_types=[[["local", "global"], 1]],
        bos_token_id=tok.eos_id,
        eos_token_id=tok.eos_id,
    )
    torch.manual_seed(0)
    GPTNeoForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("text")
    for i in range(12):
        (folder / f"doc{i:02d}.py").write_text(TEXTS[i % len(TEXTS)] * 3, encoding="utf-8")
    return folder


def small_config(**changes: object) -> TrainConfig:
    values: dict = dict(
        block_size=16,
        batch_size=4,
        lr=1e-2,
        max_steps=20,
        eval_every=5,
        val_fraction=0.2,
        precision="float32",
        seed=3,
        log_every=1,
    )
    values.update(changes)
    return TrainConfig(**values)


def load_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# ---------------------------------------------------------------------------- causal LM


def test_finetune_loss_goes_down(base_model: Path, text_data: Path, tmp_path: Path) -> None:
    config = small_config(max_steps=30)
    tok = Tokenizer.from_folder(base_model)
    data = prepare_lm_data(read_documents([text_data]), tok, 16, 0.2, config.seed)
    before = evaluate_lm(GPTNeoForCausalLM.from_pretrained(base_model), data.val)

    result = finetune(base_model, [text_data], tmp_path / "out", config)

    assert result.steps == 30
    assert result.history[0]["step"] == 0  # the starting point is reported
    assert result.history[0]["val_loss"] == pytest.approx(before, abs=1e-5)
    assert result.best_val_loss is not None
    assert result.best_val_loss < before - 1.0, (before, result.history)
    # The saved model is the best one: its held-out loss is the recorded best.
    saved = GPTNeoForCausalLM.from_pretrained(tmp_path / "out")
    assert evaluate_lm(saved, data.val) == pytest.approx(result.best_val_loss, abs=1e-5)
    info = json.loads((tmp_path / "out" / "training.json").read_text())
    assert info["best_val_loss"] == pytest.approx(result.best_val_loss)
    assert info["val_documents"] == 2 and info["train_documents"] == 10
    assert not (tmp_path / "out" / CHECKPOINT_DIR).exists()  # removed after a finished run


def test_resume_reaches_the_same_state(base_model: Path, text_data: Path, tmp_path: Path) -> None:
    # grad_accum 2 and 14 steps over a few blocks: steps cross epoch boundaries too.
    config = small_config(max_steps=14, grad_accum=2, keep_checkpoint=True)
    full = finetune(base_model, [text_data], tmp_path / "full", config)

    calls = {"n": 0}

    def stop_after_six() -> bool:
        calls["n"] += 1
        return calls["n"] == 6

    with pytest.raises(TrainingInterrupted) as stopped:
        finetune(base_model, [text_data], tmp_path / "split", config, should_stop=stop_after_six)
    checkpoint = tmp_path / "split" / CHECKPOINT_DIR
    assert stopped.value.step == 6 and stopped.value.checkpoint == checkpoint
    # The library names the checkpoint; only the CLI speaks of --resume.
    assert str(checkpoint) in str(stopped.value) and "--" not in str(stopped.value)
    state = json.loads((checkpoint / TRAINER_STATE).read_text())["state"]
    assert state["step"] == 6

    resumed = finetune(base_model, [text_data], tmp_path / "split", config, resume_from=checkpoint)
    assert resumed.steps == full.steps == 14
    assert resumed.history == full.history
    final_full = load_tensors(tmp_path / "full" / CHECKPOINT_DIR)
    final_split = load_tensors(checkpoint)
    assert final_full.keys() == final_split.keys()
    for name, tensor in final_full.items():
        torch.testing.assert_close(final_split[name], tensor, rtol=0, atol=1e-6, msg=name)
    # The optimizer state continued too (Adam's step count is the global one).
    opt_full = torch.load(tmp_path / "full" / CHECKPOINT_DIR / "optimizer.pt", weights_only=True)
    opt_split = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    for key, value in opt_full["optimizer"]["state"].items():
        assert float(value["step"]) == 14
        torch.testing.assert_close(
            opt_split["optimizer"]["state"][key]["exp_avg_sq"],
            value["exp_avg_sq"],
            rtol=0,
            atol=1e-9,
        )


def test_resume_refuses_other_data(base_model: Path, text_data: Path, tmp_path: Path) -> None:
    config = small_config(max_steps=4, keep_checkpoint=True)
    finetune(base_model, [text_data], tmp_path / "a", config)
    other = tmp_path / "other.txt"
    other.write_text("something else entirely\n" * 40, encoding="utf-8")
    with pytest.raises(GPTNeoError, match="different data"):
        finetune(
            base_model, [other], tmp_path / "b", config, resume_from=tmp_path / "a" / CHECKPOINT_DIR
        )
    with pytest.raises(GPTNeoError, match="not a training checkpoint"):
        finetune(base_model, [text_data], tmp_path / "c", config, resume_from=tmp_path)


def test_finetune_output_loads_in_transformers(
    base_model: Path, text_data: Path, tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "out"
    finetune(base_model, [text_data], out, small_config(max_steps=6))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    ours = GPTNeoForCausalLM.from_pretrained(out)
    theirs = transformers.GPTNeoForCausalLM.from_pretrained(out).eval()
    # The weights really changed from the base model.
    base = load_tensors(base_model)["transformer.wte.weight"]
    assert not torch.allclose(ours.transformer.wte.weight, base)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, ours.config.vocab_size, (2, 40), generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=1e-5)
    # The tokenizer files are the base model's and load in transformers with equal ids.
    auto = transformers.AutoTokenizer.from_pretrained(out)
    text = "def add(a, b):\n    return a + b\n"
    assert auto(text)["input_ids"] == Tokenizer.from_folder(out).encode(text)


def test_save_dtype_float16(base_model: Path, text_data: Path, tmp_path: Path) -> None:
    finetune(
        base_model,
        [text_data],
        tmp_path / "out",
        small_config(max_steps=2),
        save_dtype=torch.float16,
    )
    tensors = load_tensors(tmp_path / "out")
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "float16"


def test_from_scratch_ignores_weights(base_model: Path, text_data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "config-only"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((base_model / name).read_bytes())
    a = finetune(folder, [text_data], tmp_path / "a", small_config(max_steps=3), from_scratch=True)
    b = finetune(folder, [text_data], tmp_path / "b", small_config(max_steps=3), from_scratch=True)
    assert a.history == b.history  # seeded init: reproducible
    assert torch.equal(
        load_tensors(tmp_path / "a")["transformer.h.0.mlp.c_fc.weight"],
        load_tensors(tmp_path / "b")["transformer.h.0.mlp.c_fc.weight"],
    )


def finetune_args(
    base_model: Path,
    text_data: Path,
    out: Path,
    *,
    batch_size: int,
    max_steps: int,
    eval_every: int,
) -> list[str]:
    """`gptneo finetune` of the base model on the text, 16-token blocks, into `out`."""
    return [
        "finetune",
        str(base_model),
        str(text_data),
        "--output",
        str(out),
        "--block-size",
        "16",
        "--batch-size",
        str(batch_size),
        "--max-steps",
        str(max_steps),
        "--eval-every",
        str(eval_every),
    ]


def test_cli_finetune(base_model: Path, text_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = run_cli(
        *finetune_args(base_model, text_data, out, batch_size=4, max_steps=3, eval_every=2),
        "--lr",
        "1e-3",
        "--format",
        "json",
        home=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    summary = json.loads(proc.stdout)
    assert summary["steps"] == 3 and summary["output"] == str(out)
    stderr = proc.stderr.decode()
    assert "step 3/3" in stderr and "eval step 2" in stderr and "tok/s" in stderr
    assert "eval step 0:" in stderr and "(before training)" in stderr
    assert b"\x1b" not in proc.stderr  # plain lines off a terminal
    assert (out / "model.safetensors").is_file()


def test_cli_finetune_bad_values(base_model: Path, tmp_path: Path) -> None:
    proc = run_cli(
        "finetune",
        str(base_model),
        str(tmp_path / "missing.txt"),
        "--output",
        str(tmp_path / "o"),
        home=tmp_path,
    )
    assert proc.returncode == 2
    assert b"missing.txt does not exist" in proc.stderr
    proc = run_cli(
        "finetune",
        str(base_model),
        str(tmp_path),
        "--output",
        str(tmp_path / "o"),
        "--precision",
        "float16",
        "--device",
        "cpu",
        home=tmp_path,
    )
    assert proc.returncode == 2 and b"float16 autocast needs a CUDA" in proc.stderr


# ---------------------------------------------------------------------------- data, schedule


def test_read_documents(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("beta", encoding="utf-8")
    (tmp_path / "sub" / "blob.bin").write_bytes(b"\x00\x01binary")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "c.txt").write_text("hidden", encoding="utf-8")
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"text": "one"}\n\n{"text": "two", "id": 3}\n', encoding="utf-8")
    docs = read_documents([tmp_path])
    assert [d.text for d in docs] == ["alpha", "one", "two", "beta"]
    assert [d.text for d in read_documents([tmp_path], suffixes=[".py"])] == ["beta"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2 has no 'text' field"):
        read_documents([bad])
    with pytest.raises(ValueError, match="not a UTF-8 text file"):
        read_documents([tmp_path / "sub" / "blob.bin"])


def test_packing_uses_every_token_once() -> None:
    ids = list(range(23))
    rows = pack_blocks(ids, 5)
    assert rows == [ids[0:6], ids[5:11], ids[10:16], ids[15:21]]
    targets = [t for r in rows for t in r[1:]]
    assert targets == ids[1:21]  # each token is a target exactly once
    assert pack_blocks(ids, 5, keep_tail=True)[-1] == ids[20:23]


def test_held_out_split_is_by_document(base_model: Path) -> None:
    tok = Tokenizer.from_folder(base_model)
    docs = [Document(f"d{i}", TEXTS[i % len(TEXTS)]) for i in range(20)]
    data = prepare_lm_data(docs, tok, 8, val_fraction=0.2, seed=0)
    assert (data.train_documents, data.val_documents) == (16, 4)
    single = prepare_lm_data([Document("one", " ".join(TEXTS) * 4)], tok, 8, 0.25, 0)
    assert single.val_documents == 0 and single.val_tokens > 0  # the stream's tail


def test_lr_schedule() -> None:
    factors = [lr_factor(s, warmup=4, total=20, min_ratio=0.1) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))
    assert factors[-1] == pytest.approx(0.1)
    assert factors[12] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 8 / 15)))


def test_precision_choice() -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None
    assert autocast_dtype("float32", cpu) is None
    assert autocast_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype("float16", cpu)
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype("fp8", cpu)
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0).validate()


# ---------------------------------------------------------------------------- classifier

WORDS = ["apple", "river", "stone", "cloud", "paper", "green", "light", "music"]


def labelled_rows(n: int, seed: int) -> list[dict[str, str]]:
    """The label is the last word (good/bad/meh): learnable from last-token features."""
    rng = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (4,), generator=rng)]
        label = ["good", "bad", "meh"][i % 3]
        rows.append({"text": " ".join(words) + f" is {label}", "label": label})
    return rows


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cls") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in labelled_rows(60, 0)), encoding="utf-8")
    return path


@pytest.mark.parametrize("train", ["head", "all"])
def test_classifier_loads_in_transformers(
    base_model: Path, labelled: Path, tmp_path: Path, train: str
) -> None:
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "clf"
    config = ClassifierConfig(
        train=train,
        epochs=20 if train == "head" else 2,
        batch_size=8,
        lr=3e-2 if train == "head" else 1e-3,
        val_fraction=0.2,
        precision="float32",
    )
    result = fit_classifier(base_model, [labelled], out, config)

    assert result.labels == ["bad", "good", "meh"]
    assert result.val_examples == 12 and result.train_examples == 48
    assert result.val_accuracy is not None
    if train == "head":
        assert result.val_accuracy == 1.0, result.history
    saved = json.loads((out / "config.json").read_text())
    assert saved["id2label"] == {"0": "bad", "1": "good", "2": "meh"}
    info = json.loads((out / "training.json").read_text())
    assert info["val_accuracy"] == result.val_accuracy

    ours = GPTNeoForSequenceClassification.from_pretrained(out)
    theirs = transformers.GPTNeoForSequenceClassification.from_pretrained(out).eval()
    assert theirs.config.id2label == ours.config.id2label
    tok = Tokenizer.from_folder(out)
    rows = [r["text"] for r in labelled_rows(6, 9)]
    with torch.no_grad():
        for text in rows:
            ids = torch.tensor([tok.encode(text)])
            torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=1e-5)
        # A right-padded batch: both read each row at its last real token.
        encoded = [tok.encode(t) for t in rows]
        width = max(map(len, encoded))
        ids = torch.tensor([e + [tok.pad_id] * (width - len(e)) for e in encoded])
        mask = torch.arange(width)[None] < torch.tensor([len(e) for e in encoded])[:, None]
        ours_logits = ours(ids, attention_mask=mask.long()).logits
        theirs_logits = theirs(ids, attention_mask=mask.long()).logits
        torch.testing.assert_close(ours_logits, theirs_logits, rtol=0, atol=1e-5)
    # The reported accuracy is what the saved model scores on the held-out split.
    _, val = split_examples(read_labeled([labelled]), config.val_fraction, config.seed)
    with torch.no_grad():
        predicted = [
            ours.config.id2label[int(ours(torch.tensor([tok.encode(e.text)])).logits.argmax())]
            for e in val
        ]
    accuracy = sum(p == e.label for p, e in zip(predicted, val, strict=True)) / len(val)
    assert accuracy == pytest.approx(result.val_accuracy)


def test_cli_train_classifier_then_classify(
    base_model: Path, labelled: Path, tmp_path: Path
) -> None:
    out = tmp_path / "clf"
    proc = run_cli(
        "train-classifier",
        str(base_model),
        str(labelled),
        "--output",
        str(out),
        "--epochs",
        "20",
        "--lr",
        "0.03",
        "--batch-size",
        "8",
        home=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    stdout = proc.stdout.decode()
    assert "val_accuracy: 1.0000" in stdout and "labels: bad, good, meh" in stdout
    assert "accuracy" in proc.stderr.decode()
    text = tmp_path / "input.txt"
    text.write_text("cloud river stone paper is meh", encoding="utf-8")
    proc = run_cli("classify", "--model", str(out), str(text), home=tmp_path)
    assert proc.returncode == 0, proc.stderr.decode()
    assert "meh" in proc.stdout.decode()


def test_read_labeled_csv_and_labels(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text('body,stars\n"great, really",10\nawful,2\nfine,2\nok,10\n', encoding="utf-8")
    examples = read_labeled([path], text_column="body", label_column="stars")
    assert [(e.text, e.label) for e in examples][:2] == [("great, really", "10"), ("awful", "2")]
    assert label_names(examples) == ["2", "10"]  # numeric order, not string order
    with pytest.raises(ValueError, match="no 'text' column"):
        read_labeled([path])
    train, val = split_examples(examples, 0.5, 0)
    assert sorted(e.label for e in val) == ["10", "2"]  # stratified: one of each
    assert len(train) == 2


def test_cli_ctrl_c_saves_a_checkpoint_and_resume_finishes(
    base_model: Path, text_data: Path, tmp_path: Path
) -> None:
    import signal
    import subprocess

    from helpers_cli import cli_env, gptneo_command

    out = tmp_path / "out"
    args = finetune_args(base_model, text_data, out, batch_size=2, max_steps=100000, eval_every=5)
    proc = subprocess.Popen(
        [*gptneo_command(), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(tmp_path),
        cwd=tmp_path,
    )
    assert proc.stderr is not None
    seen = []
    for raw in proc.stderr:  # wait until training is under way, then press "Ctrl-C"
        seen.append(raw.decode())
        if raw.startswith(b"step 1/"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 130, "".join(seen) + rest
    assert f"--resume {out / CHECKPOINT_DIR}" in rest
    state = json.loads((out / CHECKPOINT_DIR / TRAINER_STATE).read_text())["state"]
    assert state["step"] >= 1

    done = run_cli(
        *args[:-4],
        "--max-steps",
        str(state["step"] + 2),
        "--resume",
        str(out / CHECKPOINT_DIR),
        "--format",
        "json",
        home=tmp_path,
    )
    # (a longer or shorter run may be resumed: only the data must be the same)
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["steps"] == state["step"] + 2


def test_cli_finetune_rich_progress_on_a_terminal(
    base_model: Path, text_data: Path, tmp_path: Path
) -> None:
    """On a TTY, stderr carries a live Rich bar with the step count, loss, tokens/s and ETA."""
    import re

    from helpers_cli import gptneo_command, on_a_pty

    out = tmp_path / "out"
    child = on_a_pty(
        tmp_path,
        [
            *gptneo_command(),
            *finetune_args(base_model, text_data, out, batch_size=4, max_steps=4, eval_every=2),
        ],
        dimensions=(30, 160),
        encoding="utf-8",
        NO_COLOR="1",
        TERM="xterm",
    )
    assert child.exitstatus == 0, child.before
    assert "\x1b[2K" in child.before  # a live display redrawing its line, not plain lines
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", child.before)
    assert re.search(r"training .*4/4 loss \d+\.\d{4} [\d,]+ tok/s \d:\d\d:\d\d eta", screen)
    assert "eval step 2: val_loss" in screen and "step 1/4  loss" not in screen
    assert "Fine-tuning finished" in screen and (out / "model.safetensors").is_file()
