"""Fitness functions for searched factors: run the model with candidate factors and score it (lower is better).

A search (``dprope.search``) calls ``fitness(factors, temperature) -> float`` hundreds of times.  Re-baking a
checkpoint per call would cost a weight copy and a model load each time, so the model is loaded once and each call
sets the rotary embedding's frequencies and cos/sin multiplier in memory (:func:`apply_factors`), computed exactly
as transformers computes them from a baked ``longrope`` config (``transformers/modeling_rope_utils.py``,
``_compute_longrope_parameters``); a test checks the logits against a real bake.

Kinds, one registry (``FITNESSES``; ``register_fitness`` adds one):

  ppl    perplexity at the target length on local documents: the documents, lm-eval's rolling windows and the
         chunked scoring of the project's lm-eval ``ppl`` task (``convert/evaluate/tasks/ppl.py``, ``convert/evaluate/lmeval_hf.py``),
         so a value equals that task's token perplexity of the baked checkpoint.  LongRoPE's fitness (perplexity
         on long documents, microsoft/LongRoPE ``evolution/``); a GPU's work: one 16k-token forward of SmolLM2-135M
         takes about 2.5 minutes on 2 CPU cores.
  proxy  sparse position ids in the manner of PoSE (Zhu et al. 2024, "PoSE: Efficient Context Window Extension of
         LLMs via Positional Skip-wise Training", github.com/dwzhu-pku/PoSE): a document's first ``chunk`` tokens
         sit at positions [0, k), its next k tokens at [L' - k, L'), and only those next tokens are scored.  They
         see their own chunk at relative distances 0..k, where a method's changes to the fast pairs cost
         perplexity inside the original window, and the first chunk at distances L' - 2k .. L', where
         extrapolated slow pairs turn past any angle seen in training: relative distances up to L' for the cost
         of a 2k-token forward.  ``task=key`` puts a pass key in the first chunk and scores only the answer's
         tokens after a question at the far end (LongRoPE2's needle-driven perplexity, Shang et al. 2025).  What
         it cannot see: attention spread over L' tokens at every distance in between (the dilution a temperature
         compensates), so its ranking is measured against ``ppl`` (``bench/search_proxy.py``, README).

Both place the samples deterministically (evenly spaced over the corpus; ``task=key``'s keys from ``seed``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import dprope

from convert.errors import ConvertError
from convert.arch import RopeSpec

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Full-length perplexity: the sparse-position proxy ranks factor sets only partly like it (Spearman 0.60, Kendall 0.47
# on 29 sets, SmolLM2-135M 8k -> 16k; bench/results/search_proxy.md), so it is an explicit choice (--fitness proxy).
DEFAULT_FITNESS = "ppl"


# ------------------------------------------------------------------------------------------- factors in memory
def longrope_inv_freq(spec: RopeSpec, factors: torch.Tensor) -> torch.Tensor:
    """The inverse frequencies, float32 [n_pairs], that transformers computes from a checkpoint baked with
    ``factors`` (relative to the base's effective frequencies): 1 / (long_factor * b^(2i/d)) with the baked
    long_factor = prior factors x factors (``convert.stages.bake.hf_factors``)."""
    import torch

    f = torch.as_tensor(factors, dtype=torch.float32).flatten()
    if f.numel() != spec.head_dim // 2 or not bool(torch.isfinite(f).all()) or not bool((f > 0).all()):
        raise ConvertError(f"factors must be {spec.head_dim // 2} finite values > 0 (head_dim {spec.head_dim}), "
                           f"got {f.numel()}")
    # the long factors exactly as the bake writes them (convert/formats/hf.py hf_factors), then transformers' own
    # torch arithmetic on them (modeling_rope_utils.py _compute_longrope_parameters), so a value here is bit for bit
    # what the baked checkpoint computes (torch's vectorised pow differs from NumPy's by an ulp here and there)
    long = torch.from_numpy((spec.prior_factors * f.numpy()).astype("float32"))
    shape = torch.arange(0, spec.head_dim, 2, dtype=torch.int64).float() / spec.head_dim
    return 1.0 / (long * float(spec.rope_theta) ** shape)


def rotary_modules(model) -> list:
    """The rotary embedding modules of a transformers model (an ``inv_freq`` buffer and an ``attention_scaling``)."""
    import torch

    return [m for m in model.modules()
            if isinstance(getattr(m, "inv_freq", None), torch.Tensor) and hasattr(m, "attention_scaling")]


def apply_factors(model, spec: RopeSpec, factors: torch.Tensor, temperature: float) -> None:
    """Make a loaded model of the base ``spec`` compute RoPE as its checkpoint baked with ``factors`` (float [n_pairs])
    and ``temperature`` (cos/sin multiplier) would at positions past the original window, without writing anything.

    Dynamic updates are switched off (``rope_type`` "default"): a baked longrope model picks its long factors for
    any sequence that reaches past the original window, which every fitness input here does."""
    from convert.compat import set_rotary_frequencies

    inv = longrope_inv_freq(spec, factors)
    mods = rotary_modules(model)
    if not mods:
        raise ConvertError(f"{type(model).__name__} has no rotary embedding module with inv_freq and "
                           "attention_scaling; supported architectures are listed in convert/arch.py")
    attn = float(temperature) * spec.attention_factor
    for m in mods:
        if tuple(m.inv_freq.shape) != tuple(inv.shape):
            raise ConvertError(f"the model's rotary embedding has {tuple(m.inv_freq.shape)} frequencies, the factors "
                               f"{tuple(inv.shape)}: the factors belong to another model")
        set_rotary_frequencies(m, inv, attn)


# ------------------------------------------------------------------------------------------- spec and registry
@dataclass(frozen=True)
class FitnessSpec:
    """A fitness by name and options: parsed from ``"proxy"``, ``"proxy:samples=8:chunk=512"`` or a mapping
    ``{"kind": "proxy", "samples": 8}`` (recipes, ``--fitness``, ``--opt fitness=...``)."""

    kind: str
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, value: Any) -> "FitnessSpec":
        if isinstance(value, FitnessSpec):
            return value
        if value is None:
            value = DEFAULT_FITNESS
        if isinstance(value, Mapping):
            d = dict(value)
            kind = str(d.pop("kind", DEFAULT_FITNESS))
            opts = d
        elif isinstance(value, str):
            from convert.options import parse_spec

            kind, opts = parse_spec(value, "fitness", "proxy:samples=8")
        else:
            raise ConvertError(f"fitness must be one of {', '.join(FITNESSES)} (optionally with :KEY=VALUE options) "
                               f"or a mapping with 'kind', got {type(value).__name__}")
        kind = kind.strip().lower()
        if kind not in FITNESSES:
            raise ConvertError(f"unknown fitness '{kind}'; choose one of {', '.join(FITNESSES)} "
                               "(proxy: sparse positions, cheap on a CPU; ppl: full-length perplexity, a GPU's work)")
        cls_ = FITNESSES[kind]
        unknown = sorted(set(opts) - set(cls_.DEFAULTS))
        if unknown:
            raise ConvertError(f"fitness '{kind}' has no option(s) {', '.join(unknown)}; its options: "
                               + ", ".join(f"{k} (default {v})" for k, v in cls_.DEFAULTS.items()))
        return cls(kind, tuple(sorted(opts.items())))

    def resolved(self) -> dict[str, Any]:
        """The options with the kind's defaults filled in."""
        return {**FITNESSES[self.kind].DEFAULTS, **dict(self.options)}

    def text(self) -> str:
        """The compact form: kind[:key=value...], what ``parse`` reads."""
        return ":".join([self.kind, *(f"{k}={'null' if v is None else v}" for k, v in self.options)])


FITNESSES: dict[str, type["ModelFitness"]] = {}


def register_fitness(name: str):
    """Decorator: register a :class:`ModelFitness` subclass under ``name``."""

    def deco(cls):
        if name in FITNESSES:
            raise ConvertError(f"fitness '{name}' is already registered")
        cls.kind = name
        FITNESSES[name] = cls
        return cls

    return deco


# ------------------------------------------------------------------------------------------- the fitness callables
@dataclass
class Sample:
    """One scored input: token ids [1, T], the targets (the last len(targets) positions' next tokens), the forward's
    extra arguments (position ids and mask for sparse positions) and the tokens the score divides by."""

    input_ids: Any
    targets: list[int]
    # sparse positions come with an explicit all-ones mask: without one, transformers takes a jump in the position
    # ids for the start of another packed sequence and masks the chunks from each other
    # (transformers/masking_utils.py, find_packed_sequence_indices)
    forward: dict
    n_tokens: int


class ModelFitness:
    """fitness(factors: float [n_pairs], temperature: float) -> perplexity of the scored tokens (lower is better),
    on a model loaded once.  ``seconds``: wall time of each call."""

    kind = ""
    DEFAULTS: dict[str, Any] = {}

    def __init__(self, model, tokenizer, spec: RopeSpec, target_length: int, options: Mapping[str, Any],
                 tokenizer_path: str | Path):
        self.model, self.tok, self.spec = model, tokenizer, spec
        self.target_length = int(target_length)
        self.options = {**self.DEFAULTS, **dict(options)}
        self.tokenizer_path = str(tokenizer_path)
        self.seconds: list[float] = []
        self.samples: list[Sample] = self.prepare()
        if not self.samples:
            raise ConvertError(f"fitness '{self.kind}' has no samples; raise samples")

    # subclasses build their inputs
    def prepare(self) -> list[Sample]:
        raise NotImplementedError

    @property
    def device(self):
        return next(self.model.parameters()).device

    def score(self, model=None) -> float:
        """Perplexity of the scored tokens for ``model`` as it is now (default: this fitness's model)."""
        from convert.evaluate.lmeval_hf import chunked_token_logprobs

        model = model or self.model
        ll, n = 0.0, 0
        for s in self.samples:
            dev = next(model.parameters()).device
            fw = {k: v.to(dev) for k, v in s.forward.items()}
            # no KV cache: nothing is generated, and at 16k it would hold hundreds of MB
            lp = chunked_token_logprobs(model, s.input_ids.to(dev), s.targets, use_cache=False, **fw)
            ll += float(lp.astype("float64").sum())
            n += s.n_tokens
        return math.exp(-ll / n) if math.isfinite(ll) else math.inf

    def __call__(self, factors: torch.Tensor, temperature: float) -> float:
        t0 = time.perf_counter()
        apply_factors(self.model, self.spec, factors, temperature)
        v = self.score()
        self.seconds.append(time.perf_counter() - t0)
        return v

    def identity(self) -> dict[str, Any]:
        """What the values depend on besides the model weights: kind, options, the corpus by content."""
        from convert.evaluate.engine import corpus_digest

        opts = dict(self.options)
        opts["corpus"] = corpus_digest(opts.get("corpus"))
        opts.pop("device", None)
        return {"kind": self.kind, "options": opts, "target_length": self.target_length,
                "scored_tokens": sum(s.n_tokens for s in self.samples)}

    def corpus_ids(self) -> list[int]:
        from convert.evaluate.tasks.ppl import corpus_text

        corpus = self.options.get("corpus")
        if corpus and not Path(corpus).is_file():
            raise ConvertError(f"fitness corpus {corpus} is not a file; pass a text file or leave it unset "
                               "(Python's own documentation)")
        return self.tok(corpus_text(corpus or None), add_special_tokens=False).input_ids

    def prefix_id(self) -> int:
        """The token lm-eval puts before a document (BOS, else EOS; lm-eval ``HFLM.prefix_token_id``)."""
        t = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
        if t is None:
            raise ConvertError("the tokenizer has neither a BOS nor an EOS token to start a sample with")
        return int(t)


def _positive_int(opts: Mapping[str, Any], name: str, kind: str) -> int:
    v = opts[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConvertError(f"fitness '{kind}' option {name} must be a whole number >= 1, got {v!r}")
    return v


@register_fitness("proxy")
class ProxyFitness(ModelFitness):
    """Sparse positions: ``samples`` documents, each k = ``chunk`` tokens at [0, k) and the next k at [L' - k, L')
    (``task=text``, those k scored) or a pass key in the first chunk and its question + answer at the far end
    (``task=key``, the answer scored)."""

    # chunk: None = min(1024, half the original window), so the first chunk's own context stays inside it
    DEFAULTS = {"task": "text", "samples": 4, "chunk": None, "corpus": None, "seed": 0, "dtype": "float32",
                "device": "auto"}

    def prepare(self) -> list[Sample]:
        import torch

        o = self.options
        task = o["task"]
        if task not in ("text", "key"):
            raise ConvertError(f"fitness 'proxy' option task must be text or key, got {task!r}")
        if o["chunk"] is None:
            o["chunk"] = min(1024, max(1, self.spec.original_length // 2))
        n, k = _positive_int(o, "samples", "proxy"), _positive_int(o, "chunk", "proxy")
        L = self.target_length
        if 2 * k > L:
            raise ConvertError(f"proxy chunk {k} is more than half the target length {L}: the two chunks would "
                               f"overlap; pass chunk <= {L // 2}")
        ids = self.corpus_ids()
        span = 2 * k + 2  # the tokens one sample reads (filler included)
        if len(ids) < n * span:
            raise ConvertError(f"the proxy corpus has {len(ids)} tokens, fewer than {n} samples x {span}; pass "
                               "a longer corpus or fewer samples / a smaller chunk")
        step = (len(ids) - span) // max(n - 1, 1) if n > 1 else 0
        starts = [j * step for j in range(n)]
        pos = torch.cat([torch.arange(0, k), torch.arange(L - k, L)])[None]  # [1, 2k]
        prefix = self.prefix_id()
        out = []
        if task == "text":
            for s in starts:
                x = torch.tensor([[prefix, *ids[s : s + 2 * k - 1]]], dtype=torch.long)
                out.append(Sample(x, list(ids[s + k : s + 2 * k]),
                                  {"position_ids": pos, "attention_mask": torch.ones_like(x)}, k))
            return out
        import numpy as np

        rng = np.random.default_rng(int(o["seed"]))
        enc = lambda t: self.tok(t, add_special_tokens=False).input_ids  # noqa: E731
        for s in starts:
            key = int(rng.integers(10000, 100000))
            needle = enc(f" The pass key is {key}. Remember it. {key} is the pass key.")
            question, answer = enc(" What is the pass key? The pass key is"), enc(f" {key}")
            room_a = k - 1 - len(needle)
            room_b = k - len(question) - len(answer)
            if room_a < 1 or room_b < 1:
                raise ConvertError(f"proxy chunk {k} is too short for a pass key and its question; pass chunk >= 64")
            filler = ids[s : s + room_a + room_b]
            depth = room_a // 4  # the key early in the first chunk: the answer reads it from ~L' - k away
            a = [prefix, *filler[:depth], *needle, *filler[depth:room_a]]
            b = [*filler[room_a : room_a + room_b], *question, *answer]
            x = torch.tensor([a + b[:-1]], dtype=torch.long)
            p = torch.cat([torch.arange(0, k), torch.arange(L - k, L - 1)])[None]
            out.append(Sample(x, list(answer), {"position_ids": p, "attention_mask": torch.ones_like(x)},
                              len(answer)))
        return out


@register_fitness("ppl")
class PerplexityFitness(ModelFitness):
    """Token perplexity of the first ``samples`` documents of the lm-eval ``ppl`` task at ``length`` tokens
    (default: the target length): the same documents, windows and sums, so the value equals that task's
    ``token_perplexity`` for the baked checkpoint."""

    DEFAULTS = {"samples": 5, "length": None, "corpus": None, "dtype": "float32", "device": "auto"}

    def prepare(self) -> list[Sample]:
        import torch
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        from convert.evaluate.tasks.ppl import make_dataset

        o = self.options
        n = _positive_int(o, "samples", "ppl")
        L = int(o["length"] or self.target_length)
        corpus = o.get("corpus") or None
        if corpus and not Path(corpus).is_file():
            raise ConvertError(f"fitness corpus {corpus} is not a file; pass a text file or leave it unset "
                               "(Python's own documentation)")
        try:
            docs = make_dataset(L, self.tokenizer_path, L, corpus)["test"]
        except ValueError as e:
            raise ConvertError(str(e)) from None
        if len(docs) < n:
            log.warning("the corpus holds %d documents of %d tokens, fewer than samples=%d", len(docs), L, n)
        prefix = self.prefix_id()
        bos_text = self.tok.decode(prefix)
        out = []
        for doc in list(docs)[:n]:
            text = doc["text"]
            # lm-eval HFLM.tok_encode: the tokenizer's own special tokens unless the text starts with the prefix
            toks = self.tok.encode(text, add_special_tokens=False) if text.startswith(bos_text) else \
                self.tok.encode(text)
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=toks, prefix_token=prefix, max_seq_len=L, context_len=1)]
            for i, (context, cont) in enumerate(windows):
                x = torch.tensor([(context + cont)[:-1]], dtype=torch.long)
                # the task divides by the document's tokens (convert/evaluate/tasks/ppl.py): count them once per document
                out.append(Sample(x, list(cont), {}, int(doc["n_tokens"]) if i == 0 else 0))
        return out


# ------------------------------------------------------------------------------------------- loading
def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConvertError(f"fitness device must be auto, cpu or cuda[:N], got {name!r}") from None


def load_model(model_dir: Path, dtype: str = "float32", device: str = "auto"):
    """(model, tokenizer) of a HF directory for scoring: eval mode, on ``device``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(dtype))
    if dt is None:
        raise ConvertError(f"fitness dtype must be float32, bfloat16 or float16, got {dtype!r}")
    from convert.evaluate.engine import quiet_lm_eval

    with quiet_lm_eval():
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dt).eval().to(_device(str(device)))
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    return model, tok


def make_fitness(fitness: Any, model_dir: Path, spec: RopeSpec, target_length: int,
                 loaded: tuple | None = None) -> ModelFitness:
    """The fitness callable ``fitness`` names (see :class:`FitnessSpec`) for the base checkpoint in ``model_dir``
    (an HF directory; ``spec`` its RoPE facts), loading the model unless ``loaded`` = (model, tokenizer)."""
    fs = FitnessSpec.parse(fitness)
    opts = fs.resolved()
    model, tok = loaded or load_model(model_dir, opts["dtype"], opts["device"])
    return FITNESSES[fs.kind](model, tok, spec, target_length, opts, model_dir)


# ------------------------------------------------------------------------------------------- search plans
# the registered methods that measure the model through a callable the pipeline builds: LongRoPE's search (a fitness
# callable, this module) and the gradient fit (a loss-and-gradient callable, convert/evaluate/fit.py)
SEARCH_METHODS = ("longrope-search", "dprope-fit")
FIT_METHOD = "dprope-fit"
# plan options the pipeline supplies itself
_INTERNAL = ("progress",)
_FIT_INTERNAL = ("progress", "loss_and_grad", "state_path", "write_state")


def is_search(method: str) -> bool:
    return method.lower() in SEARCH_METHODS


def check_options(method: str, options: Mapping[str, Any], target_length: int | None = None,
                  original_length: int | None = None) -> None:
    """Refuse, with one message naming the fix, a search plan that cannot run: no budget, an unknown fitness,
    settings the search rejects (``target_length`` and the model's ``original_length``, when given, check what
    depends on them)."""
    from dprope.search_config import SearchConfig

    if method.lower() == FIT_METHOD:
        return check_fit_options(options, target_length, original_length)
    problems = []
    fit = options.get("fitness")
    if not callable(fit):
        try:
            FitnessSpec.parse(fit)
        except ConvertError as e:
            problems.append(str(e))
    be, bs = options.get("budget_evals"), options.get("budget_seconds")
    if be is None and bs is None:
        problems.append(f"{method} needs a budget: --budget N (fitness evaluations; LongRoPE's full search is about "
                        "1,300) and/or --time-budget SECONDS (recipes: method.options budget_evals / budget_seconds)")
    if be is not None and (isinstance(be, bool) or not isinstance(be, int) or be < 1):
        problems.append(f"budget_evals must be a whole number of evaluations >= 1, got {be!r}")
    if bs is not None and (isinstance(bs, bool) or not isinstance(bs, (int, float)) or not bs > 0):
        problems.append(f"budget_seconds must be a number of seconds > 0, got {bs!r}")
    for k in _INTERNAL:
        if options.get(k) is not None:
            problems.append(f"option {k} is supplied by the pipeline; leave it unset")
    try:
        SearchConfig(**_config_options(options))
    except (dprope.DPRoPEError, TypeError) as e:
        problems.append(str(e))
    if problems:
        raise ConvertError("; ".join(problems))


def _config_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The plan's options that are SearchConfig fields."""
    from dataclasses import fields

    from dprope.search_config import SearchConfig

    names = {f.name for f in fields(SearchConfig)}
    return {k: v for k, v in options.items() if k in names}


def fit_loss_problems(options: Mapping[str, Any]) -> list[str]:
    """What is wrong with the loss options of a ``dprope-fit`` plan (convert/evaluate/fit.py reads them)."""
    problems = []
    for name in ("samples", "loss_chunk"):
        v = options.get(name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            problems.append(f"dprope-fit option {name} must be a whole number >= 1, got {v!r}")
    for name in ("length", "score_from", "batch"):
        v = options.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "score_from" else 1)):
            problems.append(f"dprope-fit option {name} must be a whole number (or unset), got {v!r}")
    seed = options.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int):
        problems.append(f"dprope-fit option seed must be a whole number, got {seed!r}")
    skip = options.get("skip", 0)
    if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
        problems.append(f"dprope-fit option skip must be a whole number of tokens >= 0, got {skip!r}")
    if options.get("dtype") not in ("auto", "float32", "bfloat16", "float16"):
        problems.append(f"dprope-fit option dtype must be auto, float32, bfloat16 or float16, got "
                        f"{options.get('dtype')!r}")
    dev = options.get("device")
    if not isinstance(dev, str) or not (dev in ("auto", "cpu") or dev.startswith("cuda")):
        problems.append(f"dprope-fit option device must be auto, cpu or cuda[:N], got {dev!r}")
    if not isinstance(options.get("gradient_checkpointing"), bool):
        problems.append("dprope-fit option gradient_checkpointing must be true or false")
    corpus = options.get("corpus")
    if corpus is not None and not isinstance(corpus, str):
        problems.append(f"dprope-fit option corpus must be a text file's path (or unset: Python's docs), got "
                        f"{corpus!r}")
    return problems


