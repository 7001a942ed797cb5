"""train-tagger and train-qa: trained from the bundled demo model on tiny data, then used by
`gptneo tag` and `gptneo answer`.

What is proved here: the commands train heads that the task commands load and use (the
tagger finds the people and places of a new sentence; the QA head answers questions about an
unseen context); the heads are saved under transformers' names (`classifier.*`,
`qa_outputs.*`) and load in transformers with the same outputs; CoNLL and jsonl input, the
I-X label of a B-X word's later tokens, and one-line errors for bad data.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from helpers_cli import run_cli

import gptneo_cli
from gptneo_cli.tokenizer import Tokenizer
from gptneo_cli.training.tagger import encode_sentence, read_tagged, tag_names

TINY = Path(gptneo_cli.__file__).resolve().parent / "data" / "tiny"
PEOPLE = ["Ada", "Alan", "Grace", "Linus", "Guido", "Barbara", "Ken", "Dennis"]
PLACES = ["London", "Paris", "Berlin", "Tokyo", "Oslo", "Lima", "Cairo", "Delhi"]
TEMPLATES = [
    ["{P}", "lives", "in", "{L}", "."],
    ["{P}", "met", "{P}", "in", "{L}", "."],
    ["the", "train", "to", "{L}", "left", "late", "."],
    ["{P}", "wrote", "the", "code", "."],
    ["we", "flew", "from", "{L}", "to", "{L}", "with", "{P}", "."],
]


def conll_lines(n: int, seed: int) -> str:
    rng = random.Random(seed)
    lines = ["-DOCSTART- -X- O", ""]
    for _ in range(n):
        for word in rng.choice(TEMPLATES):
            if word == "{P}":
                lines.append(f"{rng.choice(PEOPLE)} NNP B-PER")
            elif word == "{L}":
                lines.append(f"{rng.choice(PLACES)} NNP B-LOC")
            else:
                lines.append(f"{word} X O")
        lines.append("")
    return "\n".join(lines)


def squad_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        person, place = rng.choice(PEOPLE), rng.choice(PLACES)
        other = rng.choice([p for p in PEOPLE if p != person])
        context = f"{person} lives in {place}. {other} works with {person} on the compiler."
        rows.append(
            {
                "question": f"Where does {person} live?",
                "context": context,
                "answers": {"text": [place], "answer_start": [context.index(place)]},
            }
        )
        rows.append(
            {
                "question": f"Who works with {person}?",
                "context": context,
                "answers": [{"text": other, "answer_start": context.index(other)}],
            }
        )
    return rows


def head_tensors(folder: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k for k in f.keys() if not k.startswith("transformer.")}  # noqa: SIM118


@pytest.fixture(scope="module")
def tagger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("tagger")
    (home / "words.conll").write_text(conll_lines(120, 0), encoding="utf-8")
    proc = run_cli(
        "train-tagger",
        "tiny",
        "words.conll",
        "-o",
        "tagger",
        "--epochs",
        "20",
        "--lr",
        "0.01",
        home=home,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert "labels: O, B-LOC, B-PER, I-LOC, I-PER" in proc.stdout.decode()
    return home / "tagger"


@pytest.fixture(scope="module")
def qa(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("qa")
    (home / "squad.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in squad_rows(40, 0)), encoding="utf-8"
    )
    proc = run_cli(
        "train-qa",
        "tiny",
        "squad.jsonl",
        "-o",
        "qa",
        "--epochs",
        "30",
        "--lr",
        "0.01",
        "--format",
        "json",
        home=home,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    summary = json.loads(proc.stdout)
    assert summary["train_examples"] + summary["val_examples"] == 80
    assert summary["val_accuracy"] is not None and "labels" not in summary
    return home / "qa"


def test_trained_tagger_tags_a_new_sentence(tagger: Path, tmp_path: Path) -> None:
    assert head_tensors(tagger) == {"classifier.weight", "classifier.bias"}
    config = json.loads((tagger / "config.json").read_text())
    assert config["architectures"] == ["GPTNeoForTokenClassification"]
    assert config["id2label"] == {"0": "O", "1": "B-LOC", "2": "B-PER", "3": "I-LOC", "4": "I-PER"}
    proc = run_cli(
        "tag",
        "--model",
        str(tagger),
        "--format",
        "jsonl",
        home=tmp_path,
        input="Ada met Alan in London .",
    )
    assert proc.returncode == 0, proc.stderr.decode()
    spans = [json.loads(line) for line in proc.stdout.decode().splitlines()]
    assert [(s["label"], s["text"]) for s in spans] == [
        ("PER", "Ada"),
        ("PER", "Alan"),
        ("LOC", "London"),
    ]


def test_trained_qa_head_answers_about_an_unseen_context(qa: Path, tmp_path: Path) -> None:
    assert head_tensors(qa) == {"qa_outputs.weight", "qa_outputs.bias"}
    story = tmp_path / "story.txt"
    story.write_text("Grace lives in Oslo. Ken works with Grace on the compiler.", encoding="utf-8")
    proc = run_cli(
        "answer",
        "Where does Grace live?",
        "--model",
        str(qa),
        "--context",
        str(story),
        "--format",
        "json",
        home=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["answer"] == "Oslo"


def test_heads_load_in_transformers(tagger: Path, qa: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from gptneo_cli.modeling import GPTNeoForQuestionAnswering, GPTNeoForTokenClassification

    ids = torch.tensor([Tokenizer.from_folder(tagger).encode("Ken flew to Oslo with Ada .")])
    ours = GPTNeoForTokenClassification.from_pretrained(tagger)
    theirs = transformers.GPTNeoForTokenClassification.from_pretrained(tagger).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=1e-4)
    ours = GPTNeoForQuestionAnswering.from_pretrained(qa)
    theirs = transformers.GPTNeoForQuestionAnswering.from_pretrained(qa).eval()
    with torch.no_grad():
        a, b = ours(ids), theirs(ids)
        torch.testing.assert_close(a.start_logits, b.start_logits, rtol=0, atol=1e-4)
        torch.testing.assert_close(a.end_logits, b.end_logits, rtol=0, atol=1e-4)


def test_tagger_data_formats_and_subword_labels(tmp_path: Path) -> None:
    jsonl = tmp_path / "tags.jsonl"
    jsonl.write_text(
        json.dumps({"tokens": ["Supercalifragilistic", "Oslo"], "ner_tags": ["B-MISC", "B-LOC"]})
        + "\n",
        encoding="utf-8",
    )
    conll = tmp_path / "tags.conll"
    conll.write_text("-DOCSTART- O\n\nAda B-PER\nwrote O\n\n\nKen B-PER\n", encoding="utf-8")
    sentences = read_tagged([jsonl, conll])
    assert [s.words for s in sentences] == [
        ["Supercalifragilistic", "Oslo"],
        ["Ada", "wrote"],
        ["Ken"],
    ]
    labels = tag_names(sentences)
    assert labels == ["O", "B-LOC", "B-MISC", "B-PER", "I-LOC", "I-MISC", "I-PER"]
    tok = Tokenizer.from_folder(TINY)
    label2id = {label: i for i, label in enumerate(labels)}
    ids, ys = encode_sentence(tok, sentences[0], label2id)
    assert ids == tok.encode("Supercalifragilistic Oslo")
    first_word = len(tok.encode("Supercalifragilistic"))
    assert first_word > 1  # the long word is several tokens
    names = [labels[y] for y in ys]
    assert names[:first_word] == ["B-MISC"] + ["I-MISC"] * (first_word - 1)
    assert names[first_word] == "B-LOC"


@pytest.mark.parametrize(
    "command,content,words",
    [
        ("train-tagger", "Ada B-PER\nmet\n", "expected a word and its label"),
        ("train-tagger", '{"tokens": ["a", "b"], "labels": ["O"]}\n', "2 words and 1 label"),
        (
            "train-qa",
            '{"question": "q?", "context": "abc", "answer": "zz"}\n',
            "is not in the context",
        ),
        (
            "train-qa",
            '{"question": "q?", "context": "abc", "answers": {"text": ["b"], '
            '"answer_start": [0]}}\n',
            "does not point at the answer",
        ),
    ],
)
def test_bad_data_is_one_line(tmp_path: Path, command: str, content: str, words: str) -> None:
    data = tmp_path / ("data.jsonl" if content.startswith("{") else "data.conll")
    data.write_text(content, encoding="utf-8")
    proc = run_cli(command, "tiny", str(data), "-o", str(tmp_path / "out"), home=tmp_path)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and err.count("\n") == 1 and words in err, err
    assert not (tmp_path / "out").exists()
