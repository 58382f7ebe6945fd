"""vlmfit: fine-tune vision-language models on your own data, on the hardware you have."""

__version__ = "0.1.0"

from vlmfit.errors import UserError  # noqa: E402

__all__ = ["UserError", "VisionChatCollator", "RunConfig", "train", "__version__"]


def __getattr__(name):
    # Lazy: importing vlmfit must not import torch/transformers (the CLI's --help stays fast).
    if name == "VisionChatCollator":
        from vlmfit.chat.collate import VisionChatCollator

        return VisionChatCollator
    if name == "RunConfig":
        from vlmfit.config import RunConfig

        return RunConfig
    if name == "train":  # the callable package: vlmfit.train(recipe, ...) is `vlmfit train` (train/api.py)
        import vlmfit.train

        return vlmfit.train
    raise AttributeError(name)
