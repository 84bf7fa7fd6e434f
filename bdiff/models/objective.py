"""The block-diffusion objective every model family shares (docs/design.md §1): the document layout and block noise
of one packed sequence, the loss weights, and `BlockDiffusionModel`, the loss over a family's trunk.

The layout depends on the tokens only, so the trainer builds it on the host from the loader's CPU tokens
(no device sync) and moves it to the device once per sequence; every layer then shares its attention
schedule.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields

import torch
import torch.nn as nn

from bdiff.config import ModelConfig
from bdiff.kernels.bd_attention import schedule_bounds, validate_cu_seqlens
from bdiff.kernels.reference import document_positions
from bdiff.ops import bd_attention, masked_linear_cross_entropy


@dataclass
class Layout:
    cu_seqlens: torch.Tensor  # (num_docs + 1,) int32 document boundaries over the L positions
    positions: torch.Tensor  # (L,) int64 position inside its document (rotary positions)
    blocks: torch.Tensor  # (L,) int64 global block id: unique per (document, block) pair
    schedule: torch.Tensor  # (2, 2L, 6) int32 attention range tables (kernels/bd_attention.py), one per sequence
    num_blocks: int  # blocks in the sequence: how many noise levels to draw

    def to(self, device, non_blocking: bool = False) -> Layout:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=non_blocking)
        return Layout(**moved)


SEPARATORS = ("opens", "closes")  # ModelConfig.separator: where the document separator (BOS) sits


def document_layout(tokens: torch.Tensor, bos_id: int, block_size: int, first_offset: int | None = None,
                    separator: str = "opens") -> Layout:
    """Where documents start, their positions and blocks. `separator` "opens" (the seed's layout): documents start
    at every BOS token, position 0 of its document, which by the attention rules cannot see the document before:
    no model learns where a document ends. "closes": the BOS closes the document it follows (it takes that
    document's next position and block, so the model learns to predict it, and sampling stops there); the next
    document starts with its first token at position 0.

    The sequence's first tokens continue a document that began earlier: `first_offset` is how many of its tokens
    the sequence does not hold. None applies the seed's rule (nano-block-diffusion, which the record is measured
    with): 1 for a sequence that does not open a document, as if a BOS stood just before it; 0 for one that starts
    with BOS under "opens" (under "closes" the token before the sequence, which would tell, is not seen: always
    1). A loader that knows the true offset may pass it. The fragment's positions count from the offset and its
    blocks follow the document's own block grid, clipped at the sequence start: with offset 1 its first block
    holds block_size - 1 tokens. cu_seqlens[0] = -first_offset.

    On the tokens' device; on a GPU this reads the document count back (a sync), so the trainer calls it on
    the loader's CPU tokens."""
    if separator not in SEPARATORS:
        raise ValueError(f"separator must be one of {SEPARATORS}, got {separator!r}")
    L = tokens.numel()
    opens_here = separator == "opens" and int(tokens[0]) == bos_id
    if first_offset is None:
        first_offset = 0 if opens_here else 1
    if first_offset < 0 or (first_offset > 0 and opens_here):
        raise ValueError(f"first_offset must be >= 0, and 0 for a sequence that starts with BOS, got {first_offset}")
    starts = torch.nonzero(tokens == bos_id).flatten() + (separator == "closes")  # the token after a closing BOS
    starts = starts[(starts > 0) & (starts < L)]
    cu_seqlens = torch.cat([starts.new_tensor([-first_offset]), starts, starts.new_tensor([L])]).to(torch.int32)
    if not tokens.is_cuda:
        validate_cu_seqlens(cu_seqlens, L)  # free on the host: the kernels trust the boundaries
    return bounds_layout(cu_seqlens, L, block_size)


def bounds_layout(cu_seqlens: torch.Tensor, L: int, block_size: int) -> Layout:
    """The layout of L positions cut into documents at `cu_seqlens` (int32, validated by the caller): positions
    restart in each document, blocks follow each document's own grid."""
    doc, positions = document_positions(cu_seqlens)  # (L,) each
    # Global block ids, 0, 1, ...: a new block wherever the document or the block inside it changes.
    block = positions // block_size
    change = (doc[1:] != doc[:-1]) | (block[1:] != block[:-1])
    blocks = torch.cat([doc.new_zeros(1), torch.cumsum(change, 0)])
    return Layout(cu_seqlens, positions, blocks, schedule_bounds(cu_seqlens, L, block_size), int(blocks[-1]) + 1)


def noise_blocks(tokens: torch.Tensor, blocks: torch.Tensor, mask_id: int, low: float, high: float,
                 generator: torch.Generator | None = None, num_blocks: int | None = None,
                 stratified: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One t ~ U[low, high] per block; each token masked independently with probability t. `num_blocks`
    (Layout.num_blocks) spares a device sync; by default it is read from `blocks`.

    stratified: the n blocks' levels are a low-discrepancy set instead of n independent draws: [low, high] is cut
    into n equal strata, one uniform draw in each, the strata shuffled over the blocks. Each block's t is still
    U[low, high], so the loss estimates the same objective, with less variance (BD3-LM's antithetic sampling).

    `generator` may be a CPU one whatever tokens' device: the draws are made on the CPU and moved.

    Returns x_t (L,), masked (L,) bool, t per token (L,) float32.
    """
    num_blocks = int(blocks.max()) + 1 if num_blocks is None else num_blocks
    device = tokens.device
    rng = device if generator is None else generator.device  # a CPU generator serves a GPU run (TrainConfig.cpu_rng)
    u = torch.rand(num_blocks, generator=generator, device=rng)  # (n,)
    if stratified:
        u = (torch.randperm(num_blocks, generator=generator, device=rng) + u) / num_blocks
    t_block = low + (high - low) * u.to(device)  # (n,)
    t = t_block[blocks]  # (L,)
    masked = torch.rand(tokens.shape, generator=generator, device=rng).to(device) < t
    x_t = torch.where(masked, torch.full_like(tokens, mask_id), tokens)
    return x_t, masked, t


def loss_weights(masked: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-token loss weight: 1/(t + 1e-3) on masked tokens, 0 elsewhere (BD3-LM's NELBO weight)."""
    return masked.float() / (t + 1e-3)


def noise_seed(seed: int, rank: int = 0, *, validation: bool = False, draw: int = 0, step: int = 0) -> int:
    """The seed of a noise stream, in one place: rank r of a run trains on seed·1000 + 1 + r (plus 7919·step when
    a resume on another number of ranks starts fresh streams at `step`); validation draws from seed·1000 + 999 + r,
    and bdiff.eval's draw k from seed·1000 + 999 + k, so its draw 0 is a one-process run's own validation loss."""
    if validation:
        return seed * 1000 + 999 + rank + draw
    return seed * 1000 + 1 + rank + 7919 * step


def shift_rows(positions: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token shift (ModelConfig.token_shift): which of the 2L rows x_t ⊕ x_0 predicts each of the L positions, and
    whether any does. Position i is predicted from the row of position i-1: the noisy row i-1 inside a block (it
    sees the block's noisy tokens and the clean blocks before), the clean row L+i-1 at a block's first position (the
    clean context, as an autoregressive model sees it; sampling reads that row from the block before's clean pass).
    A document's first position, and the sequence's first (the row before it is not in the sequence), have none.
    Returns rows (L,) int64 (a row's own index where it has none) and has_source (L,) bool."""
    L = positions.numel()
    index = torch.arange(L, device=positions.device)
    has_source = (positions > 0) & (index > 0)
    rows = torch.where(positions % block_size == 0, L + index - 1, index - 1)
    return torch.where(has_source, rows, index), has_source


class BlockDiffusionModel(nn.Module):
    """The block-diffusion loss of one packed sequence over a trunk: what the model families share. A family
    (bdiff/models/nano.py, bdiff/models/adapted.py) gives `cfg` (ModelConfig), `run_layers(tokens, positions, attend,
    out_rows=None)` (the trunk on rows of any leading shape -> final hidden states; `attend(layer, q, k, v, scale)`
    decides which rows see which), `head` (the lm_head weight, (>= cfg.vocab_size, dim)), `dtype` and `set_dtype` (the
    activations'), and `optimizer_groups`. The rest is here: noise, layout, token shift, complementary masks, the
    fused loss, block-diffusion attention over x_t ⊕ x_0, logits, and the one loader and writer of model
    directories (bdiff.hub)."""

    cfg: ModelConfig
    run_config: dict | None = None  # the run's config (Config.to_dict()) where the model came from a run or a file

    def hidden_states(self, tokens_2l: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor,
                      schedule: torch.Tensor | None = None, out_rows: int | None = None) -> torch.Tensor:
        """Final hidden states (2L, dim) of the x_t ⊕ x_0 rows, or of the first `out_rows` rows, under block-diffusion
        attention. `schedule`: the attention range tables of the layout, shared by every layer (built from
        cu_seqlens when not given)."""
        block_size = self.cfg.block_size
        if schedule is None:  # once for every layer
            schedule = schedule_bounds(cu_seqlens, tokens_2l.numel() // 2, block_size)

        def attend(layer, q, k, v, scale=None):
            return bd_attention(q, k, v, cu_seqlens, block_size, scale, schedule)

        return self.run_layers(tokens_2l, torch.cat([positions, positions]), attend, out_rows)

    def predicting_states(self, tokens_2l: torch.Tensor, positions: torch.Tensor, cu_seqlens: torch.Tensor,
                          schedule: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The final state that predicts each of the L positions, (L, dim), and which positions have one ((L,) bool,
        or None: all of them). Without token shift: the noisy rows themselves, and only those are computed in the
        last layer; with it: `shift_rows` of all 2L rows."""
        L = positions.numel()
        if not self.cfg.token_shift:
            return self.hidden_states(tokens_2l, positions, cu_seqlens, schedule, out_rows=L), None
        rows, has_source = shift_rows(positions, self.cfg.block_size)
        return self.hidden_states(tokens_2l, positions, cu_seqlens, schedule)[rows], has_source

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits over the vocabulary (padding rows of the head dropped)."""
        return (hidden @ self.head[:self.cfg.vocab_size].to(hidden.dtype).T).float()

    def forward(self, tokens: torch.Tensor, *, noise_range: tuple[float, float],
                generator: torch.Generator | None = None, layout: Layout | None = None, stratified: bool = False,
                complementary: bool = False, answers: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted block-diffusion loss of one packed sequence `tokens` (L,): a scalar. `noise_range`: each block's
        t ~ U[low, high] (training: TrainConfig.noise_low/high; the record's validation: (0, 1)).

        `layout`: document_layout(tokens) on tokens' device, built by the caller where it is free (the trainer
        builds it from the loader's CPU tokens); computed here otherwise. Noise is drawn here, eagerly, from
        `generator` (`stratified`: the blocks' levels as one low-discrepancy set, noise_blocks); the rest is
        `objective`, which `compile_objective` compiles. `complementary`: the mean of the loss under the mask and
        under its complement (every other token masked, each block at level 1 - t): every token carries loss once.
        `answers` (L,) bool (conversations, bdiff/data/chat.py): only those tokens are noised and carry loss (the
        prompt stays clean), and the loss is normalised over them instead of over L."""
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be one packed sequence of shape (L,), got {tuple(tokens.shape)}")
        cfg = self.cfg
        layout = document_layout(tokens, cfg.bos_id, cfg.block_size, separator=cfg.separator) if layout is None \
            else layout
        x_t, masked, t = noise_blocks(tokens, layout.blocks, cfg.mask_id, *noise_range, generator=generator,
                                      num_blocks=layout.num_blocks, stratified=stratified)
        answers = torch.ones_like(masked) if answers is None else answers
        masked = masked & answers  # the prompt is never noised
        mask = torch.full_like(tokens, cfg.mask_id)
        x_t = torch.where(masked, mask, tokens)
        # The document count changes every sequence: one compiled graph serves them all.
        torch._dynamo.maybe_mark_dynamic(layout.cu_seqlens, 0)
        loss = self.objective(x_t, tokens, loss_weights(masked, t), layout.positions, layout.cu_seqlens,
                              layout.schedule)
        if complementary:
            hidden = answers & ~masked  # the other answer tokens
            loss = (loss + self.objective(torch.where(hidden, mask, tokens), tokens, loss_weights(hidden, 1 - t),
                                          layout.positions, layout.cu_seqlens, layout.schedule)) / 2
        # objective divides by L; conversations count their answer tokens instead (no host sync: a tensor)
        return loss * (tokens.numel() / answers.sum().clamp_min(1))

    def objective(self, x_t: torch.Tensor, tokens: torch.Tensor, weights: torch.Tensor, positions: torch.Tensor,
                  cu_seqlens: torch.Tensor, schedule: torch.Tensor) -> torch.Tensor:
        """sum_i weights_i · CE(logits predicting position i, tokens_i) / L over x_t ⊕ x_0; all shapes fixed by L."""
        L = tokens.numel()
        h, has_source = self.predicting_states(torch.cat([x_t, tokens]), positions, cu_seqlens, schedule)
        weights = weights if has_source is None else weights * has_source
        return masked_linear_cross_entropy(h, self.head, tokens, weights, self.cfg.vocab_size) / L

    def compile_objective(self, **options) -> None:
        """Compile `objective` as one graph (fullgraph: a graph break is an error, not a silent slowdown).
        The three ops are opaque operators inside it; noise drawing and the layout stay eager."""
        self.objective = torch.compile(self.objective, fullgraph=True, **options)

    # ---- sharing: huggingface_hub's mixin convention, over bdiff.hub's one loader and one writer ----------------

    @classmethod
    def from_pretrained(cls, name: str, device="cpu") -> BlockDiffusionModel:
        """A model of either family (in eval mode) from a model directory, a run directory, a final.pt or a Hub id
        (user/name, through huggingface_hub's cache): the loader of every command (bdiff.models.from_pretrained).
        Its config dict ("model", "train", "dataset") is `model.run_config`."""
        from bdiff.models import from_pretrained

        return from_pretrained(name, device)

    def save_pretrained(self, directory: str, config: dict | None = None) -> str:
        """Write a model directory (bdiff.hub.save_pretrained: weights, config.json, the transformers code, the
        tokenizer where it is a file, a card). `config`: the run's config dict; by default the one it was loaded or
        trained with, else its model config alone. Returns the directory."""
        from bdiff import hub

        config = config or self.run_config or {"model": dataclasses.asdict(self.cfg), "train": {}, "dataset": {}}
        return hub.save_pretrained(self, directory, config, config.get("step"), config.get("tokens"),
                                   config.get("val_loss"))

    def push_to_hub(self, repo_id: str, private: bool = False, token: str | None = None,
                    config: dict | None = None) -> str:
        """Save the model (save_pretrained) and upload it to the Hub repository `repo_id` (bdiff.hub.push: created if
        needed; the token from `token`, HF_TOKEN or `hf auth login`). Returns the repository's URL."""
        import tempfile

        from bdiff import hub

        with tempfile.TemporaryDirectory() as directory:
            return hub.push(self.save_pretrained(directory, config), repo_id, private=private, token=token)
