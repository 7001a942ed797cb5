"""Speculative decoding: plain vs prompt lookup vs a self-int8 draft, batch 1, greedy.

    python benchmarks/spec_bench.py                         # demo model + 125M shape
    python benchmarks/spec_bench.py --shapes tiny --new 64 --repeats 1   # a quick check

Every mode continues the same Python source (the tail of gptneo_cli/generation.py, as many
tokens as the model's positions leave room for) and must produce the plain run's tokens
(greedy): a row whose tokens differ is marked. Reported per mode: decode tok/s (tokens
after the first / time after the first, the median of the repeats), the speed-up over
plain decoding (the median of each repeat's ratio: the modes run in turn within a repeat),
drafted and accepted tokens and the acceptance rate.

"tiny" is the bundled demo model, trained on Python code: its acceptance is real. "125m" is
a random-weight checkpoint of gpt-neo-125M's shape (benchmarks/bench.py writes it once, with
the GPT-2 vocabulary from ../shared/assets): its speeds are real, but random weights make
acceptance unlike a trained model's (lookup drafts its loops; int8 rounding flips its
near-tied choices), so read that row for the cost of drafting and verifying.
"125m-demo" is the demo model widened to gpt-neo-125M's weights (benchmarks/widen.py: the
same logits, 12 layers of hidden 768, the 50257-token head): trained acceptance at the real
model's cost per token, within the demo model's 256 positions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

SOURCE = REPO / "gptneo_cli" / "generation.py"
MODES: dict[str, dict[str, Any]] = {
    "plain": {},
    "prompt lookup 3": {"prompt_lookup": 3},
    "self-int8 draft": {"draft_model": "self-int8"},
}


def log(message: str) -> None:
    print(f"[spec_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load(shape: str, cache_dir: Path) -> tuple[Any, Any]:
    """The model (fast path, float32 on CPU) and its tokenizer."""
    import gptneo_cli

    if shape == "tiny":
        return gptneo_cli.load("tiny", dtype="float32", device="cpu")
    if shape == "125m-demo":
        import widen

        folder = widen.write_widened(cache_dir / "gpt-neo-125m-demo")
        return gptneo_cli.load(str(folder), dtype="float32", device="cpu")
    import bench

    folder = bench.checkpoint_with_tokenizer(shape, cache_dir)
    return gptneo_cli.load(str(folder), dtype="float32", device="cpu")


def prompt_ids(tokenizer: Any, positions: int, new: int) -> list[int]:
    """The last tokens of a Python source file that leave room for `new` more."""
    ids = tokenizer.encode(SOURCE.read_text(encoding="utf-8"))
    room = min(positions - new - 1, 512)
    return ids[-room:]


def make_config(options: dict[str, Any], args: argparse.Namespace) -> Any:
    from gptneo_cli.options import GenerationConfig

    return GenerationConfig(
        do_sample=False,
        ignore_eos=True,
        max_new_tokens=args.new,
        draft_tokens=args.draft_tokens,
        **options,
    )


def bench_shape(shape: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every mode once per repeat, in turn (the memory's speed drifts over minutes on these
    machines: interleaving puts each mode's runs in the same moments). The speed-up is the
    median over repeats of mode ÷ plain within the repeat."""
    from gptneo_cli.generation import generate

    model, tokenizer = load(shape, args.cache_dir)
    prompt = prompt_ids(tokenizer, model.config.max_position_embeddings, args.new)
    log(f"{shape}: prompt of {len(prompt)} tokens, {args.new} new, {args.repeats} repeats")
    configs = {mode: make_config(options, args) for mode, options in MODES.items()}
    for config in configs.values():  # warm-up, and the self-int8 draft's load
        generate(model, tokenizer, prompt, config.replace(max_new_tokens=8))
    speeds: dict[str, list[float]] = {mode: [] for mode in MODES}
    ratios: dict[str, list[float]] = {mode: [] for mode in MODES}
    last: dict[str, Any] = {}
    for _ in range(args.repeats):
        for mode, config in configs.items():
            last[mode] = generate(model, tokenizer, prompt, config)[0]
            speeds[mode].append(last[mode].timings.gen_tok_s)
            ratios[mode].append(speeds[mode][-1] / speeds["plain"][-1])
    rows = []
    for mode in MODES:
        result, rate = last[mode], last[mode].acceptance_rate
        rows.append(
            dict(
                shape=shape,
                mode=mode,
                tok_s=statistics.median(speeds[mode]),
                speedup=statistics.median(ratios[mode]),
                drafted=result.drafted,
                accepted=result.accepted,
                rate="-" if rate is None else f"{rate:.0%}",
                same="yes" if result.token_ids == last["plain"].token_ids else "NO",
            )
        )
        log(
            f"{shape} {mode}: {rows[-1]['tok_s']:.1f} tok/s "
            f"({', '.join(f'{r:.2f}x' for r in ratios[mode])}), "
            f"accepted {result.accepted}/{result.drafted}"
        )
    return rows


def markdown(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = (
        f"k = {args.draft_tokens} drafted tokens per step, {args.new} new tokens, greedy, "
        f"float32 target, batch 1, median of {args.repeats}\n\n"
        "| model | mode | decode tok/s | vs plain | drafted | accepted | acceptance | "
        "same tokens |\n|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['shape']} | {r['mode']} | {r['tok_s']:.1f} | {r['speedup']:.2f}x | {r['drafted']} "
        f"| {r['accepted']} | {r['rate']} | {r['same']} |"
        for r in rows
    ]
    return head + "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--shapes", default="tiny,125m-demo,125m", help="comma list of tiny, 125m-demo, 125m, 1.3b"
    )
    p.add_argument("--new", type=int, default=128, help="new tokens per run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--draft-tokens", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path.home() / ".cache" / "gptneo" / "bench",
        help="where random-weight checkpoints are written once",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows: list[dict[str, Any]] = []
    for shape in args.shapes.split(","):
        rows += bench_shape(shape.strip(), args)
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
