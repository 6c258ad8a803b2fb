"""Many passkeys per prefill (``passkey-multi``): one long haystack of the passkey task's filler carrying K labelled
keys ("The pass key for <word> is <5-digit number>.") at K evenly spread depths, then K short questions, each asked
after the haystack and answered greedily, scored by exact match of the first number (the passkey task's scorer).

The haystack is decoded once per prompt and every question reuses its KV cache
(``convert.runtimes.base.Runtime.generate_after``), so a prompt gives K samples for the cost of one prefill and K
short suffixes; n = K x prompts per length.  lm-eval's ``generate_until`` requests cannot share a prefix (each is a
whole prompt), so this task is run by the validation engine on the runtime interface, not through lm-eval.  It
follows RULER's multi-key needle-in-a-haystack task (Hsieh et al., "RULER: What's the Real Context Size of Your
Long-Context Language Models?", 2024; NVIDIA/RULER ``scripts/data/synthetic/niah.py``: several keys in one haystack,
needles at evenly spread depths), with the haystack of the passkey test (Mohtashami and Jaggi, "Landmark Attention",
2023), and asks about every key instead of one.

Depth k of K is (k + 1/2) / K: the centres of K equal slices of the haystack after its introduction, so the keys
cover it evenly and none sits at the very start or end.  A needle's depth is its first token's position counted from
the end of the introduction, over the haystack's tokens after it (``intro_tokens``).
"""

from __future__ import annotations

import logging
import random
import re
from typing import Callable, Sequence

from convert.evaluate.tasks.passkey import FILLER, GEN_SLACK, INTRO, score

log = logging.getLogger(__name__)

MAX_KEYS = 20  # keys per haystack, at most
NEEDLE_SHARE = 4  # the needles take at most 1/NEEDLE_SHARE of the haystack (fewer keys in short haystacks)
MAX_NEW = 12  # answer tokens decoded at most (the passkey task's max_gen_toks)
# the labels of the keys: short common words, one token or two in most vocabularies
LABELS = ("apple", "river", "garden", "violin", "copper", "falcon", "meadow", "lantern", "harbor", "pepper",
          "marble", "candle", "forest", "silver", "tiger", "window", "orange", "castle", "rocket", "island",
          "pencil", "winter", "dragon", "mirror", "basket", "cactus", "planet", "butter", "jungle", "anchor",
          "puzzle", "carpet", "tunnel", "bridge", "camera", "saddle", "kettle", "ladder", "magnet", "walnut")


def needle(word: str, key: str) -> str:
    return f" The pass key for {word} is {key}."


def question(word: str) -> str:
    return f"\nWhat is the pass key for {word}? The pass key for {word} is"


def depths(k: int) -> list[float]:
    return [(i + 0.5) / k for i in range(k)]


def _n_tokens(tok, text: str) -> int:
    return len(tok(text, add_special_tokens=False).input_ids)