SHORT_WINDOW_TEMPERATURE = (
    "fit_temperature=true cannot go with window: a short window never spreads attention over the target length's "
    "tokens, so it cannot measure the dilution the temperature compensates; keep the temperature fixed (the init's, "
    "or temperature=longrope: LongRoPE's sqrt(1 + ln s / ln L)), or fit it on full-length windows (leave window unset)")


def short_window_problems(options: Mapping[str, Any], target_length: int | None = None,
                          original_length: int | None = None) -> list[str]:
    """What is wrong with the short-window options (``window``, ``chunks``) of a fit, each with its fix.  The
    target length and the original window are checked against when given."""
    w, n = options.get("window"), options.get("chunks", 2)
    problems = []
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        problems.append(f"dprope-fit option chunks must be a whole number >= 1 (PoSE's default: 2), got {n!r}")
        n = None
    if w is None:
        return problems
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        return problems + [f"dprope-fit option window must be a whole number of tokens (or unset: full-length "
                           f"windows), got {w!r}"]
    if n is not None and w < 2 * n:
        problems.append(f"dprope-fit window={w} is too short for chunks={n}: a window needs at least 2 tokens per "
                        f"chunk; pass window >= {2 * n} or fewer chunks")
    if target_length is not None and w >= int(target_length):
        problems.append(f"dprope-fit window={w} is not shorter than the target length {target_length}: a short "
                        f"window must be shorter than the target; pass window < {target_length}, or leave window "
                        "unset for full-length windows")
    if options.get("length") is not None:
        problems.append("dprope-fit options length and window exclude each other (length: full windows of that many "
                        "tokens; window: short windows with skipped positions); pass one of them")
    if options.get("fit_temperature") is True:
        problems.append(SHORT_WINDOW_TEMPERATURE)
    sf = options.get("score_from")
    score_from = sf if isinstance(sf, int) and not isinstance(sf, bool) else original_length
    if score_from is not None:
        if target_length is not None and score_from >= int(target_length):
            problems.append(f"dprope-fit scores positions >= {score_from}, but no position reaches it below the "
                            f"target length {target_length}; pass score_from < {target_length}")
        if n == 1 and w <= score_from:
            problems.append(f"dprope-fit window={w} with chunks=1 has positions 0..{w - 1} only, none >= "
                            f"score_from {score_from}: pass chunks >= 2 (skipped positions) or window > {score_from}")
    return problems


