"""A Hugging Face causal LM as a block-diffusion LM (bdiff/models/adapted.py): tiny random Llama, Qwen2 (q/k/v biases)
and Qwen3 (q/k norms) models with grouped-query heads, built here (nothing is downloaded), run through bdiff's
attention registered with transformers. References: the same transformers model with its own SDPA attention under
the dense block-diffusion mask (kernels/reference.bd_attention_mask), its own causal forward, and the objective
written out with full logits."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
import transformers

import train
from bdiff.config import ModelConfig
from bdiff.data.prepare import prepare
from bdiff.generation.sampling import generate
from bdiff.kernels.reference import bd_attention_mask
from bdiff.models import from_pretrained
from bdiff.models.adapted import AdaptedLM, AdaptError
from bdiff.models.objective import document_layout, loss_weights, noise_blocks
from helpers import TEXT, tiny_causal_lm, tiny_tokenizer, user_env

FAMILIES = ["llama", "qwen2", "qwen3"]
BLOCK = 4


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """family -> a directory holding a tiny random model of that family and a tokenizer without a mask token. The Qwen
    models' embeddings have a few spare rows, as Qwen's own do, so MASK takes one of them; Llama's have none, as Llama
    3's, so they grow by MASK's row."""
    out = {}
    for i, family in enumerate(FAMILIES):
        directory = str(tmp_path_factory.mktemp(family))
        size = tiny_tokenizer(directory)
        tiny_causal_lm(directory, family, size, seed=i, spare_rows=0 if family == "llama" else 3)
        out[family] = directory
    return out


def adapted(directory: str, token_shift: bool = False, block_size: int = BLOCK) -> AdaptedLM:
    size = transformers.AutoTokenizer.from_pretrained(directory).vocab_size  # the mask token: the first id after it
    bos = transformers.AutoTokenizer.from_pretrained(directory).eos_token_id
    cfg = ModelConfig(vocab_size=size + 1, mask_id=size, bos_id=bos, block_size=block_size, separator="closes",
                      init=directory, token_shift=token_shift)
    return AdaptedLM.from_base(directory, cfg, log=lambda *_: None).eval()


def sdpa_model(model: AdaptedLM):
    """The same model with transformers' own SDPA attention: the reference (MASK's row copied where it grew)."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(model.cfg.init, attn_implementation="sdpa",
                                                            dtype=torch.float32).eval()
    ref.resize_token_embeddings(model.cfg.vocab_size)
    with torch.no_grad():
        ref.get_input_embeddings().weight.copy_(model.lm.get_input_embeddings().weight)
        ref.lm_head.weight.copy_(model.head)
    return ref


def packed(gen, model, L=45):
    """A packed sequence of several documents closed by the separator, its noised copy and layout."""
    cfg = model.cfg
    tokens = torch.randint(0, cfg.mask_id, (L,), generator=gen)
    tokens[tokens == cfg.bos_id] = cfg.bos_id + 1
    tokens[[13, 30]] = cfg.bos_id  # closes documents: 0..13, 14..30, 31..
    layout = document_layout(tokens, cfg.bos_id, cfg.block_size, separator=cfg.separator)
    x_t, masked, t = noise_blocks(tokens, layout.blocks, cfg.mask_id, 0.2, 0.9, generator=gen,
                                  num_blocks=layout.num_blocks)
    return tokens, x_t, masked, t, layout


