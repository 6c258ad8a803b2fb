"""Passkey retrieval by length and depth: a random 5-digit key hidden at a relative depth in filler text.

lm-eval calls ``make_dataset(**metadata)``; metadata carries ``length`` (prompt tokens), ``tokenizer`` (a path),
``depths`` and ``seed``.  Documents cycle through the depths, so any --limit covers several depths.
"""

from __future__ import annotations

import random
import re

from convert.evaluate.tasks.common import tokenizer as load_tokenizer

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"
GEN_SLACK = 16  # tokens left free for the answer
DEFAULT_DEPTHS = (0.1, 0.5, 0.9)
N_PER_DEPTH = 10


def _n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False).input_ids)


def build_prompt(tok, length: int, depth: float, key: str) -> str:
    """The longest prompt with the key at ``depth`` (0 = start, 1 = end) that fits ``length - GEN_SLACK`` tokens;
    the filler is cut at a word, found by binary search on the word count."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    limit = length - GEN_SLACK
    per_word = max(1.0, _n_tokens(tok, FILLER * 8) / len((FILLER * 8).split()))
    words = (FILLER * (int(limit / per_word / 15) + 2)).split()

    def make(n: int) -> str:
        before = int(round(n * depth))
        return INTRO + " ".join(words[:before]) + needle + " ".join(words[before:n]) + QUESTION

    lo, hi = 0, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _n_tokens(tok, make(mid)) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return make(lo)


def make_dataset(length: int, tokenizer: str, depths=DEFAULT_DEPTHS, seed: int = 0, per_depth: int = N_PER_DEPTH,
                 **_) -> dict:
    import datasets  # here, not at import: passkey-multi and the recipe check read this module's constants

    tok = load_tokenizer(str(tokenizer))
    rng = random.Random(f"{seed}-{length}")
    rows = []
    for i in range(per_depth * len(depths)):
        depth = float(depths[i % len(depths)])
        key = str(rng.randint(10000, 99999))
        prompt = build_prompt(tok, int(length), depth, key)
        rows.append({"input": prompt, "answer": key, "depth": depth, "length": int(length),
                     "n_tokens": _n_tokens(tok, prompt)})
    return {"test": datasets.Dataset.from_list(rows)}


def score(generation: str, answer: str) -> float:
    """1.0 when the first number in the generation is exactly the key (123456 is not 12345)."""
    m = re.search(r"\d+", generation)
    return float(bool(m) and m.group(0) == answer)


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    return {"acc": score(results[0], doc["answer"])}
