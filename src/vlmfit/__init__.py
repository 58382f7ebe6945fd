"""vlmfit: fine-tune vision-language models on your own data, on the hardware you have.

The Python API is the CLI's own code path (the CLI prints what these return; the same checks, refusals and
messages, a UserError for anything the user can fix):

    vlmfit.prepare(source, task=...)       -> (report, directory)        `vlmfit prepare`
    vlmfit.plan(recipe or model=..., gpu=) -> memory Breakdown            `vlmfit plan`
    vlmfit.train(recipe, overrides)        -> run directory               `vlmfit train`
    vlmfit.evaluate(target, overrides)     -> results                     `vlmfit eval`
    vlmfit.predict(target, images or data=)-> answers                     `vlmfit predict`
    vlmfit.export(run_dir, out, merge=)    -> Exported                    `vlmfit export`

Importing vlmfit imports neither torch nor transformers: each is loaded when first used.
"""

__version__ = "0.1.0"

from vlmfit.errors import UserError  # noqa: E402

__all__ = ["UserError", "VisionChatCollator", "RunConfig", "load_config", "train", "evaluate", "predict", "export",
           "plan", "prepare", "__version__"]


def __getattr__(name):
    # Lazy: importing vlmfit must not import torch/transformers (the CLI's --help stays fast).
    if name == "VisionChatCollator":
        from vlmfit.chat.collate import VisionChatCollator

        return VisionChatCollator
    if name in ("RunConfig", "load_config"):
        import vlmfit.config as config

        return getattr(config, name)
    if name in ("train", "evaluate", "export"):  # callable modules: vlmfit.train(...) is `vlmfit train`, and so on
        import importlib

        return importlib.import_module(f"vlmfit.{name}")
    if name == "predict":
        from vlmfit.evaluate.api import predict

        return predict
    if name == "plan":
        from vlmfit.memory.plan import plan

        return plan
    if name == "prepare":
        from vlmfit.data.prepare import prepare_source

        return prepare_source
    raise AttributeError(name)
