"""Adapters to other training frameworks. Each imports its framework only when used.

- :mod:`~dist_infonce.integrations.sentence_transformers`: :class:`InfoNCELoss`, a
  sentence-transformers loss (``SentenceTransformerTrainer``) over the global batch with
  hard negatives, gradient caching and a learnable or fixed scale.
"""
