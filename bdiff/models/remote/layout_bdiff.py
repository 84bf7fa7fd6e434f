"""The block-diffusion layout for transformers, shared by bdiff's remote model classes (modeling_bdiff.py, the nano
network; modeling_bdiff_adapted.py, an adapted causal LM): positions and blocks per document, the attention rules
over x_t ⊕ x_0 as a dense boolean mask, and the denoising of one block by their generate(). Needs torch only.

A document starts at every separator ("opens", the seed's layout) or after it ("closes"); a sequence that does not
open with a document's start counts its first fragment's positions from 1, as bdiff does. Query row i sees key row j
when both are in the same document and: noisy -> noisy, the same block; noisy -> clean, a strictly earlier block;
clean -> clean, the same or an earlier block; clean -> noisy, never.
"""
import torch


def layout(clean_ids, bos_id, block_size, separator, starts_document=False):
    """Per sequence of clean tokens (B, L): (document index, position inside the document, block inside it), (B, L)
    each. Documents start at each BOS ("opens") or after it ("closes"); the first fragment of a sequence that does not
    open a document counts its positions from 1 (bdiff's and the seed's rule), unless `starts_document` says the
    sequence's first token is a document's first (a prompt)."""
    L = clean_ids.shape[1]
    index = torch.arange(L, device=clean_ids.device).expand_as(clean_ids)
    starts = clean_ids == bos_id
    if separator == "closes":
        starts = torch.cat([torch.zeros_like(starts[:, :1]), starts[:, :-1]], 1)  # the token after a closing BOS
    starts[:, 0] = False
    doc = starts.cumsum(1)
    first = torch.where(starts, index, torch.zeros_like(index)).cummax(1).values  # the index of its document's start
    opens = ((clean_ids[:, :1] == bos_id) & (separator == "opens")) | starts_document
    offset = torch.where((doc == 0) & ~opens, 1, 0)  # the leading fragment: positions from 1
    positions = index - first + offset
    return doc, positions, positions // block_size


def block_diffusion_mask(doc, block):
    """(B, 1, 2L, 2L) bool: the attention rules over x_t ⊕ x_0 (module docstring)."""
    L = doc.shape[1]
    same_doc = (doc[:, :, None] == doc[:, None, :]).repeat(1, 2, 2)
    qb, kb = block.repeat(1, 2)[:, :, None], block.repeat(1, 2)[:, None, :]
    noisy = torch.arange(2 * L, device=doc.device) < L
    q_noisy, k_noisy = noisy[None, :, None], noisy[None, None, :]
    rule = torch.where(q_noisy, torch.where(k_noisy, kb == qb, kb < qb), ~k_noisy & (kb <= qb))
    return (rule & same_doc)[:, None]


def shift_rows(positions, block_size):
    """Token shift: which of the 2L rows predicts each of the L positions (B, L), and whether any does. Position i is
    predicted from the row of position i-1: the noisy row i-1 inside a block, the clean row L+i-1 at a block's first
    position; a document's first position (and the sequence's first) has none (its own row is given)."""
    L = positions.shape[1]
    index = torch.arange(L, device=positions.device).expand_as(positions)
    has_source = (positions > 0) & (index > 0)
    rows = torch.where(positions % block_size == 0, L + index - 1, index - 1)
    return torch.where(has_source, rows, index), has_source


def denoise_block(seq, start, logits_of, mask_id, steps_per_block, temperature=0.0, generator=None):
    """Denoise seq[0, start:] (1, L) in place, MASK where unknown, in `steps_per_block` steps: each step samples
    every position from `logits_of(seq)` (B, L, vocab) and reveals the most confident masked ones (greedy at
    temperature 0, else a draw), as many as finish the block by the last step; known tokens never change."""
    for step in range(steps_per_block):
        masked = seq[0, start:] == mask_id
        if not masked.any():
            break
        logits = logits_of(seq)[0, start:]
        logits[:, mask_id] = float("-inf")
        probs = (logits / (temperature or 1.0)).softmax(-1)
        sample = torch.multinomial(probs, 1, generator=generator)[:, 0] if temperature else probs.argmax(-1)
        confidence = probs.gather(-1, sample[:, None])[:, 0].masked_fill(~masked, -1.0)
        count = -(-int(masked.sum()) // (steps_per_block - step))
        reveal = masked & (confidence.argsort(descending=True).argsort() < count)
        seq[0, start:] = torch.where(reveal, sample, seq[0, start:])
