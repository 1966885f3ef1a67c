"""Hugging Face text towers (``hf:<dir>``): the encoder, its tokenisation, its export.

The tower is ``AutoModel.from_pretrained(dir)`` followed by a pooling of its last
hidden states (``model.pooling``: the mean under the attention mask, or the first
token) and, with ``model.projection=linear``, a linear layer to
``model.embedding_dim``. The tokenizer (``AutoTokenizer.from_pretrained(dir)``) runs in
the DataLoader workers and gives each text its ``input_ids`` and ``attention_mask``,
padded to ``model.max_length``: the view is a dict of tensors, passed to the tower as
keyword arguments (also through :func:`dist_infonce.cached_backward`).

The export is the library's own format twice over: ``save_pretrained`` of the model
and the tokenizer (``AutoModel.from_pretrained(out)``), and the sentence-transformers
modules on top (Pooling, Dense for the projection, Normalize when the loss normalises),
so that ``SentenceTransformer(out)`` gives the embeddings the trainer's evaluation uses.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_infonce.trainer.config import ConfigError
from dist_infonce.trainer.transforms import BadSample
from dist_infonce.trainer.zoo import ZooTower, require

__all__ = ["HFTextTower", "HFTokenize", "load_tokenizer"]

#: What the tokenizer gives each text (and the tower takes as keyword arguments).
KEYS = ("input_ids", "attention_mask")


def _check_dir(path: str, key: str) -> None:
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(
            f"{key}: hf:{path} is not a Hugging Face model directory (no config.json there; "
            "write one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir))"
        )


def load_tokenizer(path: str, key: str) -> Any:
    """``AutoTokenizer.from_pretrained(path)``, checked to pad.

    Raises:
        ConfigError: no tokenizer there, or one without a padding token.
    """
    transformers = require("transformers", key)
    _check_dir(path, key)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}: hf:{path}: cannot load its tokenizer: {e}") from None
    if tokenizer.pad_token is None:
        raise ConfigError(
            f"{key}: hf:{path}: the tokenizer has no padding token; set one "
            "(tokenizer.pad_token = ...) and save it again"
        )
    return tokenizer


class HFTokenize:
    """Text -> ``{"input_ids": (L,), "attention_mask": (L,)}`` (int64) by the tower's
    tokenizer, padded and cut to ``max_length`` tokens.

    Picklable for DataLoader workers: the tokenizer is loaded once per process, on first use.

    Args:
        path: the model directory.
        max_length: L (``model.max_length``).
        key: the config key named in errors.
    """

    keys = KEYS

    def __init__(self, path: str, *, max_length: int, key: str = "model.name") -> None:
        self.path, self.max_length, self.key = path, max_length, key
        self.shape = (max_length,)
        self.dtype = torch.int64
        self._tokenizer: Any = load_tokenizer(path, key)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokenizer": None}

    def __call__(self, value: Any) -> dict[str, torch.Tensor]:
        if not isinstance(value, str):
            raise BadSample(f"expected text, got {type(value).__name__}")
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.path, self.key)
        enc = self._tokenizer(
            value,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {k: enc[k][0].to(torch.int64) for k in KEYS}


class HFTextTower(ZooTower):
    """A Hugging Face encoder, pooled (and projected): one text view's tower.

    Args:
        path: the model directory (``AutoModel.from_pretrained``).
        key: the config key named in errors.
        pooling: ``mean`` (over the attention mask) or ``cls`` (the first token).
        out_dim: the projection's width (``model.embedding_dim``), or None: no projection.
        max_length: tokens per text (recorded for the sentence-transformers export).
        grad_checkpointing: ``gradient_checkpointing_enable`` (non-reentrant).

    Shape:
        input_ids, attention_mask: (B, L) int64. Output: (B, out_dim or hidden size).

    Raises:
        ConfigError: not a model directory, or one ``AutoModel`` cannot load.
    """

    takes_dict = True

    def __init__(
        self,
        path: str,
        *,
        key: str,
        pooling: str,
        out_dim: int | None,
        max_length: int,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        transformers = require("transformers", key)
        _check_dir(path, key)
        try:
            self.model = transformers.AutoModel.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{key}: hf:{path}: AutoModel cannot load it: {e}") from None
        # BERT-style models carry a pooler for their pretraining head; the sentence
        # embedding here is pooled from the hidden states, so the pooler would get no
        # gradient and DDP would stop at the next step ("Expected to have finished
        # reduction"). It is kept (and exported) unchanged.
        pooler = getattr(self.model, "pooler", None)
        if isinstance(pooler, nn.Module):
            pooler.requires_grad_(False)
        if grad_checkpointing:
            # transformers 5 renamed it; non-reentrant: the one that works under DDP.
            kwargs = {"use_reentrant": False}
            if hasattr(self.model, "activation_checkpointing_enable"):
                self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.path, self.pooling, self.max_length = path, pooling, max_length
        hidden = int(self.model.config.hidden_size)
        self.proj = nn.Linear(hidden, out_dim) if out_dim else None
        self.out_dim = out_dim or hidden
        tokenizer = load_tokenizer(path, key)
        # Only right padding can be cut off without moving the real tokens' positions.
        self._right_padded = tokenizer.padding_side == "right"
        self._tokenizer = tokenizer

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor
    ) -> torch.Tensor:
        if self._right_padded and input_ids.shape[0] > 0:
            # Columns that are padding in every row change nothing (masked keys, and
            # positions count from the left): drop them, the pass costs what the
            # longest text of these rows needs.
            keep = max(int(attention_mask.sum(1).max()), 1)
            input_ids, attention_mask = input_ids[:, :keep], attention_mask[:, :keep]
            extra = {k: v[:, :keep] for k, v in extra.items()}
        h = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        states = h.last_hidden_state
        if self.pooling == "cls":
            pooled = states[:, 0]
        else:
            # sentence-transformers' mean pooling, to the operation: the export's
            # Pooling module gives the same numbers.
            mask = attention_mask.unsqueeze(-1).to(states.dtype)
            pooled = (states * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return self.proj(pooled) if self.proj is not None else pooled

    def export(self, out: Path, *, normalize: bool) -> None:
        """``save_pretrained`` (model, tokenizer) + sentence-transformers modules in ``out``.

        Raises:
            ConfigError: sentence-transformers is not installed.
        """
        st = require("sentence_transformers", "export")
        try:  # sentence-transformers >= 6; before, the same modules were in .models
            modules = importlib.import_module("sentence_transformers.sentence_transformer.modules")
        except ImportError:
            modules = importlib.import_module("sentence_transformers.models")
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        self._tokenizer.save_pretrained(out)
        transformer = modules.Transformer(str(out), max_seq_length=self.max_length)
        hidden = transformer.get_embedding_dimension()
        parts: list[nn.Module] = [transformer, modules.Pooling(hidden, self.pooling)]
        if self.proj is not None:
            parts.append(
                modules.Dense(
                    hidden,
                    self.out_dim,
                    bias=True,
                    activation_function=nn.Identity(),
                    init_weight=self.proj.weight.detach().clone(),
                    init_bias=self.proj.bias.detach().clone(),
                )
            )
        if normalize:
            parts.append(modules.Normalize())
        st.SentenceTransformer(modules=parts, device="cpu").save(str(out))
