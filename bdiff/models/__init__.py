"""The model families: `nano` (the nano-block-diffusion network, trained from scratch) and, with transformers, `adapted`
(a Hugging Face causal LM turned into a block-diffusion model); `objective` (the layout, noise and weights both
share); `remote` (the code model directories carry for transformers)."""
