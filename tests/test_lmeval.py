"""The chunked perplexity model: the same rolling log-likelihood as lm-eval's own HFLM, without full-vocabulary
logits for every position."""

import numpy as np
import pytest


def _requests(texts):
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood_rolling", {}, (t,), i, metadata=("t", i, 1)) for i, t in enumerate(texts)]


def test_chunked_rolling_loglikelihood_equals_lm_evals_hflm(tiny_models):
    from lm_eval.models.huggingface import HFLM
    from pydoc_data.topics import topics
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from convert.evaluate.lmeval_hf import chunked_lm_class

    path = str(tiny_models[("llama", False)])
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    texts = [topics["assert"], topics["for"][:300]]  # several 64-token windows, and a short one
    ref = HFLM(pretrained=model, tokenizer=tok, max_length=64, batch_size=1, device="cpu").loglikelihood_rolling(
        _requests(texts), disable_tqdm=True)
    lm = chunked_lm_class()(pretrained=model, tokenizer=tok, max_length=64, batch_size=1, device="cpu",
                            logit_chunk=7)
    got = lm.loglikelihood_rolling(_requests(texts), disable_tqdm=True)
    assert len(tok(texts[0], add_special_tokens=False).input_ids) > 3 * 64
    assert got == pytest.approx(ref, rel=1e-5)
    for i, t in enumerate(texts):
        lps = lm.token_logprobs[i]
        assert len(lps) == len(tok(t, add_special_tokens=False).input_ids)
        assert np.all(lps <= 0) and float(lps.astype(np.float64).sum()) == pytest.approx(got[i], rel=1e-6)
