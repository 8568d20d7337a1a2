"""Generate the demo task's data: `lorakit/demo/data/train.jsonl` and `eval.jsonl`.

The task: write a date given in words as ISO 8601 (`YYYY-MM-DD`).

    user:      Write this date as YYYY-MM-DD: March 5, 2021
    assistant: 2021-03-05

Dates come in three spellings ("March 5, 2021", "5 March 2021", "Mar 5, 2021"). The skill is
systematic: twelve month names map to numbers, the day is zero-padded, the year is copied. The
shipped base model has seen no dates and no month names, so it cannot do it (0/120 exact match,
greedy); a LoRA fine-tune (r=4, all linear layers, 1.5% of the parameters, 300 steps of 16)
learns it and gets 117/120 right on the held-out dates, none of which occurs in the training set
(not even in another spelling).

Deterministic (fixed seed, no clock); rebuild with:

    python scripts/make_demo_data.py
"""

from __future__ import annotations

import argparse
import calendar
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "lorakit" / "demo" / "data"

INSTRUCTION = "Write this date as YYYY-MM-DD: "
MONTHS = [
    "January", "February", "March", "April", "May", "June",
    "July", "August", "September", "October", "November", "December",
]  # fmt: skip
MONTHS_SHORT = [m[:3] for m in MONTHS]
YEARS = range(1950, 2050)
DEFAULT_SEED = 7


def spell(year: int, month: int, day: int, style: int) -> str:
    if style == 0:
        return f"{MONTHS[month - 1]} {day}, {year}"
    if style == 1:
        return f"{day} {MONTHS[month - 1]} {year}"
    return f"{MONTHS_SHORT[month - 1]} {day}, {year}"


def example(year: int, month: int, day: int, style: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": INSTRUCTION + spell(year, month, day, style)},
            {"role": "assistant", "content": f"{year:04d}-{month:02d}-{day:02d}"},
        ]
    }


def make_splits(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Distinct random dates; the first n_eval are held out, the next n_train train."""
    rng = random.Random(seed)
    dates: list[tuple[int, int, int]] = []
    seen: set[tuple[int, int, int]] = set()
    while len(dates) < n_train + n_eval:
        year, month = rng.choice(YEARS), rng.randint(1, 12)
        day = rng.randint(1, calendar.monthrange(year, month)[1])
        if (year, month, day) not in seen:
            seen.add((year, month, day))
            dates.append((year, month, day))
    eval_set = [example(*d, style=i % 3) for i, d in enumerate(dates[:n_eval])]
    train_set = [example(*d, style=rng.randrange(3)) for d in dates[n_eval:]]
    return train_set, eval_set


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--train", type=int, default=2000)
    p.add_argument("--eval", type=int, default=120)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    args = p.parse_args()
    train_set, eval_set = make_splits(args.train, args.eval, args.seed)
    write_jsonl(args.out / "train.jsonl", train_set)
    write_jsonl(args.out / "eval.jsonl", eval_set)
    print(f"wrote {len(train_set)} train and {len(eval_set)} eval examples to {args.out}")


if __name__ == "__main__":
    main()
