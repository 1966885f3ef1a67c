"""dist_infonce: exact, memory-linear contrastive losses for very large global batches."""

from dist_infonce.cache import cached_backward
from dist_infonce.dist import GatherLayer, all_gather_with_grad
from dist_infonce.losses import InfoNCE, NTXent, SigLIP, info_nce, nt_xent, siglip_loss
from dist_infonce.negatives import NegativeQueue

__all__ = [
    "GatherLayer",
    "InfoNCE",
    "NTXent",
    "NegativeQueue",
    "SigLIP",
    "all_gather_with_grad",
    "cached_backward",
    "info_nce",
    "nt_xent",
    "siglip_loss",
]
__version__ = "0.1.0"