def check_fit_options(options: Mapping[str, Any], target_length: int | None = None,
                      original_length: int | None = None) -> None:
    """Refuse, with one message naming the fix, a ``dprope-fit`` plan that cannot run: no budget, bad settings
    (short windows against ``target_length`` and ``original_length`` when they are given)."""
    from dprope.fit import FitConfig, config_fields

    problems = []
    if options.get("budget_steps") is None and options.get("budget_seconds") is None:
        problems.append("dprope-fit needs a budget: --budget STEPS (Adam steps, one forward and backward pass over "
                        "the fit's text each; ~40 at 32k cost about a tenth of LongRoPE's 1,344-evaluation search) "
                        "and/or --time-budget SECONDS (recipes: method.options budget_steps / budget_seconds)")
    for k in _FIT_INTERNAL:
        if k == "write_state":
            if options.get(k, True) is not True:
                problems.append("option write_state is supplied by the pipeline; leave it unset")
        elif options.get(k) is not None:
            problems.append(f"option {k} is supplied by the pipeline; leave it unset")
    names = set(config_fields())
    try:
        FitConfig(**{k: v for k, v in options.items() if k in names})
    except (dprope.DPRoPEError, TypeError, ValueError) as e:
        problems.append(str(e))
    problems += fit_loss_problems(options)
    problems += short_window_problems(options, target_length, original_length)
    if problems:
        raise ConvertError("; ".join(problems))


