"""DPE's needle-in-a-haystack scorer: the callable ``dprope.dpe.detect`` sweeps with (``--method dpe``).

A sample is DPE's multi-value needle prompt (LuLuLuyi/DPE ``niah/data_generator.py``): ``needles`` 7-digit values
for one key, "One of the special magic numbers for {key} is: {value}.", spread over a haystack at random depths in
equal segments, then the question "What are all the special magic numbers for {key} ...".  DPE's haystack is Paul
Graham's essays (a download); here it is a local corpus (Python's own docs by default, or any text file).

``score(pair_scales)`` runs the model with those per-pair scales and returns (higher is better):
  accuracy  DPE's metric (``effective_length_detection/inference.py``): greedy generation of ``max_new_tokens``
            tokens, the share of values found in it, averaged over samples;
  logprob   the mean log-probability of the answer tokens (the values, in order) after the prompt: one forward
            per sample and no generation; continuous, so it still ranks scales where every accuracy is 0.

``detect_with``: ``runtime`` scores the scales as DPE does, through its attention (``convert/runtimes/dpe.py``,
local window ``window``); ``static`` scores the bakeable form, the frequencies divided by the scales.

Budget: ``samples`` (DPE: 100), ``needles`` (DPE: 4), ``length`` (prompt tokens; DPE: the target length) and
``sparse``: the prompt is ``length`` tokens but its second half sits at the end of the target window (position ids
jump, PoSE-style), so the needles are about a target length away from the question at the cost of a short forward.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

import torch

from convert.compat import kv_cache_kwargs, kv_cache_of
from convert.errors import ConvertError

log = logging.getLogger(__name__)

INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. "
         "I will quiz you about the numbers afterwards.\n")
NEEDLE = " One of the special magic numbers for {key} is: {value}."
QUESTION = ("\nWhat are all the special magic numbers for {key} mentioned in the provided text? The special magic "
            "numbers for {key} mentioned in the provided text are")
# keys are adjective-noun pairs, as DPE draws from wonderwords' lists
ADJECTIVES = ("amber", "brisk", "calm", "dusty", "eager", "faint", "gentle", "hollow", "icy", "jolly", "keen",
              "lively", "mellow", "nimble", "odd", "proud", "quiet", "rapid", "silver", "tidy", "vivid", "witty")
NOUNS = ("anchor", "badger", "canyon", "dolphin", "ember", "falcon", "garden", "harbor", "island", "jacket",
         "kettle", "lantern", "meadow", "nectar", "orchard", "pebble", "quill", "river", "saddle", "tunnel", "violin")
METRICS = ("accuracy", "logprob")
MODES = ("runtime", "static")


@dataclass(frozen=True)
class NeedleConfig:
    """DPE's detection settings (defaults: DPE's own), see the module docstring."""

    samples: int = 100
    needles: int = 4
    length: int | None = None
    sparse: bool = False
    metric: str = "accuracy"
    corpus: str | None = None
    seed: int = 0
    max_new_tokens: int = 128
    detect_with: str = "runtime"
    window: int | None = None

    def __post_init__(self) -> None:
        problems = []
        for name in ("samples", "needles", "max_new_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or v < 1:
                problems.append(f"{name} must be a whole number >= 1, got {v!r}")
        if self.length is not None and (int(self.length) != self.length or self.length < 32):
            problems.append(f"length must be a number of tokens >= 32, got {self.length!r}")
        if self.metric not in METRICS:
            problems.append(f"metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if self.detect_with not in MODES:
            problems.append(f"detect_with must be one of {', '.join(MODES)}, got {self.detect_with!r}")
        if self.window is not None and (int(self.window) != self.window or self.window < 1):
            problems.append(f"window must be a number of tokens >= 1, got {self.window!r}")
        if self.corpus is not None and not Path(self.corpus).is_file():
            problems.append(f"corpus {self.corpus} is not a file")
        if problems:
            raise ConvertError("DPE detection options: " + "; ".join(problems))

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "NeedleConfig":
        """The scorer's settings out of the ``dpe`` method's options (the others are the sweep's)."""
        from dataclasses import fields

        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names and v is not None})


