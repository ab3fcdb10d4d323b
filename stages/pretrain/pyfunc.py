"""The MLflow pyfunc wrapper of a pretrained model: prompt strings in, completions out.

Logged by the `pretrain` stage as a model from code (MLflow stores this file and runs
it to load the model, so the stage never imports it, nor MLflow when tracking is off),
with two artifacts, `model_dir` (model.safetensors + meta.json) and `tokenizer_dir`
(data/tokenizer/). It imports only what ships with it (outputs.SHIPPED): `model/`,
`pipeline/tokenizer.py` and `pipeline/model_dir.py`. Load it back and generate:

    import mlflow
    m = mlflow.pyfunc.load_model("models:/pcgpt-baseline@newest")
    m.predict(["ROMEO:"], params={"max_new_tokens": 32, "temperature": 0.8, "seed": 0})
    # -> ["ROMEO:<completion>"]
"""

from __future__ import annotations

import warnings

import mlflow.pyfunc
from mlflow.models import set_model

# predict() has no type hints on purpose (the signature below validates instead), so
# MLflow's suggestion to add them is noise in every stage log.
warnings.filterwarnings("ignore", message=r".*type hints to the `predict` method.*")

DEFAULT_PARAMS = {"max_new_tokens": 64, "temperature": 0.8, "top_k": 50, "seed": 0}


def signature():
    """Input: prompt strings (a list, or a one-column DataFrame); output: one string each
    (prompt + completion); params: DEFAULT_PARAMS, each overridable per call."""
    from mlflow.models import infer_signature

    return infer_signature(["ROMEO:"], ["ROMEO: ..."], params=DEFAULT_PARAMS)


class GPTGenerator(mlflow.pyfunc.PythonModel):
    """Loads model.safetensors + meta.json + the tokenizer; predict() returns prompt + completion."""

    def load_context(self, context) -> None:
        import torch

        from pipeline.model_dir import load_model
        from pipeline.tokenizer import load_tokenizer

        self.model, _ = load_model(context.artifacts["model_dir"])
        self.tokenizer = load_tokenizer(context.artifacts["tokenizer_dir"])
        torch.set_grad_enabled(False)

    def predict(self, context, model_input, params=None):  # no type hints: MLflow would
        # validate inputs against them; the signature() above does that instead
        import torch

        from model.generate import generate

        p = {**DEFAULT_PARAMS, **(params or {})}
        if hasattr(model_input, "columns"):  # a DataFrame: its first column
            prompts = [str(v) for v in model_input[model_input.columns[0]]]
        elif isinstance(model_input, str):
            prompts = [model_input]
        else:
            prompts = [str(v) for v in model_input]
        tok = self.tokenizer
        ids = [[tok.bos_id, *tok.encode(s)] for s in prompts]
        gen = torch.Generator().manual_seed(int(p["seed"]))
        out = generate(self.model, ids, int(p["max_new_tokens"]),
                       temperature=float(p["temperature"]), top_k=int(p["top_k"]) or None,
                       generator=gen)
        return [s + tok.decode(o) for s, o in zip(prompts, out)]


set_model(GPTGenerator())  # what MLflow loads from this file