# ------------------------------------------------------------------------------------------- several processes
def process_group() -> tuple[int, int]:
    """(rank, world size) of this process: a torch.distributed group already set up (a test's, a launcher's), or
    one set up here over gloo when the environment of a launcher says so (``torchrun`` sets WORLD_SIZE, RANK,
    MASTER_ADDR and MASTER_PORT); (0, 1) for one process.  Gloo carries the little the fit and the search exchange
    (a gradient of a few dozen numbers per step, a generation's factors and fitness values) on CPU and GPU machines
    alike; each process keeps its own model on its own device."""
    import os

    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1
        dist.init_process_group("gloo", init_method="env://")
        log.info("process group: rank %d of %d (gloo)", dist.get_rank(), dist.get_world_size())
    return dist.get_rank(), dist.get_world_size()


def rank_device(device: str) -> str:
    """``device`` for this process: with several processes on a GPU machine, "cuda" becomes this process's own GPU
    (``LOCAL_RANK``, as torchrun numbers them)."""
    import os

    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


class PopulationFitness:
    """A fitness spread over a process group: on rank 0, ``evaluate_many`` (which :func:`dprope.search.search`
    calls with a generation's individuals) sends the individuals to every rank, each rank scores individuals
    rank, rank + world, ... with its own copy of the model, and rank 0 gathers the values in order; the other ranks
    run :func:`serve_fitness` meanwhile.  The values are the ones one process would compute (each individual is
    scored whole, by the same code on the same weights), so the search ends the same for any number of ranks."""

    def __init__(self, fitness, rank: int, world: int):
        self.fitness, self.rank, self.world = fitness, rank, world
        self.closed = False

    def __call__(self, factors, temperature: float) -> float:
        return self.evaluate_many([(factors, temperature)])[0]

    def evaluate_many(self, items) -> list[float]:
        import torch.distributed as dist

        work = [([float(x) for x in f.tolist()], float(t)) for f, t in items]
        dist.broadcast_object_list([work], src=0)
        mine = _score_slice(self.fitness, work, self.rank, self.world)
        gathered = [None] * self.world
        dist.gather_object(mine, gathered, dst=0)
        merged: dict[int, float] = {}
        for part in gathered:
            merged.update(part)
        return [merged[i] for i in range(len(work))]

    def close(self) -> None:
        """Tell the other ranks the search is over (their serve_fitness returns)."""
        import torch.distributed as dist

        if not self.closed:
            dist.broadcast_object_list([None], src=0)
            self.closed = True

    def identity(self) -> dict:
        return self.fitness.identity() if hasattr(self.fitness, "identity") else {}

    @property
    def seconds(self) -> list[float]:
        return list(getattr(self.fitness, "seconds", []) or [])


def _score_slice(fitness, work, rank: int, world: int) -> dict[int, float]:
    import torch

    return {i: float(fitness(torch.tensor(f, dtype=torch.float32), t))
            for i, (f, t) in enumerate(work) if i % world == rank}


def serve_fitness(fitness, rank: int, world: int) -> int:
    """The part of a rank other than 0 in a population-parallel search: score its slice of every generation rank 0
    sends, until rank 0 says the search is over.  Returns the number of individuals it scored."""
    import torch.distributed as dist

    done = 0
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        work = box[0]
        if work is None:
            return done
        mine = _score_slice(fitness, work, rank, world)
        done += len(mine)
        dist.gather_object(mine, None, dst=0)