def reference_hidden(ref, tokens_2l, positions_2l, cu_seqlens, block_size):
    """Final hidden states of the 2L rows with SDPA under the reference mask (repeat_kv inside transformers)."""
    mask = bd_attention_mask(cu_seqlens, block_size)[None, None]  # (1, 1, 2L, 2L) bool, True where allowed
    return ref.model(input_ids=tokens_2l[None], position_ids=positions_2l[None], attention_mask=mask,
                     use_cache=False).last_hidden_state[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_both_halves_equal_sdpa_under_the_reference_mask(bases, family, gen, cpu_path):
    """Every row's logits, through bd_attention (the PyTorch path, then the Triton kernels in the interpreter) with
    grouped key/value heads, equal the model's own SDPA under the dense block-diffusion mask (fp32, 1e-5)."""
    model = adapted(bases[family])
    ref = sdpa_model(model)
    tokens, x_t, _, _, layout = packed(gen, model)
    rows = torch.cat([x_t, tokens])
    with torch.no_grad():
        got = model.logits(model.hidden_states(rows, layout.positions, layout.cu_seqlens))
        want = ref.lm_head(reference_hidden(ref, rows, layout.positions.repeat(2), layout.cu_seqlens, BLOCK))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_with_block_size_one_the_clean_half_is_the_causal_lm(bases, gen, reference_ops):
    """Block size 1 makes the clean half token-causal: its logits are the model's own causal forward's."""
    model = adapted(bases["qwen3"], block_size=1)
    ref = sdpa_model(model)
    L = 30
    tokens = torch.randint(model.cfg.bos_id + 1, model.cfg.mask_id, (L,), generator=gen)  # one document
    cu = torch.tensor([0, L], dtype=torch.int32)
    with torch.no_grad():
        clean = model.logits(model.hidden_states(torch.cat([tokens, tokens]), torch.arange(L), cu)[L:])
        causal = ref(tokens[None]).logits[0]
    torch.testing.assert_close(clean, causal, atol=1e-5, rtol=1e-5)


def reference_objective(ref, tokens, x_t, weights, layout, block_size, shift):
    """The objective written out: full logits of the 2L rows (SDPA under the dense mask), position i predicted by
    its own noisy row, or with token shift by the row of position i-1 (noisy inside a block, clean at a block's
    start, none at a document's start), cross-entropy times the 1/t weights, summed, over L."""
    L = tokens.numel()
    logits = ref.lm_head(reference_hidden(ref, torch.cat([x_t, tokens]), layout.positions.repeat(2),
                                          layout.cu_seqlens, block_size))  # (2L, V)
    loss = torch.zeros(())
    for i in range(L):
        p = int(layout.positions[i])
        if not shift:
            row = i
        elif p == 0 or i == 0:
            continue
        else:
            row = L + i - 1 if p % block_size == 0 else i - 1
        loss = loss + weights[i] * F.cross_entropy(logits[row], tokens[i])
    return loss / L


@pytest.mark.parametrize("shift", [False, True])
def test_loss_and_gradients_equal_the_written_out_objective(bases, gen, shift, reference_ops):
    """The fused loss over the trunk and every parameter's gradient equal the objective with full logits
    (reference_objective), with and without token shift (Qwen2: biases get gradients too)."""
    model = adapted(bases["qwen2"], token_shift=shift)
    ref = sdpa_model(model)
    model.train(), ref.train()
    tokens, x_t, masked, t, layout = packed(gen, model)
    weights = loss_weights(masked, t)
    got = model.objective(x_t, tokens, weights, layout.positions, layout.cu_seqlens, layout.schedule)
    want = reference_objective(ref, tokens, x_t, weights, layout, BLOCK, shift)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    got_grads = dict(zip([n for n, _ in model.lm.named_parameters()], torch.autograd.grad(got, model.lm.parameters())))
    want_grads = dict(zip([n for n, _ in ref.named_parameters()], torch.autograd.grad(want, ref.parameters())))
    assert got_grads.keys() == want_grads.keys()
    for name, g in got_grads.items():
        torch.testing.assert_close(g, want_grads[name], atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_complementary_masks_average_the_mask_and_its_complement(bases, gen, reference_ops):
    """--complementary: the loss is the mean of the loss under the mask and under its complement at level 1 - t, so
    every token carries loss once."""
    model = adapted(bases["llama"], token_shift=True)
    tokens, _, _, _, layout = packed(gen, model)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    with torch.no_grad():
        both = model(tokens, noise_range=(0.3, 0.8), generator=torch.Generator().manual_seed(seed), layout=layout,
                     complementary=True)
        x_t, masked, t = noise_blocks(tokens, layout.blocks, model.cfg.mask_id, 0.3, 0.8,
                                      generator=torch.Generator().manual_seed(seed), num_blocks=layout.num_blocks)
        x_c = torch.where(masked, tokens, model.cfg.mask_id)
        args = (layout.positions, layout.cu_seqlens, layout.schedule)
        want = (model.objective(x_t, tokens, loss_weights(masked, t), *args) +
                model.objective(x_c, tokens, loss_weights(~masked, 1 - t), *args)) / 2
    torch.testing.assert_close(both, want)


@pytest.mark.parametrize("shift", [False, True])
def test_the_cache_gives_the_logits_of_the_whole_layout(bases, shift, reference_ops):
    """Sampling an adapted model (grouped key/value heads in the cache): every step's logits with the exact KV cache
    equal those of the whole x_t ⊕ x_0 layout computed from scratch, with and without token shift, for a prompt that
    ends inside a block and one that ends on a block's boundary."""
    model = adapted(bases["qwen3"], token_shift=shift)
    prompts = [[5, 17, 9, 30, 2, 11], [7, 8, 9, 10, 11, 12, 13, 14]]
    cached = generate(model, prompts, max_new_tokens=12, strategy="confidence", temperature=0, keep_logits=True)
    fresh = generate(model, prompts, max_new_tokens=12, strategy="confidence", temperature=0, keep_logits=True,
                     cache=False)
    assert cached.tokens == fresh.tokens
    for a, b in zip(cached.step_logits, fresh.step_logits):
        masked = torch.isfinite(a) & torch.isfinite(b)
        torch.testing.assert_close(a[masked], b[masked], atol=1e-5, rtol=1e-5)


def test_a_model_whose_attention_bypasses_transformers_is_refused(bases):
    """A model whose attention does not call transformers' attention functions would train with its own causal
    attention: one line naming its type."""
    lm = transformers.AutoModelForCausalLM.from_pretrained(bases["llama"], attn_implementation="sdpa")
    for layer in lm.model.layers:  # its own attention, computed in place
        def own(hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
            return torch.zeros_like(hidden_states), None
        layer.self_attn.forward = own
    cfg = ModelConfig(vocab_size=lm.config.vocab_size, mask_id=1, bos_id=0, init=bases["llama"])
    with pytest.raises(AdaptError, match=r"^LlamaForCausalLM: 0 of its 2 layers call transformers' attention"):
        AdaptedLM(lm, cfg)


@pytest.fixture(scope="module")
def adapted_run(bases, tmp_path_factory):
    """The train command on a Qwen3 base: data prepared with its tokenizer, 50 steps of AdamW, the model directory."""
    root = tmp_path_factory.mktemp("run")
    docs = root / "docs"
    docs.mkdir()
    for i in range(40):
        (docs / f"{i:02d}.txt").write_text(TEXT * (1 + i % 3))
    prepare(str(docs), bases["qwen3"], str(root / "data"), jobs=1, progress=False, log=lambda *_: None)
    argv = ["--device", "cpu", "--init", bases["qwen3"], "--data_dir", str(root / "data"), "--steps", "50",
            "--seq_len", "128", "--micro_steps", "1", "--val_seq_len", "128", "--val_tokens", "512", "--lr", "3e-3",
            "--lr_warmup", "5", "--out_dir", str(root), "--run_name", "adapt", "--val_every", "0"]
    old = os.environ.pop("TRITON_INTERPRET", None)  # the PyTorch path: a step in the interpreter takes minutes
    try:
        model = train.main(argv)
    finally:
        if old is not None:
            os.environ["TRITON_INTERPRET"] = old
    return model, root


def test_mask_takes_the_tokenizers_own_token_a_spare_row_or_a_new_one(bases, tmp_path):
    """MASK is the tokenizer's mask token where it has one (prepare records it); otherwise the first id past the
    tokenizer, in a spare row of the embeddings (Qwen's) or in a new row they grow by (Llama's); the run says which."""
    said = []
    for family, words in (("qwen3", "a row of the model's 303-row embeddings"),
                          ("llama", "new: the embeddings and the head grow from 300 to 301 rows")):
        cfg = ModelConfig(vocab_size=301, mask_id=300, bos_id=0, init=bases[family], separator="closes")
        model = AdaptedLM.from_base(bases[family], cfg, log=said.append)
        assert said[-1] == f"mask token: id 300, {words}" + (" (at the mean of the others)" if family == "llama"
                                                              else ""), said[-1]
        assert model.head.shape[0] == model.cfg.vocab_size == (303 if family == "qwen3" else 301)
    own = tmp_path / "own"
    size = tiny_tokenizer(str(own), mask=True)
    (tmp_path / "docs.txt").write_text(TEXT + "\n\n" + TEXT)
    record = prepare(str(tmp_path / "docs.txt"), str(own), str(tmp_path / "data"), doc_sep="\n\n", jobs=1,
                     progress=False, log=lambda *_: None)
    assert record.mask_id == transformers.AutoTokenizer.from_pretrained(str(own)).mask_token_id < size


def test_fifty_steps_lower_the_loss(adapted_run, bases):
    model, root = adapted_run
    with open(root / "adapt.jsonl") as f:
        losses = [json.loads(line)["train_loss"] for line in f if "train_loss" in line]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, f"training loss {first:.3f} -> {last:.3f}"
    assert model.cfg.init == bases["qwen3"] and model.cfg.token_shift, "the adapt preset: token shift on"


def test_muon_takes_the_hidden_matrices_and_adamw_the_rest(bases, reference_ops):
    """--optimizer muon on an adapted model: Muon gets every 2-D matrix of the decoder layers, AdamW the embedding,
    the head, the norms and the biases (Qwen2's), each parameter once; a step moves both kinds."""
    model = adapted(bases["qwen2"])
    cfg = train.get_preset("adapt").train
    cfg.optimizer = "muon"
    adam, muon = train.build_optimizers(model, cfg, adapted=True)
    in_adam = [p for g in adam.param_groups for p in g["params"]]
    in_muon = [p for g in muon.param_groups for p in g["params"]]
    assert len({id(p) for p in in_adam + in_muon}) == len(in_adam) + len(in_muon) == len(list(model.parameters()))
    assert all(p.ndim == 2 for p in in_muon) and len(in_muon) == 2 * 7, "q, k, v, o, gate, up, down in 2 layers"
    assert any(p.ndim == 1 for p in in_adam), "biases and norms go to AdamW"
    before = [p.detach().clone() for p in (in_muon[0], in_adam[0])]
    tokens = torch.randint(1, model.cfg.mask_id, (40,))
    model.train()
    model(tokens, noise_range=(0.5, 0.5)).backward()
    adam.step()
    muon.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, (in_muon[0], in_adam[0]))), "both optimizers step"


def test_the_saved_model_loads_in_bdiff_and_in_transformers_alone(adapted_run, tmp_path):
    """The model directory: bdiff's one loader gives the trained model back; transformers alone (bdiff and Triton
    unimportable) loads it with AutoModelForCausalLM and trust_remote_code, its logits those of bdiff's model (1e-5)
    and its generate() the prompt followed by the tokens bdiff's sampler writes (greedy, one token a step)."""
    model, root = adapted_run
    directory = root / "adapt" / "model"
    for where in (directory, root / "adapt" / "final.pt"):  # the model directory, and final.pt from its config
        loaded = from_pretrained(str(where))
        for name, p in model.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[name], p, atol=0, rtol=0, msg=f"{where.name}: {name}")
    cfg = model.cfg
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randint(cfg.bos_id + 1, cfg.mask_id, (40,), generator=gen)
    x0[17] = cfg.bos_id
    x_t = torch.where(torch.rand(40, generator=gen) < 0.5, cfg.mask_id, x0)
    layout = document_layout(x0, cfg.bos_id, cfg.block_size, separator=cfg.separator)
    with torch.no_grad():
        h, has_source = model.predicting_states(torch.cat([x_t, x0]), layout.positions, layout.cu_seqlens)
        want = model.logits(h) * has_source[:, None]
    prompt = x0[:6].tolist()
    sampled = generate(model, [prompt], max_new_tokens=24, strategy="confidence", temperature=0).tokens[0]
    env = user_env()
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", TRANSFORMERS_ALONE, str(directory),
                             json.dumps([x_t.tolist(), x0.tolist(), prompt])], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(out["logits"]), want, atol=1e-5, rtol=1e-5)
    assert out["generated"] == prompt + sampled, "generate() returns the prompt, then the sampler's tokens"
    assert out["mask_token_id"] == cfg.mask_id and out["tokenizer_mask"] == cfg.mask_id, "MASK saved with the model"


