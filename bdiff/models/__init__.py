"""The model families: `nano` (the nano-block-diffusion network, trained from scratch) and, with transformers, `adapted`
(a Hugging Face causal LM turned into a block-diffusion model); `objective` (the layout, noise and weights both
share); `remote` (the code model directories carry for transformers)."""


def from_pretrained(name: str, device="cpu"):
    """The model (in eval mode) of whatever a user names, of either family: a model directory, a run directory, a
    final.pt or a Hub id (user/name, through huggingface_hub's cache). The loader of every command; its config dict
    ("model", "train", "dataset") is `model.run_config`. Weights that are not their config's model are refused in
    one line (bdiff.hub.HubError)."""
    from bdiff.config import ModelConfig
    from bdiff.hub import HubError, read_pretrained

    weights, config, where = read_pretrained(name)
    try:
        if config["model"].get("init"):
            from bdiff.models.adapted import AdaptedLM

            if weights is None:  # a model directory: transformers reads the weights
                model = AdaptedLM.from_directory(where, config)
            else:
                model = AdaptedLM.from_config(config, config.get("hf") or {})
        else:
            from bdiff.models.nano import BlockDiffusionLM

            model = BlockDiffusionLM(ModelConfig(**config["model"]))
    except (TypeError, ValueError) as e:
        raise HubError(f"{where}: not a valid model config ({str(e).splitlines()[0]})") from None
    if weights is not None:
        load_weights(model, weights, where)
    model.run_config = config
    return model.to(device).eval()


def load_weights(model, weights: dict, where: str) -> None:
    """`weights` into `model`, refused in one line where they are not its weights."""
    from bdiff.hub import HubError

    expected = set(model.state_dict())
    if set(weights) != expected:
        missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise HubError(f"{where}: not this model's weights (missing {missing[:3]}{'...' if len(missing) > 3 else ''}"
                       f", unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''})")
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise HubError(f"{where}: weights do not match the config ({' '.join(str(e).split())[:300]})") from None
