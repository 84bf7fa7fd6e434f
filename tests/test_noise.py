"""Document layout, block ids and block noising of one packed sequence (bdiff/models/objective.py), against the seed's
position rule written out (helpers.seed_positions) and the definition of the noise: one t per block, each token
masked with probability t; and the noise seeds, each stream in one place."""
import pytest
import torch

from bdiff.models.objective import document_layout, noise_blocks, noise_seed
from helpers import BOS, MASK, random_tokens, seed_positions


def test_document_layout(gen):
    tokens = random_tokens(gen, 100, [10, 11, 60])  # a document of length 1 at position 10
    layout = document_layout(tokens, BOS, block_size=16, first_offset=0)
    assert layout.cu_seqlens.tolist() == [0, 10, 11, 60, 100]
    assert layout.positions[[0, 10, 11, 27, 60, 99]].tolist() == [0, 0, 0, 16, 0, 39], "positions restart at BOS"
    starts = [0, 10, 11, 27, 43, 59, 60, 76, 92]  # where a new block begins
    changes = (layout.blocks[1:] != layout.blocks[:-1]).nonzero().flatten() + 1
    assert [0] + changes.tolist() == starts, "blocks must restart at documents and never straddle one"
    assert layout.blocks.unique().numel() == len(starts), "block ids must be unique per (document, block)"


def test_mid_document_layout_follows_the_seed():
    """Worked example, block size 4: 6 tokens of a document that began one token earlier, then a BOS."""
    tokens = torch.tensor([7, 7, 7, 7, 7, 7, BOS, 7, 7, 7, 7, 7])
    layout = document_layout(tokens, BOS, block_size=4)
    assert layout.cu_seqlens.tolist() == [-1, 6, 12], "cu_seqlens[0] = -1: one token of the document is unseen"
    assert layout.positions.tolist() == [1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 5] == seed_positions(tokens.tolist())
    assert layout.blocks.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3], \
        "the fragment's first block holds block_size - 1 tokens, every later block is shifted by one"


def test_layout_of_a_sequence_starting_with_bos_is_unchanged(gen):
    tokens = random_tokens(gen, 100, [0, 37])
    layout = document_layout(tokens, BOS, block_size=16)
    assert layout.cu_seqlens.tolist() == [0, 37, 100]
    assert layout.positions.tolist() == list(range(37)) + list(range(63)) == seed_positions(tokens.tolist())
    with pytest.raises(ValueError, match="first_offset"):
        document_layout(tokens, BOS, block_size=16, first_offset=3)


def test_noise_blocks(gen):
    tokens = random_tokens(gen, 4096, [0, 1000, 2500])
    layout = document_layout(tokens, BOS, block_size=16)
    x_t, masked, t = noise_blocks(tokens, layout.blocks, MASK, 0.3, 0.8, generator=gen)
    assert ((t >= 0.3) & (t <= 0.8)).all(), "t must lie in the noise range"
    for b in layout.blocks.unique():
        assert t[layout.blocks == b].unique().numel() == 1, "one t per block"
    assert torch.equal(x_t[masked], torch.full_like(x_t[masked], MASK)), "masked tokens become MASK"
    assert torch.equal(x_t[~masked], tokens[~masked]), "unmasked tokens stay"
    # 4096 Bernoulli draws: the masked fraction is within 4.5 standard deviations of the mean of t.
    assert abs(masked.float().mean() - t.mean()) < 4.5 * 0.5 / 4096**0.5


def test_stratified_levels_cover_every_stratum_once(gen):
    tokens = random_tokens(gen, 4096, [0, 1000, 2500])
    layout = document_layout(tokens, BOS, block_size=16)
    _, _, t = noise_blocks(tokens, layout.blocks, MASK, 0.3, 0.8, generator=gen, num_blocks=layout.num_blocks,
                           stratified=True)
    levels = torch.zeros(layout.num_blocks).scatter(0, layout.blocks, t)  # (n,) each block's level
    strata = ((levels - 0.3) / 0.5 * layout.num_blocks).floor().long()
    assert sorted(strata.tolist()) == list(range(layout.num_blocks)), "one block in each of n equal strata"


@pytest.mark.usefixtures("reference_ops")
def test_stratified_noise_estimates_the_same_objective(gen):
    """The mean loss over many noise draws at fixed weights is the same, iid or stratified (within 4.5 standard
    errors of the difference, measured from the draws themselves)."""
    from bdiff.config import tiny
    from bdiff.models.nano import BlockDiffusionLM

    model = BlockDiffusionLM(tiny().model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)  # random weights everywhere, the head too
    tokens = random_tokens(gen, 256, [0, 90, 200])
    stats = {}
    with torch.no_grad():
        for stratified in (False, True):
            losses = torch.tensor([float(model(tokens, noise_range=(0.3, 0.8), generator=gen, stratified=stratified))
                                   for _ in range(300)])
            stats[stratified] = (losses.mean(), losses.var() / len(losses))
    difference, variance = stats[True][0] - stats[False][0], stats[True][1] + stats[False][1]
    assert abs(difference) < 4.5 * variance.sqrt(), f"means differ by {difference:.4f} ({variance.sqrt():.4f} s.e.)"


def test_noise_seeds_are_the_runs_and_evals():
    """Training streams per rank, validation per rank, eval's draws: distinct, and eval's draw 0 is validation's
    rank 0 (so bdiff.eval's first draw reproduces a one-process run's own validation loss)."""
    seeds = [noise_seed(3, r) for r in range(8)] + [noise_seed(3, r, validation=True) for r in range(8)]
    assert len(set(seeds)) == len(seeds), "every stream has its own seed"
    assert noise_seed(3, 0, validation=True, draw=0) == noise_seed(3, 0, validation=True)
    assert noise_seed(3, 1, step=10) != noise_seed(3, 1), "a resume on other ranks starts fresh streams"


def test_a_closing_separator_ends_its_document():
    """Block size 4, the separator closing documents: it takes its document's next position and block, and the
    next document starts at position 0 with its first token (the fragment before any separator counts from 1)."""
    tokens = torch.tensor([7, 7, 7, BOS, 7, 7, 7, 7, 7, BOS, 7, 7])
    layout = document_layout(tokens, BOS, block_size=4, separator="closes")
    assert layout.cu_seqlens.tolist() == [-1, 4, 10, 12], "documents start right after each separator"
    assert layout.positions.tolist() == [1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1]
    assert layout.blocks.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 3, 3, 4, 4], "the separator is its document's last token"
    with pytest.raises(ValueError, match="separator"):
        document_layout(tokens, BOS, block_size=4, separator="between")
