"""A CLIP classifier with a tunable prompt (the CoOp setting): learnable context vectors in front of the class names
in the text encoder, optionally reached through a fixed random projection from a low intrinsic dimension. Image
features are computed once; a whole population of prompts is scored in one text-encoder forward. Forward-only
training tunes it (train/zo_targets.py) and `vlmfit eval` scores a run's saved prompt with it."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vlmfit.errors import UserError


class ClipPrompt:
    """Tuned parameters `params` (one tensor: w in R^intrinsic_dim, or the context vectors themselves) and their
    loss on cached image features; `batches` / `loss` / `population_losses` / `accuracy` are what train/zo.py uses."""

    kind, label_method = "prompt", "class prompts (CLIP contrastive logits)"

    def __init__(self, model, processor, class_names: list[str], ctx_init: str, intrinsic_dim: int | None,
                 sigma: float = 0.4, seed: int = 0, n_ctx: int | None = None):
        self.model, self.processor, self.class_names = model.eval(), processor, list(class_names)
        self.ctx_init = ctx_init
        for p in model.parameters():
            p.requires_grad_(False)
        self.device = next(model.parameters()).device
        tok = processor.tokenizer
        extra = (n_ctx or 0) - len(tok(ctx_init, add_special_tokens=False)["input_ids"])
        if extra > 0:
            ctx_init = " ".join(["X"] * extra + [ctx_init])
        self.ctx_init = ctx_init
        prompts = [f"{ctx_init} {name}." for name in self.class_names]
        ids = tok(prompts, padding=True, return_tensors="pt")["input_ids"].to(self.device)
        init = tok(ctx_init, add_special_tokens=False)["input_ids"]
        n = len(init)
        start = _find(ids[0].tolist(), init)
        if start is None or any(_find(row.tolist(), init) != start for row in ids):
            raise UserError(f"could not find the context words '{ctx_init}' at the same place in every class prompt",
                            where="zo.ctx_init", hint="use plain words the tokenizer keeps apart from the class names")
        text = model.text_model
        with torch.no_grad():
            emb = text.embeddings.token_embedding(ids)
        self.prefix, self.suffix = emb[:, :start], emb[:, start + n:]
        self.ctx0 = emb[0, start:start + n].clone()  # [n_ctx, d]
        # Pool where CLIPTextModel pools: the first EOS token, or the highest id for old configs (eos_token_id 2).
        eos = text.config.eos_token_id
        self.pool = ids.argmax(-1) if eos == 2 else (ids == eos).int().argmax(-1)
        self.n_ctx, self.ctx_dim = n, emb.shape[-1]
        self.intrinsic_dim = intrinsic_dim
        if intrinsic_dim:
            g = torch.Generator().manual_seed(seed)
            # Scale A so that a CMA-ES sample (entries ~ sigma) moves the context by about its own spread.
            std = float(self.ctx0.std()) / (sigma * intrinsic_dim ** 0.5)
            self.A = (torch.randn(n * self.ctx_dim, intrinsic_dim, generator=g) * std).to(self.device)
            self.params = [torch.zeros(intrinsic_dim, device=self.device)]
        else:
            self.A = None
            self.params = [self.ctx0.clone()]
        self.features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- parameters ---------------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.params[0].numel()

    def flat(self) -> np.ndarray:
        return self.params[0].detach().cpu().double().numpy().copy()

    def set_flat(self, x) -> None:
        self.params[0].copy_(torch.as_tensor(np.asarray(x), dtype=self.params[0].dtype))

    def context(self, theta: torch.Tensor) -> torch.Tensor:
        """[P, D] tuned vectors -> [P, n_ctx, d] context vectors."""
        if self.A is None:
            return theta.view(-1, self.n_ctx, self.ctx_dim)
        return self.ctx0 + (theta @ self.A.T).view(-1, self.n_ctx, self.ctx_dim)

    # ---- features -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def cache_images(self, split: str, images: list, labels: list[int], batch_size: int = 256) -> None:
        """Image features of a split, computed once (the image tower never runs again)."""
        feats = []
        for i in range(0, len(images), batch_size):
            px = self.processor(images=images[i:i + batch_size], return_tensors="pt")["pixel_values"].to(self.device)
            feats.append(F.normalize(self.model.get_image_features(pixel_values=px).pooler_output.float(), dim=-1))
        self.features[split] = (torch.cat(feats), torch.tensor(labels, device=self.device))

    def text_features(self, ctx: torch.Tensor) -> torch.Tensor:
        """[P, n_ctx, d] contexts -> [P, classes, e] normalised class embeddings, all P in one forward.

        CLIPTextModel.forward takes only token ids, so its public submodules run here in the same order
        (embeddings + positions, causal encoder, final norm, EOS pooling, projection); a test checks that the
        initial context gives exactly get_text_features of the tokenized prompts."""
        P, C = ctx.shape[0], len(self.class_names)
        embeds = torch.cat([self.prefix.expand(P, -1, -1, -1), ctx[:, None].expand(-1, C, -1, -1),
                            self.suffix.expand(P, -1, -1, -1)], dim=2).flatten(0, 1)
        from transformers.masking_utils import create_causal_mask

        text = self.model.text_model
        hidden = text.embeddings(inputs_embeds=embeds)
        mask = create_causal_mask(config=text.config, inputs_embeds=hidden, attention_mask=None, cache=None)
        hidden = text.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
        hidden = text.final_layer_norm(hidden)
        pooled = hidden[torch.arange(P * C, device=hidden.device), self.pool.repeat(P)]
        return F.normalize(self.model.text_projection(pooled).float(), dim=-1).view(P, C, -1)

    def logits(self, theta: torch.Tensor, split: str, index=None) -> torch.Tensor:
        """[P, N, classes] logits of P parameter settings on the cached images of `split`."""
        img = self.features[split][0] if index is None else self.features[split][0][index]
        scale = self.model.logit_scale.exp().float()
        return scale * torch.einsum("pce,ne->pnc", self.text_features(self.context(theta)), img)

    # ---- objective ----------------------------------------------------------------------------------------------
    def losses(self, thetas: torch.Tensor, index=None) -> torch.Tensor:
        """Cross-entropy on the training images (`index`: a minibatch) for each row of `thetas` [P, D]."""
        labels = self.features["train"][1] if index is None else self.features["train"][1][index]
        logits = self.logits(thetas, "train", index)
        return F.cross_entropy(logits.flatten(0, 1), labels.repeat(thetas.shape[0]), reduction="none").view(thetas.shape[0], -1).mean(-1)

    def loss(self, index=None) -> float:
        return float(self.losses(self.params[0][None], index)[0])

    def population_losses(self, X, index=None, chunk: int | None = None) -> np.ndarray:
        thetas = torch.as_tensor(np.asarray(X), dtype=self.params[0].dtype, device=self.device)
        step = chunk or len(thetas)
        return torch.cat([self.losses(thetas[i:i + step], index) for i in range(0, len(thetas), step)]).double().cpu().numpy()

    def batches(self, batch_size: int, seed: int):
        """Index minibatches of the training images (None = all of them, when batch_size covers the set)."""
        n = len(self.features["train"][1])
        if batch_size >= n:
            while True:
                yield None
        g = torch.Generator().manual_seed(seed)
        while True:
            perm = torch.randperm(n, generator=g)
            for i in range(0, n - batch_size + 1, batch_size):
                yield perm[i:i + batch_size].to(self.device)

    @property
    def n_train(self) -> int:
        return len(self.features["train"][1])

    @property
    def n_test(self) -> int:
        return len(self.features["test"][1])

    @property
    def total_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters()) + self.dim

    def evaluate(self) -> dict:
        return {"n": self.n_test, "labels": self.class_names, "constrained": {"accuracy": self.accuracy()}}

    def info(self) -> dict:
        """How to use the saved context vectors (the run directory's prompt.json)."""
        return {"context_tokens": self.n_ctx, "initialised_from": self.ctx_init, "class_names": self.class_names,
                "prompt": "[context vectors] {class}.", "tensor": "context [n_ctx, hidden] replaces the init words' embeddings"}

    def set_context(self, ctx: torch.Tensor) -> None:
        """Use these context vectors [n_ctx, hidden] as they are (a saved prompt): no projection any more."""
        self.A, self.params = None, [ctx.to(self.device)]

    @torch.no_grad()
    def accuracy(self, split: str = "test", theta: torch.Tensor | None = None) -> float:
        theta = self.params[0] if theta is None else theta
        pred = self.logits(theta[None], split)[0].argmax(-1)
        return float((pred == self.features[split][1]).float().mean())

    def context_vectors(self) -> torch.Tensor:
        return self.context(self.params[0][None])[0].detach()


def _find(seq: list[int], sub: list[int]) -> int | None:
    for i in range(len(seq) - len(sub) + 1):
        if seq[i:i + len(sub)] == sub:
            return i
    return None
