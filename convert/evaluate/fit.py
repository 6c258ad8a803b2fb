"""The loss ``dprope-fit`` descends (:mod:`dprope.fit`): the model's next-token loss on the tokens past the original
window of long text, as a function of the per-pair log-factors (and of the temperature), with its gradient.

LongRoPE's search scores factor sets by the model's perplexity on long documents (Ding et al. 2024,
microsoft/LongRoPE ``evolution/``); here the same model output is differentiated instead.  The model is loaded once
with its weights frozen.  Each evaluation sets the rotary embedding's frequencies to base_i / exp(x_i) (the base being
what transformers computes for the checkpoint baked with factors 1, ``convert.evaluate.fitness.longrope_inv_freq``)
and its cos/sin multiplier to t x the architecture's attention factor, as tensors in the autograd graph
(``convert.compat.rotary_computed_from``), runs the model and back-propagates the loss to x (and t): no weight
gradient is computed.

Memory at 32k tokens: the decoder layers run under transformers' activation checkpointing (non-reentrant: the rotary
cos/sin reach the layers as keyword arguments, which reentrant checkpointing would cut from the graph), and the
output head and cross entropy run ``loss_chunk`` positions at a time, each chunk under checkpointing (at 32k tokens
and SmolLM2's 49,152-token vocabulary the float32 logits alone are 6.4 GB).

Text: windows of ``length`` tokens (default: the target length) cut from the corpus as the lm-eval ``ppl`` task cuts
its documents (``convert/evaluate/tasks/ppl.py``: document k is tokens [kL, (k + 1)L) of the corpus, read after the
BOS token lm-eval puts first), the first ``samples`` of them; each step reads all of them, or ``batch`` of them drawn
from (``seed``, step).  Only the targets at positions >= ``score_from`` (default: the original window) count.

Short windows (``window`` = W tokens, ``chunks`` = N; PoSE, Zhu et al. ICLR 2024, github.com/dwzhu-pku/PoSE
``src/train_pose.py``; :mod:`convert.evaluate.positions`): the corpus is cut into W-token windows the same way (the
prefix token first), all of them the pool; each step draws ``batch`` of them (default ``samples``) from (``seed``,
step) and gives the j-th of the step PoSE's skipped position ids from (``seed``, step, j): N chunks, the first at
positions from 0, each later one shifted by a skip, every position below the target length, redrawn until the
window's last position reaches ``score_from``.  A target counts when its POSITION ID is >= ``score_from`` (a suffix
of the window: the ids increase), i.e. the tokens that read the window's start from further than the original
window.  The text stays contiguous; only the positions skip.  So a W-token forward and backward shows the factors
relative distances up to the target length.  It cannot show attention spread over the target length's tokens (what
the temperature compensates), so a short-window fit keeps the temperature fixed (``fit_temperature`` is refused).

Several processes (:func:`convert.evaluate.fitness.process_group`): each reads its share of a step's windows (the
j-th on rank j mod world) and the sums of the loss, the token counts and the gradients are all-reduced and then
broadcast from rank 0, so every rank takes the same step from the same numbers.

Cost of a step: a forward and a backward pass over the step's tokens; the backward computes no weight gradient, so a
step costs about two forward passes, three with the checkpointing's recompute.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Mapping

from convert.arch import RopeSpec
from convert.errors import ConvertError

log = logging.getLogger(__name__)


def _nll_sum(hidden, weight, bias, targets, softcap):
    import torch.nn.functional as F

    logits = F.linear(hidden, weight, bias).float()  # upcast as transformers' ForCausalLMLoss does
    if softcap:
        logits = (logits / softcap).tanh() * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_nll(model, hidden, targets, chunk: int):
    """Sum of -log p(targets) from the decoder's last hidden states [n, hidden], ``chunk`` positions of logits at a
    time, each chunk under activation checkpointing (its logits recomputed in the backward pass, never kept)."""
    import torch
    from torch.utils.checkpoint import checkpoint

    head = model.get_output_embeddings()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, hidden.shape[0], chunk):
        total = total + checkpoint(_nll_sum, hidden[i : i + chunk], head.weight, head.bias, targets[i : i + chunk],
                                   softcap, use_reentrant=False)
    return total


def rotary_modules(model) -> list:
    """The rotary embedding modules of a transformers model: those with an ``inv_freq`` table (one per layer type
    where the module keeps several, ``convert.compat.rotary_prefix``)."""
    import torch

    from convert.compat import rotary_prefix

    return [m for m in model.modules() if isinstance(getattr(m, f"{rotary_prefix(m)}inv_freq", None), torch.Tensor)]


def checkpoint_layers(model) -> None:
    """Switch on transformers' activation checkpointing of the decoder layers (non-reentrant), and put the layers
    that checkpoint in training mode, which their checkpointing asks for; everything inside them stays in eval
    mode (no dropout).  transformers 5.x names it ``activation_checkpointing_enable``, 4.x
    ``gradient_checkpointing_enable``."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for m in model.modules():
        if getattr(m, "gradient_checkpointing", False) is True:
            m.training = True  # this module only; its children keep eval mode


