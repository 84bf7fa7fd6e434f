"""A causal LM adapted into a block-diffusion language model by bdiff (BD3-LM objective), for 🤗 transformers alone
(trust_remote_code): the base model's own class, its weights and config as they were (plus the mask token), with a
block-diffusion forward and generate. Its attention is the base model's SDPA under the block-diffusion mask.

    model = AutoModelForCausalLM.from_pretrained("user/name", trust_remote_code=True)
    ids = model.generate(prompt_ids, max_new_tokens=64)      # the prompt, then the new tokens, block by block
    logits = model(x_t, clean_ids=x_0).logits                # each position's prediction, as bdiff trains it

config.json's "bdiff" entry holds the block size, the document separator and whether the model predicts with a
token shift (position i from the row of position i-1, as the base model's next-token head does); "mask_token_id"
is MASK.
"""
import torch
from transformers import LlamaForCausalLM as Base  # bdiff: the base class
from transformers.modeling_outputs import MaskedLMOutput

from .layout_bdiff import block_diffusion_mask, denoise_block, layout, shift_rows


class BlockDiffusionForCausalLM(Base):
    """The base causal LM as bdiff trained it. `forward(input_ids, clean_ids)`: the prediction of every position of
    the noisy tokens x_t given the clean x_0; `generate(input_ids, max_new_tokens)`: block by block."""

    def forward(self, input_ids, clean_ids=None, starts_document=False, return_dict=True, **kwargs):
        """input_ids: x_t (B, L), MASK where noised; clean_ids: x_0 (B, L) (default: input_ids, as when a block is
        denoised on its clean context). Returns MaskedLMOutput with float32 logits (B, L, vocab): position i's
        prediction (with token shift, from the row of position i-1; zeros where a document's first position has no
        row to come from)."""
        bd = self.config.bdiff
        clean_ids = input_ids if clean_ids is None else clean_ids
        doc, positions, block = layout(clean_ids, bd["document_separator_id"], bd["block_size"], bd["separator"],
                                       starts_document)
        mask = block_diffusion_mask(doc, block)  # (B, 1, 2L, 2L): a 4-D mask reaches the attention as it is
        hidden = self.model(input_ids=torch.cat([input_ids, clean_ids], 1), position_ids=positions.repeat(1, 2),
                            attention_mask=mask, use_cache=False).last_hidden_state  # (B, 2L, dim)
        L = input_ids.shape[1]
        if bd["token_shift"]:
            rows, has_source = shift_rows(positions, bd["block_size"])
            logits = self.lm_head(hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1]))).float()
            logits = logits * has_source[..., None]
        else:
            logits = self.lm_head(hidden[:, :L]).float()
        return MaskedLMOutput(logits=logits) if return_dict else (logits,)

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens=64, steps_per_block=None, temperature=0.0, generator=None, **kwargs):
        """Continue the prompt `input_ids` (1, P), P >= 1 (a document's start), by up to `max_new_tokens`: each block
        starts as MASK and is denoised in `steps_per_block` steps (default: one token a step), each step revealing
        its most confident masked tokens (temperature 0) or a random draw of them; it stops after the document
        separator or an end-of-sequence token. Returns the prompt followed by the new ids (1, P + N), as
        transformers' generate does. Recomputes the context at every step (no KV cache: bdiff's sampler has one)."""
        bd = self.config.bdiff
        B, mask_id = bd["block_size"], self.config.mask_token_id
        steps_per_block = steps_per_block or B
        eos = self.config.eos_token_id
        stops = {bd["document_separator_id"], *(eos if isinstance(eos, list) else [eos] if eos is not None else [])}
        prompt = input_ids[:1]
        seq = prompt
        while seq.shape[1] - prompt.shape[1] < max_new_tokens:
            start = seq.shape[1] // B * B  # the prompt's last, partial block is completed first
            seq = torch.cat([seq, seq.new_full((1, start + B - seq.shape[1]), mask_id)], 1)
            denoise_block(seq, start, lambda s: self(s, starts_document=True).logits, mask_id, steps_per_block,
                          temperature, generator)
            new = seq[0, prompt.shape[1]:]
            ended = [i for i, t in enumerate(new.tolist()) if t in stops]
            if ended:
                return seq[:, :prompt.shape[1] + ended[0] + 1]
        return seq[:, :prompt.shape[1] + max_new_tokens]
