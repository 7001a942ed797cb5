"""Training: causal-LM fine-tuning (lm.py) and heads on top of a checkpoint (classifier.py,
tagger.py, qa.py), built from one-job modules:

    data.py        read text files, folders and jsonl; split into train / held-out
    packing.py     tokenize and pack documents into blocks
    optim.py       AdamW groups, warmup + cosine schedule, mixed precision, one step
    report.py      the Reporter interface and the step-rate clock
    saving.py      atomic model-folder saves (wholly old or wholly new)
    checkpoint.py  resumable state of a causal-LM run
    heads.py       the loop shared by the head trainers
    bpe.py         byte-level BPE training for models made from scratch

Everything takes a model folder: resolving a name or alias to one is the caller's job.
"""

from .bpe import train_bpe_tokenizer
from .checkpoint import (
    CHECKPOINT_DIR,
    OPTIMIZER_STATE,
    TRAINER_STATE,
    CheckpointMismatch,
    read_checkpoint,
)
from .data import Document, read_documents, read_jsonl, split_documents, walk_files
from .lm import (
    TRAINING_INFO,
    TrainConfig,
    TrainingInterrupted,
    TrainResult,
    evaluate_lm,
    finetune,
    fresh_model,
    train_causal_lm,
)
from .optim import PRECISIONS, autocast_dtype, lr_factor
from .packing import LMData, pack_blocks, prepare_lm_data, token_stream
from .report import EvalStats, Reporter, StepStats, format_eval, format_step
from .saving import export_model, staged_folder

__all__ = [
    "CHECKPOINT_DIR",
    "OPTIMIZER_STATE",
    "PRECISIONS",
    "TRAINER_STATE",
    "TRAINING_INFO",
    "CheckpointMismatch",
    "Document",
    "EvalStats",
    "LMData",
    "Reporter",
    "StepStats",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "autocast_dtype",
    "evaluate_lm",
    "export_model",
    "finetune",
    "format_eval",
    "format_step",
    "fresh_model",
    "lr_factor",
    "pack_blocks",
    "prepare_lm_data",
    "read_checkpoint",
    "read_documents",
    "read_jsonl",
    "split_documents",
    "staged_folder",
    "token_stream",
    "train_bpe_tokenizer",
    "train_causal_lm",
    "walk_files",
]