TRANSFORMERS_ALONE = r"""
import json, sys
sys.modules["bdiff"] = None  # `import bdiff` fails: the model must load without it
sys.modules["triton"] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

where, (x_t, x_0, prompt) = sys.argv[1], json.loads(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(where, trust_remote_code=True, dtype=torch.float32).eval()
with torch.no_grad():
    logits = model(torch.tensor([x_t]), clean_ids=torch.tensor([x_0])).logits[0].tolist()
    generated = model.generate(torch.tensor([prompt]), max_new_tokens=24)[0].tolist()
print(json.dumps({"logits": logits, "generated": generated, "mask_token_id": model.config.mask_token_id,
                  "tokenizer_mask": AutoTokenizer.from_pretrained(where).mask_token_id}))
"""


def test_the_commands_read_an_adapted_model(adapted_run, reference_ops):
    """sample.py, bdiff.eval and bdiff.lm_eval on an adapted model's directory: a sample in its tokenizer, the
    validation loss, and lm-eval's log-likelihood equal to minus bdiff.eval's loss on the same text and draws
    (with token shift: a document's first token carries none)."""
    _, root = adapted_run
    directory = str(root / "adapt" / "model")
    env = user_env()
    ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sample = subprocess.run([sys.executable, "sample.py", "--device", "cpu", "--ckpt", directory, "--prompt",
                             "def add", "--max_new_tokens", "16"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert sample.returncode == 0 and "--- 'def add'\ndef add" in sample.stdout, sample.stderr[-2000:]
    evaluated = subprocess.run([sys.executable, "-m", "bdiff.eval", "--device", "cpu", "--model", directory,
                                "--draws", "2", "--levels", "0.5"], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=300)
    assert evaluated.returncode == 0 and "validation loss, t ~ U[0, 1]" in evaluated.stdout, evaluated.stderr[-2000:]
    pytest.importorskip("lm_eval")
    from bdiff.eval import evaluate
    from bdiff.lm_eval import BdiffLM, continuation_nelbo

    lm = BdiffLM(directory, mc_samples=2, seed=3, device="cpu")
    ids = lm.tokenizer.encode(TEXT)
    tokens = torch.tensor(ids)
    layout = document_layout(tokens, lm.cfg.bos_id, lm.cfg.block_size, first_offset=0, separator=lm.cfg.separator)
    reference = evaluate(lm.model, [(tokens, layout)], draws=2, seed=3, levels=())
    nelbo, _ = continuation_nelbo(lm.model, [([], ids)], 2, seed=3)
    torch.testing.assert_close(nelbo[0], torch.tensor(reference["draws"]) * len(ids), rtol=1e-5, atol=1e-4)
