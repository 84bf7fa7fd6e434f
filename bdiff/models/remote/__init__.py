"""bdiff models for 🤗 transformers: `configuration_bdiff.py` and `modeling_bdiff.py` are copied into every model
directory (bdiff/hub.py), whose config.json maps AutoConfig and AutoModelForMaskedLM to them, so that
`AutoModelForMaskedLM.from_pretrained(dir_or_hub_id, trust_remote_code=True)` loads a bdiff model with transformers
and PyTorch alone. bdiff itself never imports them (transformers is an optional extra)."""
import os

REMOTE_CODE = ("configuration_bdiff.py", "modeling_bdiff.py")  # the files a model directory carries
AUTO_MAP = {"AutoConfig": "configuration_bdiff.BdiffConfig", "AutoModelForMaskedLM": "modeling_bdiff.BdiffForMaskedLM"}
DIRECTORY = os.path.dirname(os.path.abspath(__file__))
