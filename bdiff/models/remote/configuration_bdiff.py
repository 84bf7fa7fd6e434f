"""The configuration of a bdiff block-diffusion language model for 🤗 transformers (trust_remote_code). It reads the
config.json that bdiff writes: the network is its "model" entry (bdiff's ModelConfig); the rest (training config,
data set, validation loss) stays on the object as read."""
from transformers import PretrainedConfig


class BdiffConfig(PretrainedConfig):
    model_type = "bdiff"

    def __init__(self, model: dict | None = None, **kwargs):
        self.model = dict(model or {})  # bdiff's ModelConfig: vocab_size, mask_id, bos_id, num_layers, model_dim, ...
        for name in ("vocab_size", "mask_id", "bos_id", "num_layers", "model_dim", "num_heads", "head_dim",
                     "mlp_ratio", "block_size", "lm_head_multiple", "separator"):
            kwargs.pop(name, None)  # the model entry is the one source of these
        super().__init__(**kwargs)

    def __getattr__(self, name):  # config.num_layers and the like, from the model entry
        model = self.__dict__.get("model") or {}
        if name in model:
            return model[name]
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
