"""bdiff models for 🤗 transformers, copied into every model directory (bdiff/hub.py) so that transformers and PyTorch
alone load them (trust_remote_code). bdiff itself never imports them (transformers is an optional extra).
- The nano network: `configuration_bdiff.py` and `modeling_bdiff.py`, which config.json's auto_map names for
  AutoConfig and AutoModelForMaskedLM.
- A model adapted from a causal LM (bdiff/models/adapted.py): `modeling_bdiff_adapted.py`, a subclass of the base
  model's own class (its import rewritten per model), which config.json's auto_map names for AutoModelForCausalLM.
- Both: `layout_bdiff.py`, the layout and the block-diffusion mask, imported by the modeling files."""
import os

LAYOUT = "layout_bdiff.py"
REMOTE_CODE = ("configuration_bdiff.py", "modeling_bdiff.py", LAYOUT)  # the files a nano model directory carries
AUTO_MAP = {"AutoConfig": "configuration_bdiff.BdiffConfig", "AutoModelForMaskedLM": "modeling_bdiff.BdiffForMaskedLM"}
DIRECTORY = os.path.dirname(os.path.abspath(__file__))