def n_keys(tok, length: int) -> int:
    """Keys per haystack at ``length``: MAX_KEYS, fewer where their needles would take more than 1/NEEDLE_SHARE of
    the haystack."""
    per = _n_tokens(tok, needle("lantern", "12345"))
    return max(1, min(MAX_KEYS, length // NEEDLE_SHARE // max(1, per)))


def build_haystack(tok, length: int, items: Sequence[tuple[str, str]]) -> dict:
    """The longest haystack whose tokens plus the longest question fit ``length - GEN_SLACK``, with needle k at depth
    (k + 1/2) / K by token position after the introduction.  Filler words are cut by binary search on their count, like the passkey task's
    prompt; each needle goes after the filler word that puts its first token nearest its depth (tokens per filler
    word measured), and the positions it got are measured with ``tok`` and returned."""
    K = len(items)
    ds = depths(K)
    needles = [needle(w, k) for w, k in items]
    limit = length - GEN_SLACK - max(_n_tokens(tok, question(w)) for w, _ in items)
    per_word = max(1.0, _n_tokens(tok, FILLER * 8) / len((FILLER * 8).split()))
    t_intro = _n_tokens(tok, INTRO)
    t_needle = sum(_n_tokens(tok, x) for x in needles) / K
    words = (FILLER * (int(limit / per_word / 15) + 2)).split()

    def make(n: int) -> tuple[str, list[int]]:
        body = n * per_word + K * t_needle  # the haystack's tokens after the introduction, estimated
        cuts, prev = [], 0
        for i, d in enumerate(ds):
            b = int(round((d * body - i * t_needle) / per_word))
            prev = min(n, max(prev, b))
            cuts.append(prev)
        parts, at = [], 0  # (text, is a needle)
        for c, nd in zip(cuts, needles):
            if c > at:
                parts.append((" ".join(words[at:c]), False))
            parts.append((nd.strip(), True))
            at = c
        if n > at:
            parts.append((" ".join(words[at:n]), False))
        text, offsets = INTRO, []
        for j, (part, is_needle) in enumerate(parts):
            if is_needle:
                offsets.append(len(text))  # before the space: a word's first token carries its space
            text += (" " if j else "") + part
        return text, offsets

    lo, hi = 0, len(words)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _n_tokens(tok, make(mid)[0]) <= limit:
            lo = mid
        else:
            hi = mid - 1
    text, offsets = make(lo)
    n = _n_tokens(tok, text)
    return {"haystack": text, "n_tokens": n, "intro_tokens": t_intro, "offsets": offsets,
            "positions": token_positions(tok, text, offsets), "depths": ds, "words": [w for w, _ in items],
            "keys": [k for _, k in items], "questions": [question(w) for w, _ in items]}


def token_positions(tok, text: str, offsets: Sequence[int]) -> list[int]:
    """The index of the token holding each character offset of ``text`` (a needle's leading space): from the
    tokenizer's offset mapping where it has one (a fast tokenizer), else the token count of the text before it."""
    try:
        spans = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    except (NotImplementedError, KeyError, TypeError, ValueError):
        return [_n_tokens(tok, text[:o]) for o in offsets]
    out, i = [], 0
    for o in offsets:
        while i < len(spans) and spans[i][1] <= o:
            i += 1
        out.append(i)
    return out


def make_prompts(tok, length: int, count: int, seed: int = 0) -> list[dict]:
    """``count`` haystacks of ``length`` tokens, each with its own labels and keys (seeded by seed and length, like
    the passkey task's keys)."""
    rng = random.Random(f"multi-{seed}-{length}")
    K = n_keys(tok, length)
    out = []
    for _ in range(int(count)):
        words = rng.sample(LABELS, K)
        keys = [str(k) for k in rng.sample(range(10000, 100000), K)]
        out.append(build_haystack(tok, int(length), list(zip(words, keys))))
    return out


def answered(text: str) -> bool:
    """The answer so far holds a whole number (digits, then something else) or a line break: stop decoding."""
    return "\n" in text or re.search(r"\d+\D", text) is not None


def run(runtime, encode: Callable[[str, bool], list[int]], decode: Callable[[list[int]], str],
        prompts: Sequence[dict], max_new: int = MAX_NEW) -> dict:
    """Ask every question of every prompt on ``runtime`` (:class:`convert.runtimes.base.Runtime`): the haystack
    once, the questions as suffixes on its cache.  ``encode(text, special)`` gives token ids (with BOS where the
    model's tokenizer adds one when ``special``), ``decode(ids)`` text.  A question's tokens are those of the whole
    prompt after the haystack's (where the tokenizer splits the two the same way, as at a line break), else its own.
    Returns the per-sample scores (prompt-major, ``sample_ids`` naming each), their mean, n and the token counts:
    what the runtime processed, and what the K x prompts whole prompts would have."""
    scores, ids, depth_of, answers, hay_tokens = [], [], [], [], []
    before = runtime.tokens_processed
    separate = 0
    for i, p in enumerate(prompts):
        prefix = encode(p["haystack"], True)
        suffixes = []
        for q in p["questions"]:
            whole = encode(p["haystack"] + q, True)
            suffixes.append(whole[len(prefix):] if whole[: len(prefix)] == prefix else encode(q, False))
        gens = runtime.generate_after(prefix, suffixes, max_new, stop=lambda t: answered(decode(t)))
        for w, key, d, s, g in zip(p["words"], p["keys"], p["depths"], suffixes, gens):
            text = decode(g)
            scores.append(score(text, key))
            ids.append(f"{i}:{w}:{key}")
            depth_of.append(d)
            answers.append(text)
            separate += len(prefix) + len(s) + max(0, len(g) - 1)
        hay_tokens.append(len(prefix))
    n = len(scores)
    return {"acc": sum(scores) / n if n else None, "samples": scores, "sample_ids": ids, "n": n,
            "keys_per_prompt": len(prompts[0]["keys"]) if prompts else 0, "prompts": len(prompts),
            "depths": depth_of, "answers": answers, "haystack_tokens": hay_tokens,
            "tokens_processed": runtime.tokens_processed - before, "tokens_separate": separate}
