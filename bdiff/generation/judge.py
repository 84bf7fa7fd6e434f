"""Judges of generated text: generative perplexity (Gen PPL, the samples' perplexity under an autoregressive
model) and the entropy of each sample's tokens, the two numbers BD3-LM and MDLM report for samples.

Gen PPL rewards repetition (a text that repeats one word is very likely), so it is read beside the entropy: low
entropy flags degenerate text. A judge is autoregressive and reads the generator's token ids:

- a bdiff model trained with `--block_size 1` on the same data (`BdiffJudge`). Block diffusion with one-token
  blocks is autoregressive: with every token masked, token i sees exactly the clean tokens before it and itself
  as MASK, so its loss at t = 1 is the autoregressive negative log-likelihood. Every data set thus has a judge
  this trainer makes.
- a Hugging Face causal LM, `hf:gpt2-large` as BD3-LM uses (`HFJudge`, `pip install transformers`), for models
  whose tokenizer is GPT-2's.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F

from bdiff.errors import BdiffError
from bdiff.models.objective import document_layout


class JudgeError(BdiffError):
    """A judge that cannot judge this model's text; the message says why."""


class BdiffJudge:
    """A bdiff model with block size 1 as an autoregressive judge."""

    def __init__(self, model, tokenizer: str):
        if model.cfg.block_size != 1:
            raise JudgeError(f"a judge must be autoregressive: its block size is {model.cfg.block_size}; train one "
                             f"with `python train.py --block_size 1` on the same data")
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def sequence_nll(self, tokens: torch.Tensor, first_offset: int | None = None) -> torch.Tensor:
        """Each token's negative log-likelihood (L,) float32, in the training layout with every token masked:
        the model's loss at t = 1, token by token (its mean is model(tokens, noise_range=(1, 1)))."""
        cfg = self.model.cfg
        tokens = tokens.to(self.device)
        layout = document_layout(tokens, cfg.bos_id, 1, first_offset, cfg.separator)
        x_t = torch.full_like(tokens, cfg.mask_id)
        hidden, has_source = self.model.predicting_states(torch.cat([x_t, tokens]), layout.positions,
                                                          layout.cu_seqlens, layout.schedule)
        nll = F.cross_entropy(self.model.logits(hidden), tokens, reduction="none")
        return nll if has_source is None else nll * has_source  # token shift: a document's first token, unscored

    def document_nll(self, ids: list[int]) -> torch.Tensor:
        """(len(ids),): `ids` read as one document from its start (after a BOS where this judge's documents open
        with one)."""
        if self.model.cfg.separator == "opens":
            return self.sequence_nll(torch.tensor([self.model.cfg.bos_id] + ids), first_offset=0)[1:]
        return self.sequence_nll(torch.tensor(ids), first_offset=0)


class HFJudge:
    """A Hugging Face causal LM (transformers) as the judge of GPT-2-tokenized text."""

    def __init__(self, name: str, device):
        try:
            from transformers import AutoModelForCausalLM
        except ImportError:
            raise JudgeError(f"the judge hf:{name} needs transformers: pip install -e \".[judge]\"") from None
        try:
            self.model = AutoModelForCausalLM.from_pretrained(name).to(device).eval()
        except OSError as e:
            raise JudgeError(f"hf:{name}: cannot load it ({str(e).splitlines()[0]})") from None
        self.tokenizer, self.device = "gpt2", torch.device(device)
        self.bos_id = self.model.config.bos_token_id  # GPT-2's <|endoftext|> opens a text, as in its training

    @torch.no_grad()
    def document_nll(self, ids: list[int]) -> torch.Tensor:
        tokens = torch.tensor([[self.bos_id] + ids], device=self.device)
        logits = self.model(tokens).logits[0, :-1].float()  # (n, vocab): position i predicts ids[i]
        return F.cross_entropy(logits, tokens[0, 1:], reduction="none")


def load_judge(name: str, device="cpu", tokenizer: str | None = None, dtype=None):
    """`hf:NAME` (a Hugging Face causal LM: a Hub name or a local directory) or anything
    bdiff.models.from_pretrained reads (run in `dtype`, the model's set_dtype's, when given). `tokenizer`:
    the judged model's; a judge that reads other token ids is refused."""
    if name.startswith("hf:"):
        judge = HFJudge(name[3:], device)
    else:
        from bdiff.data import tokenizer_of
        from bdiff.models import from_pretrained

        model = from_pretrained(name, device)
        config = model.run_config
        if dtype is not None:
            model.set_dtype(dtype)
        judge = BdiffJudge(model, tokenizer_of(config))
    if tokenizer is not None and judge.tokenizer != tokenizer:
        raise JudgeError(f"the judge {name} reads {judge.tokenizer} token ids, the model writes {tokenizer} ones: "
                         f"a judge must share the model's tokenizer")
    return judge


def gen_ppl(judge, prompts: list[list[int]], samples: list[list[int]]) -> float:
    """exp(mean negative log-likelihood of the samples' tokens), each sample scored after its prompt (prompts
    without a leading BOS: a document's first tokens), all tokens pooled."""
    total, count = 0.0, 0
    for prompt, sample in zip(prompts, samples):
        if sample:
            total += float(judge.document_nll(prompt + sample)[len(prompt):].double().sum())
            count += len(sample)
    if not count:
        raise JudgeError("no generated tokens to judge")
    return math.exp(total / count)


def token_entropy(ids: list[int]) -> float:
    """Entropy in nats of one text's token frequencies (BD3-LM's sample entropy); 0 for a repeated token."""
    from bdiff.generation.sampling import window_entropy

    return float(window_entropy(torch.tensor([ids]), max(ids) + 1)[0])


WORD = re.compile(r"\w+")  # a word: a run of letters, digits and underscores (text split on spaces and punctuation)


def corpus_words(files: list[str], tokenizer: str, max_tokens: int = 8_000_000) -> set[str]:
    """The words of the first `max_tokens` tokens of a data set's shards, decoded."""
    import numpy as np

    from bdiff.data.formats import read_shard
    from bdiff.data.tokenizer import decode

    words, left = set(), max_tokens
    for path in files:
        tokens = read_shard(path)[:left]
        words.update(WORD.findall(decode(tokens.astype(np.int64).tolist(), tokenizer)))
        left -= len(tokens)
        if left <= 0:
            break
    return words


def known_word_fraction(text: str, words: set[str]) -> float | None:
    """The fraction of `text`'s words that are words of the corpus (`corpus_words`): about 1 for text that reads
    like the data, low for letter soup. None for a text without words."""
    found = WORD.findall(text)
    return sum(w in words for w in found) / len(found) if found else None