class FitLoss:
    """loss_and_grad(log_factors float64 [n_pairs], temperature, step) -> (loss, grad of the log-factors, grad of the
    temperature or None): the mean next-token loss over the scored tokens of a step's windows (see the module
    docstring), for the model of the base ``spec``.  ``seconds``: wall time of each call; ``scored``: the tokens
    each call scored."""

    kind = "next-token loss past the window"

    def __init__(self, model, tokenizer, spec: RopeSpec, target_length: int, options: Mapping[str, Any],
                 fit_temperature: bool = False, rank: int = 0, world: int = 1):
        import torch

        from dprope.methods import FIT_LOSS_OPTIONS

        from convert.evaluate.fitness import longrope_inv_freq

        self.model, self.tok, self.spec = model, tokenizer, spec
        self.options = {**FIT_LOSS_OPTIONS, **{k: v for k, v in options.items() if k in FIT_LOSS_OPTIONS}}
        self.target_length = int(target_length)
        self.fit_temperature = bool(fit_temperature)
        self.rank, self.world = int(rank), int(world)
        o = self.options
        self.short = o.get("window") is not None
        self.score_from = int(spec.original_length if o["score_from"] is None else o["score_from"])
        if self.short:
            from convert.evaluate.fitness import short_window_problems

            problems = short_window_problems({**o, "fit_temperature": self.fit_temperature}, self.target_length,
                                             spec.original_length)
            if problems:
                raise ConvertError("; ".join(problems))
            self.length, self.chunks = int(o["window"]), int(o["chunks"])
        else:
            self.length, self.chunks = int(o["length"] or self.target_length), 1
            if self.score_from >= self.length:
                raise ConvertError(f"dprope-fit scores the tokens from position {self.score_from} on, but its windows "
                                   f"are {self.length} tokens: pass length > score_from (by default the target "
                                   "length and the original window)")
        self.chunk = int(o["loss_chunk"])
        self.windows = self.prepare()
        n = spec.head_dim // 2
        self.base = longrope_inv_freq(spec, torch.ones(n)).double()  # what a bake with factors 1 rotates by
        self.rotaries = rotary_modules(model)
        if not self.rotaries:
            raise ConvertError(f"{type(model).__name__} has no rotary embedding module with an inv_freq table; "
                               "supported architectures are listed in convert/arch.py")
        model.requires_grad_(False)
        model.eval()
        if o["gradient_checkpointing"]:
            checkpoint_layers(model)
        self.seconds: list[float] = []
        self.scored: list[int] = []
        # each step reads other text (short windows, or a batch of a larger pool): dprope.fit's pick=auto then
        # returns the iterates' average, not the step whose text happened to be easiest
        self.stochastic = self.short or self.windows_per_step() < len(self.windows)

    # ------------------------------------------------------------------------------------------- the text
    def corpus_ids(self) -> list[int]:
        from convert.evaluate.tasks.ppl import corpus_text

        corpus = self.options.get("corpus")
        if corpus and not Path(corpus).is_file():
            raise ConvertError(f"dprope-fit corpus {corpus} is not a file; pass a text file or leave it unset "
                               "(Python's own documentation)")
        ids = self.tok(corpus_text(corpus or None), add_special_tokens=False).input_ids
        skip = int(self.options.get("skip") or 0)  # tokens held out, e.g. for an evaluation on the corpus's start
        if skip >= len(ids):
            raise ConvertError(f"dprope-fit skips the corpus's first {skip} tokens, but it has {len(ids)}; pass a "
                               "smaller skip or a longer corpus")
        return ids[skip:]

    def prefix_id(self) -> int:
        """The token lm-eval puts before a document (BOS, else EOS; lm-eval ``HFLM.prefix_token_id``)."""
        t = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
        if t is None:
            raise ConvertError("the tokenizer has neither a BOS nor an EOS token to start a window with")
        return int(t)

    def prepare(self) -> list[tuple]:
        """(input ids [1, L], targets [L]) per window: the prefix token then the document's first L - 1 tokens, and
        the document's L tokens.  Full-length windows: the first ``samples`` of them; short windows: every W-token
        window of the corpus (the pool each step draws from)."""
        import torch

        ids = self.corpus_ids()
        L = self.length
        have = len(ids) // L
        want = have if self.short else int(self.options["samples"])
        if have < 1:
            raise ConvertError(f"the corpus has {len(ids)} tokens, fewer than one {L}-token window; pass a longer "
                               f"corpus (--opt corpus=FILE) or a shorter {'window' if self.short else 'length'}")
        if have < want:
            log.warning("the corpus holds %d windows of %d tokens, fewer than samples=%d: fitting on %d", have, L,
                        want, have)
        n = min(have, want)
        docs = torch.tensor(ids[: n * L], dtype=torch.long).view(n, L)
        inputs = torch.cat([torch.full((n, 1), self.prefix_id(), dtype=torch.long), docs[:, :-1]], dim=1)
        return [(inputs[k : k + 1], docs[k]) for k in range(n)]

    def windows_per_step(self) -> int:
        """How many windows a step reads: ``batch``, else all (full-length) or ``samples`` (short windows), at most
        the pool."""
        b = self.options.get("batch")
        if b is None and self.short:
            b = self.options["samples"]
        return len(self.windows) if b is None else min(int(b), len(self.windows))

    def step_windows(self, step: int) -> list[int]:
        """The windows step ``step`` reads: all, or ``windows_per_step()`` of them drawn from (seed, step)."""
        import numpy as np

        n, b = len(self.windows), self.windows_per_step()
        if b >= n:
            return list(range(n))
        rng = np.random.default_rng([int(self.options["seed"]), int(step)])
        return sorted(int(i) for i in rng.choice(n, size=b, replace=False))

    def positions(self, step: int, j: int):
        """The position ids int64 [L] of the j-th window of step ``step``: arange(L) for full-length windows, PoSE's
        skipped ids drawn from (seed, step, j) for short ones."""
        import numpy as np

        from convert.evaluate.positions import scoring_positions, window_rng

        if not self.short:
            return np.arange(self.length, dtype=np.int64)
        return scoring_positions(self.length, self.chunks, self.target_length, self.score_from,
                                 window_rng(int(self.options["seed"]), step, j))

    def step_inputs(self, step: int, rank: int = 0, world: int = 1) -> list[tuple]:
        """This rank's share of step ``step`` (the j-th window on rank j mod world): (input ids [1, L], targets [L],
        position ids [1, L] or None for full-length windows, the index of the first scored target)."""
        import torch

        from convert.evaluate.positions import first_scored

        out = []
        for j, k in list(enumerate(self.step_windows(step)))[rank::world]:
            ids, targets = self.windows[k]
            if not self.short:
                out.append((ids, targets, None, self.score_from))
                continue
            pos = self.positions(step, j)
            out.append((ids, targets, torch.from_numpy(pos)[None], first_scored(pos, self.score_from)))
        return out

    def scored_in(self, step: int) -> int:
        """Targets this rank's share of step ``step`` scores."""
        return sum(max(t.numel() - first, 0) for _, t, _, first in self.step_inputs(step, self.rank, self.world))

    @property
    def scored_per_window(self) -> int:
        """Targets scored per full-length window (short windows: it varies, see ``scored``)."""
        return self.length - self.score_from

    # ------------------------------------------------------------------------------------------- the loss
    @property
    def device(self):
        return next(self.model.parameters()).device

    def nll_sum(self, log_factors, temperature, step: int, backward: bool) -> tuple[float, int]:
        """(sum of -log p over the scored targets, their count) of this rank's share of step ``step``, the rotary
        embedding computed from ``log_factors`` and ``temperature`` (tensors; with ``backward`` their gradients
        accumulate, one backward pass per window)."""
        import torch

        from convert.compat import rotary_computed_from

        dev = self.device
        base = getattr(self.model, self.model.base_model_prefix)
        total, count = 0.0, 0
        for ids, targets, pos, first in self.step_inputs(step, self.rank, self.world):
            if first >= targets.numel():
                log.debug("step %d: a window scores no token (its last position is below %d)", step,
                          self.score_from)
                continue
            inv = (self.base.to(dev) * torch.exp(-log_factors)).float()
            scale = temperature * float(self.spec.attention_factor)
            # skipped ids come with an explicit all-ones mask: without one, transformers takes a jump in the
            # position ids for the start of another packed sequence (transformers/masking_utils.py,
            # find_packed_sequence_indices) and masks the chunks from each other
            kw = {} if pos is None else {"position_ids": pos.to(dev), "attention_mask": torch.ones_like(ids).to(dev)}
            if pos is not None and self.options.get("weights") == "span":
                kw["attention_mask"] = self.span_mask(pos[0], dev)
            # the sliding-window layers of a model with several layer types (Gemma 3) read the window's contiguous
            # positions: transformers masks their window by token index (convert.compat.rotary_computed_from)
            local = None if pos is None else torch.arange(ids.shape[1], device=dev)[None]
            with contextlib.ExitStack() as stack:
                for rot in self.rotaries:
                    stack.enter_context(rotary_computed_from(rot, inv, scale, local))
                hidden = base(input_ids=ids.to(dev), use_cache=False, **kw).last_hidden_state[0, first:]
                tgt = targets[first:].to(dev)
                if backward:
                    nll = chunked_nll(self.model, hidden, tgt, self.chunk)
                else:
                    head = self.model.get_output_embeddings()
                    softcap = getattr(self.model.config, "final_logit_softcapping", None)
                    nll = sum(_nll_sum(hidden[i : i + self.chunk], head.weight, head.bias, tgt[i : i + self.chunk],
                                       softcap) for i in range(0, hidden.shape[0], self.chunk))
            if backward:
                nll.backward()
            total += float(nll.detach())
            count += int(tgt.numel())
            del hidden, nll
        return total, count

    def __call__(self, log_factors, temperature: float, step: int = 0):
        import torch

        t0 = time.perf_counter()
        dev = self.device
        lf = torch.as_tensor(log_factors, dtype=torch.float64).detach().to(dev).requires_grad_(True)
        t = torch.tensor(float(temperature), dtype=torch.float64, device=dev, requires_grad=self.fit_temperature)
        total, count = self.nll_sum(lf, t, step, backward=True)
        n = lf.numel()
        g = lf.grad.detach().cpu() if lf.grad is not None else torch.zeros(n, dtype=torch.float64)
        gt = float(t.grad) if (self.fit_temperature and t.grad is not None) else 0.0
        buf = torch.tensor([total, float(count), *g.tolist(), gt], dtype=torch.float64)
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(buf)
            dist.broadcast(buf, src=0)  # every rank steps from rank 0's numbers, bit for bit
        if buf[1] <= 0:
            raise ConvertError(f"dprope-fit scored no token at step {step}: no window reached position "
                               f"{self.score_from}; lower score_from or raise samples / batch")
        loss = float(buf[0] / buf[1])
        grad = buf[2 : 2 + n] / buf[1]
        grad_t = float(buf[-1] / buf[1]) if self.fit_temperature else None
        self.seconds.append(time.perf_counter() - t0)
        self.scored.append(int(buf[1]))
        return loss, grad, grad_t

    def span_mask(self, pos, dev):
        """The 4D additive mask [1, 1, L, L] of ``weights=span`` (convert.evaluate.positions.span_log_weights) in the
        model's dtype; transformers takes a 4D mask as given (masking_utils.py).  Refused for models with
        sliding-window layers, whose own band mask it would replace."""
        import torch

        from convert.evaluate.positions import span_log_weights

        if getattr(self.model.config, "sliding_window", None) and any(
                t == "sliding_attention" for t in (getattr(self.model.config, "layer_types", None) or ())):
            raise ConvertError("weights=span replaces the attention mask, which a model with sliding-window layers "
                               "(Gemma 3) needs for its band: leave weights unset for it")
        dt = next(self.model.parameters()).dtype
        bias = torch.from_numpy(span_log_weights(pos.numpy())).to(dt)
        return bias[None, None].to(dev)

    def value(self, log_factors, temperature: float, steps: int = 1) -> float:
        """The mean loss over the scored targets of steps 0 .. ``steps`` - 1 (the same windows and position ids on
        every call), forward only: how ``dprope.fit``'s YaRN scan and bench/short_window_rank.py compare factor
        sets.  Under several processes each rank reads its share and the sums are all-reduced."""
        import torch

        dev = self.device
        lf = torch.as_tensor(log_factors, dtype=torch.float64).detach().to(dev)
        t = torch.tensor(float(temperature), dtype=torch.float64, device=dev)
        total, count = 0.0, 0
        with torch.no_grad():
            for step in range(int(steps)):
                s, c = self.nll_sum(lf, t, step, backward=False)
                total, count = total + s, count + c
        if self.world > 1:
            import torch.distributed as dist

            buf = torch.tensor([total, float(count)], dtype=torch.float64)
            dist.all_reduce(buf)
            dist.broadcast(buf, src=0)
            total, count = float(buf[0]), int(buf[1])
        if count <= 0:
            raise ConvertError(f"the loss scored no token: no window reached position {self.score_from}; lower "
                               "score_from or raise samples")
        return total / count

    # ------------------------------------------------------------------------------------------- what it is
    def identity(self) -> dict[str, Any]:
        """What the loss depends on besides the model weights: the text by content, the windows and the scoring."""
        from convert.evaluate.engine import corpus_digest

        o = self.options
        d = {"kind": "fit-loss", "corpus": corpus_digest(o.get("corpus")), "windows": len(self.windows),
             "length": self.length, "score_from": self.score_from, "batch": o.get("batch"),
             "seed": int(o["seed"]), "dtype": str(next(self.model.parameters()).dtype),
             "target_length": self.target_length}
        if int(o.get("skip") or 0):
            d["skip"] = int(o["skip"])
        if self.short:  # only then, so the states of full-length fits keep their names
            d.update(window=self.length, chunks=self.chunks, positions="pose", per_step=self.windows_per_step())
            if o.get("weights"):
                d["weights"] = o["weights"]
        return d

    def label(self) -> str:
        corpus = self.options.get("corpus")
        name = Path(corpus).name if corpus else "pydoc"
        if int(self.options.get("skip") or 0):
            name += f"[{int(self.options['skip'])}:]"
        batch = self.options.get("batch")
        if self.short:
            return (f"nll-past-{self.score_from}:corpus={name}:window={self.length}:chunks={self.chunks}"
                    + (f":weights={self.options['weights']}" if self.options.get("weights") else "")
                    + f":pool={len(self.windows)}:batch={self.windows_per_step()}")
        return (f"nll-past-{self.score_from}:corpus={name}:windows={len(self.windows)}x{self.length}"
                + (f":batch={batch}" if batch else ""))

    def tokens_per_step(self) -> int:
        return len(self.step_windows(0)) * self.length


