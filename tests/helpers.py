"""Helpers shared by the tests (fixtures live in conftest.py)."""
import contextlib
import os
import socket

import torch


def random_cu_seqlens(gen: torch.Generator, L: int, max_doc: int) -> torch.Tensor:
    """Random document boundaries over L positions (documents of length 1..max_doc)."""
    bounds = [0]
    while bounds[-1] < L:
        bounds.append(min(L, bounds[-1] + int(torch.randint(1, max_doc + 1, (1,), generator=gen))))
    return torch.tensor(bounds, dtype=torch.int32)


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on, for a gloo process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def user_env(**extra: str) -> dict:
    """The environment a command gets from a user's shell: this process's, less the interpreter switch (a command's
    CPU path is the PyTorch references), torchrun's rank variables and this run's xdist worker name (pytest-benchmark
    reads it), plus `extra`."""
    drop = ("TRITON_INTERPRET", "RANK", "LOCAL_RANK", "WORLD_SIZE")
    return {**{k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PYTEST_XDIST")}, **extra}


BOS, MASK = 256, 257  # the byte-level data set's (bdiff.data.DATASETS['stdlib'])


def random_tokens(gen, L, doc_starts):
    tokens = torch.randint(0, 256, (L,), generator=gen)
    tokens[doc_starts] = BOS
    return tokens


def seed_positions(tokens: list[int]) -> list[int]:
    """The seed's rule, as written in its code: index minus the index of the latest BOS at or before it, a
    sequence with no BOS yet counting as if one stood at index -1."""
    last, out = -1, []
    for i, tok in enumerate(tokens):
        last = i if tok == BOS else last
        out.append(i - last)
    return out


@contextlib.contextmanager
def torch_flags(allow_tf32: bool | None = None, deterministic: bool | None = None):
    """PyTorch's global switches set for the block and restored after it, read and written through their own API.
    Never monkeypatch.setattr on torch.backends.*: those are module objects whose attributes live behind
    __getattr__/__setattr__, and pytest >= 9.2 undoes a patch of an attribute missing from __dict__ by deleting it
    ("'cuBLASModule' object has no attribute 'allow_tf32'" at teardown)."""
    tf32 = torch.backends.cuda.matmul.allow_tf32
    det, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        if allow_tf32 is not None:
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32
        if deterministic is not None:
            torch.use_deterministic_algorithms(deterministic, warn_only=True)  # warn: CPU ops need no proof here
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.use_deterministic_algorithms(det, warn_only=warn_only)


TEXT = ("def add(a, b):\n    return a + b\n\nclass Stack:\n    def push(self, x):\n        self.items.append(x)\n"
        "The quick brown fox jumps over the lazy dog. A block-diffusion model denoises blocks of tokens.\n")


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # Qwen's layout, without its extras


def tiny_tokenizer(directory: str, vocab: int = 300, mask: bool = False, chat: bool = False) -> int:
    """A byte-level BPE tokenizer trained here on a few lines (no download), saved into `directory` as transformers
    saves one (tokenizer.json, tokenizer_config.json), with <|endoftext|> as its end of text, with `mask` a mask
    token of its own, with `chat` a ChatML chat template and its <|im_start|>, <|im_end|>. Returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>"] + (["<|mask|>"] if mask else []) + (["<|im_start|>", "<|im_end|>"] if chat else [])
    tok.train_from_iterator([TEXT] * 20, trainers.BpeTrainer(vocab_size=vocab, special_tokens=special,
                                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    extra = {"mask_token": "<|mask|>"} if mask else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", **extra)
    if chat:
        fast.chat_template = CHATML
    fast.save_pretrained(directory)
    return tok.get_vocab_size()


def tiny_causal_lm(directory: str, family: str, vocab: int, seed: int = 0, spare_rows: int = 0, **overrides):
    """A random transformers causal LM of `family` (llama; qwen2, with its q/k/v biases; qwen3, with its q/k norms),
    4 query heads on 2 key/value heads of 16, two layers, saved into `directory`; embeddings of vocab + spare_rows
    rows. Returns the model (fp32, eval)."""
    import transformers

    torch.manual_seed(seed)
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                    "qwen3": transformers.Qwen3Config}[family]
    config = config_class(vocab_size=vocab + spare_rows, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=2048,
                          tie_word_embeddings=False, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config)
    if family == "qwen2":  # biases start at zero: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    model.save_pretrained(directory)
    return model.eval()
