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

- :mod:`~dist_infonce.losses.siglip`: ``siglip_loss`` / ``SigLIP`` (SigLIP's sigmoid loss:
  the same ``LossOptions``, checks and dispatch; its learnable scale and bias go through
  :class:`~dist_infonce.losses.learnable.AveragesOwnGradients` like the temperature)
"""

from dist_infonce.losses.infonce import InfoNCE, info_nce
from dist_infonce.losses.ntxent import NTXent, nt_xent
from dist_infonce.losses.options import LossOptions
from dist_infonce.losses.siglip import SigLIP, siglip_loss

__all__ = ["InfoNCE", "LossOptions", "NTXent", "SigLIP", "info_nce", "nt_xent", "siglip_loss"]