class ShortWindowObjective:
    """objective(factors float [n_pairs], temperature) -> the mean next-token loss (nats per scored token) of the
    fit's objective, forward only: :class:`FitLoss`'s windows, positions and scoring (``options`` as the fit's, plus
    ``steps``, default 1), the same windows for every factor set (steps 0 .. steps - 1 of ``seed``), summed over the
    steps and divided once.  For ranking factor sets (bench/short_window_rank.py).  ``seconds``: wall time of each
    call; ``scored``: scored targets per call."""

    def __init__(self, model, tokenizer, spec: RopeSpec, target_length: int, options: Mapping[str, Any]):
        from dprope.methods import FIT_LOSS_OPTIONS

        o = dict(options)
        self.steps = int(o.pop("steps", 1))
        if self.steps < 1:
            raise ConvertError(f"the short-window objective needs steps >= 1, got {self.steps}")
        o = {k: v for k, v in o.items() if k in FIT_LOSS_OPTIONS}
        o["gradient_checkpointing"] = False  # forward only
        self.loss = FitLoss(model, tokenizer, spec, target_length, o, fit_temperature=False)
        self.seconds: list[float] = []
        self.scored: list[int] = []

    def __call__(self, factors, temperature: float) -> float:
        import torch

        t0 = time.perf_counter()
        f = torch.as_tensor(factors, dtype=torch.float64).flatten()
        if not bool(torch.isfinite(f).all()) or not bool((f > 0).all()):
            raise ConvertError("factors must be finite and > 0")
        value = self.loss.value(f.log(), float(temperature), self.steps)
        self.seconds.append(time.perf_counter() - t0)
        self.scored.append(sum(self.loss.scored_in(step) for step in range(self.steps)))
        return value

    def identity(self) -> dict[str, Any]:
        return {**self.loss.identity(), "kind": "short-window-objective", "steps": self.steps}

    def label(self) -> str:
        return self.loss.label() + f":steps={self.steps}"

    def tokens_per_call(self) -> int:
        return sum(len(self.loss.step_windows(s)) for s in range(self.steps)) * self.loss.length