def value_score(generation: str, values: list[str]) -> float:
    """DPE's score of one answer: the share of the values that appear in it (whitespace collapsed)."""
    text = " ".join(generation.split())
    return sum(v in text for v in values) / len(values)


@dataclass
class Sample:
    ids: list[int]  # the prompt
    positions: list[int]  # its position ids
    values: list[str]
    answer: list[int]  # " v1, v2, ..., vn." as tokens


class NeedleScorer:
    """``scorer(pair_scales: float32 [n_pairs]) -> float`` for :func:`dprope.dpe.detect`, on a loaded model.

    ``target_length``: the length to detect for (L_test); ``original_length``: the model's window (for the default
    DPE window)."""

    def __init__(self, model, tokenizer, target_length: int, original_length: int, config: NeedleConfig,
                 progress: Callable[[int], None] | None = None):
        from dprope.dpe import default_window

        self.model, self.tok, self.cfg = model, tokenizer, config
        self.target = int(target_length)
        self.length = int(config.length or target_length)
        if self.length > self.target:
            raise ConvertError(f"the needle prompt length {self.length} exceeds the target length {self.target}")
        self.window = int(config.window or default_window(original_length))
        self.progress = progress
        self.calls = 0
        rot = model.get_decoder().rotary_emb
        self.rotary = rot
        self.base_inv_freq = rot.inv_freq.detach().clone()

    # ------------------------------------------------------------------------------------------- the samples
    def _ids(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False).input_ids)

    @cached_property
    def corpus(self) -> str:
        from convert.evaluate.tasks.ppl import corpus_text

        return corpus_text(self.cfg.corpus)

    def _haystack(self, rng: random.Random, n: int) -> list[int]:
        """``n`` tokens of the corpus from a random place (only a window of it is tokenized)."""
        text = self.corpus
        chars = 8 * n + 64
        while True:
            start = rng.randrange(0, max(1, len(text) - chars))
            ids = self._ids(text[start : start + chars])[1:]  # the first token may be a cut word
            if len(ids) >= n:
                return ids[:n]
            if chars >= len(text):
                raise ConvertError(f"the corpus has about {len(ids)} tokens; the needle prompts need {n}: pass a "
                                   "longer --opt corpus=PATH or a shorter --opt length")
            chars *= 2

    @cached_property
    def samples(self) -> list[Sample]:
        prefix = list(self.tok("").input_ids)  # BOS where the tokenizer adds one
        slack = self.cfg.max_new_tokens if self.cfg.metric == "accuracy" else 0
        out = []
        for i in range(self.cfg.samples):
            rng = random.Random(f"dpe-needle-{self.cfg.seed}-{i}")
            key = f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"
            values = [str(rng.randint(10**6, 10**7 - 1)) for _ in range(self.cfg.needles)]
            head = prefix + self._ids(INTRO)
            needles = [self._ids(NEEDLE.format(key=key, value=v)) for v in values]
            question = self._ids(QUESTION.format(key=key))
            answer = self._ids(" " + ", ".join(values) + ".")
            budget = self.length - len(head) - len(question) - sum(map(len, needles)) - max(slack, len(answer))
            if budget < 16:
                raise ConvertError(f"a needle prompt of {self.length} tokens leaves {budget} for the haystack: raise "
                                   "--opt length or lower --opt needles")
            hay = self._haystack(rng, budget)
            # DPE's depths: one per equal segment of [0, 0.99), uniform inside it; sparse prompts keep the needles
            # in the first half, the part that sits at the start of the window
            reach = 0.5 if self.cfg.sparse else 1.0
            seg = 0.99 / len(needles)
            depths = sorted(int(reach * budget * (j * seg + rng.uniform(0, seg))) for j in range(len(needles)))
            body, last = [], 0
            for d, nd in zip(depths, needles):
                body += hay[last:d] + nd
                last = d
            body += hay[last:]
            ids = head + body + question
            n = len(ids)
            if self.cfg.sparse:
                # the first half at 0.., the second half ending where a prompt of the target length would end
                first = len(head) + budget // 2 + sum(map(len, needles))
                end = self.target - max(slack, len(answer))
                positions = list(range(first)) + list(range(end - (n - first), end))
            else:
                positions = list(range(n))
            out.append(Sample(ids, positions, values, answer))
        log.info("%d needle prompts of %d tokens (%s positions up to %d), %d values each", len(out), len(out[0].ids),
                 "sparse" if self.cfg.sparse else "dense", out[0].positions[-1] + 1, self.cfg.needles)
        return out

    # ------------------------------------------------------------------------------------------- scoring
    def _device(self):
        return next(self.model.parameters()).device

    @torch.no_grad()
    def _logprob(self, s: Sample) -> float:
        dev = self._device()
        ids = torch.tensor([s.ids + s.answer], device=dev)
        pos = torch.tensor([s.positions + [s.positions[-1] + 1 + k for k in range(len(s.answer))]], device=dev)
        base = self.model.get_decoder()
        hidden = base(input_ids=ids, position_ids=pos).last_hidden_state[0, len(s.ids) - 1 : -1]
        lp = torch.log_softmax(self.model.get_output_embeddings()(hidden).float(), dim=-1)
        tgt = torch.tensor(s.answer, device=dev)
        return float(lp.gather(1, tgt[:, None]).mean())

    @torch.no_grad()
    def _accuracy(self, s: Sample) -> float:
        """DPE's score: greedy generation, the share of the values that appear in it."""
        dev = self._device()
        ids = torch.tensor([s.ids], device=dev)
        pos = torch.tensor([s.positions], device=dev)
        out = self.model(input_ids=ids, position_ids=pos, use_cache=True, logits_to_keep=1)
        past, p, gen = kv_cache_of(out), s.positions[-1], []
        eos = self.tok.eos_token_id
        for step in range(self.cfg.max_new_tokens):
            nxt = int(out.logits[0, -1].argmax())
            if nxt == eos:
                break
            gen.append(nxt)
            if step % 8 == 7 and all(v in self.tok.decode(gen, skip_special_tokens=True) for v in s.values):
                break  # every value is already there: more tokens cannot change the score
            p += 1
            out = self.model(input_ids=torch.tensor([[nxt]], device=dev), position_ids=torch.tensor([[p]], device=dev),
                             use_cache=True, **kv_cache_kwargs(self.model, past))
            past = kv_cache_of(out)
        return value_score(self.tok.decode(gen, skip_special_tokens=True), s.values)

    def __call__(self, pair_scales: torch.Tensor) -> float:
        from convert.runtimes.dpe import disable_dpe, enable_dpe

        scales = torch.as_tensor(pair_scales, dtype=torch.float32)
        if self.cfg.detect_with == "runtime":
            enable_dpe(self.model, scales, self.window)
        else:
            self.rotary.inv_freq.copy_(self.base_inv_freq / scales.to(self.base_inv_freq.device))
        try:
            one = self._accuracy if self.cfg.metric == "accuracy" else self._logprob
            total = 0.0
            for s in self.samples:
                total += one(s)
                if self.progress is not None:
                    self.progress(1)
        finally:
            if self.cfg.detect_with == "runtime":
                disable_dpe(self.model)
            else:
                self.rotary.inv_freq.copy_(self.base_inv_freq)
        self.calls += 1
        score = total / len(self.samples)
        log.info("needle score %.4f with pair scales %s", score, scales.tolist())
        return score if math.isfinite(score) else -math.inf


def needle_scorer(path: Path, target_length: int, original_length: int, options: dict[str, Any],
                  progress: Callable[[int], None] | None = None) -> NeedleScorer:
    """A scorer on the checkpoint at ``path`` (an HF directory; a GPU when there is one), with the ``dpe``
    method's options.  The checkpoint must run with its own RoPE: pass the base, not an extended one."""
    from transformers import AutoTokenizer

    from convert.arch import read_config
    from convert.quiet import quiet_libraries
    from convert.runtimes.hf import load_hf

    cfg = NeedleConfig.from_options(options)
    if "dprope" in read_config(path):
        raise ConvertError(f"{path} is already extended by this tool; detect DPE's scales on the base model")
    model = load_hf(path)
    if torch.cuda.is_available():
        model = model.to("cuda")
    with quiet_libraries():
        tok = AutoTokenizer.from_pretrained(str(path))
    return NeedleScorer(model, tok, target_length, original_length, cfg, progress)
