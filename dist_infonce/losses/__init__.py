"""The InfoNCE family of losses, one module per concept.

- :mod:`~dist_infonce.losses.infonce`: ``info_nce`` / ``InfoNCE`` (CLIP with ``symmetric``)
- :mod:`~dist_infonce.losses.ntxent`: ``nt_xent`` / ``NTXent`` (SimCLR)
- :mod:`~dist_infonce.losses.options`: ``LossOptions``, the one validated options object
  the bodies take by name
- :mod:`~dist_infonce.losses.checks`: argument checks (a ValueError naming the argument)
- :mod:`~dist_infonce.losses.dispatch`: kernel choice (dense / chunked / triton, "auto")
- :mod:`~dist_infonce.losses.common`: positive logit, row counts, the reduction with the
  gradient convention
- :mod:`~dist_infonce.losses.labels`: SupCon's per-class sums
- :mod:`~dist_infonce.losses.temperature`: fixed and learnable temperature (module base)
- :mod:`~dist_infonce.losses.learnable`: a loss module's own parameters, averaged over the
  ranks where no DDP does it

SigLIP's sigmoid loss joins as ``losses/siglip.py`` (``siglip_loss`` / ``SigLIP``): it
takes the same ``LossOptions``, checks and dispatch, and its learnable scale and bias
go through :class:`~dist_infonce.losses.learnable.AveragesOwnGradients` like the
temperature here.
"""

from dist_infonce.losses.infonce import InfoNCE, info_nce
from dist_infonce.losses.ntxent import NTXent, nt_xent
from dist_infonce.losses.options import LossOptions

__all__ = ["InfoNCE", "LossOptions", "NTXent", "info_nce", "nt_xent"]