def resolve_device(device: str) -> str:
    """``auto``: where evaluations run (convert.runtimes.hf.eval_device: $DPROPE_DEVICE, else the GPU torch sees,
    else the CPU), this process's own GPU when several processes share a machine."""
    from convert.evaluate.fitness import rank_device
    from convert.runtimes.hf import eval_device

    return rank_device(eval_device() if device == "auto" else device)


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto``: bfloat16 on a GPU (float32 SDPA with grouped KV heads has no fused kernel there and materialises
    the attention matrix, convert/runtimes/hf.py), float32 on the CPU."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if str(device).startswith("cuda") else "float32"


def make_fit_loss(model_dir: Path, spec: RopeSpec, target_length: int, options: Mapping[str, Any],
                  fit_temperature: bool = False, rank: int = 0, world: int = 1,
                  loaded: tuple | None = None) -> FitLoss:
    """The fit's loss for the base checkpoint in ``model_dir`` (an HF directory; ``spec`` its RoPE facts), loading
    the model unless ``loaded`` = (model, tokenizer)."""
    from dprope.methods import FIT_LOSS_OPTIONS

    from convert.evaluate.fitness import load_model

    o = {**FIT_LOSS_OPTIONS, **{k: v for k, v in options.items() if k in FIT_LOSS_OPTIONS}}
    if loaded is None:
        device = resolve_device(str(o["device"]))
        dtype = resolve_dtype(str(o["dtype"]), device)
        log.info("loading %s for the fit (%s, %s)", model_dir, device, dtype)
        loaded = load_model(Path(model_dir), dtype, device)
    model, tok = loaded
    return FitLoss(model, tok, spec, target_length, o, fit_temperature, rank, world)


def describe_device(model) -> str:
    """The device the model runs on, in words (a GPU's name where there is one)."""
    import torch

    dev = next(model.parameters()).device
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return str(dev)


def tokens_processed(loss: FitLoss, steps: int) -> int:
    """Tokens run forward and backward by ``steps`` steps (each also recomputed once under checkpointing)."""
    return int(steps) * loss.tokens_per_step()
