"""The benchmarks, one module per mode, run as ``python -m dist_infonce.bench [MODE] ...``.

- ``loss`` (the default): dense InfoNCE vs the chunked kernel vs peers, fwd + bwd
  time and peak memory per (method, mode, B, D); ``--device cuda`` for the GPU
  sweep (:mod:`dist_infonce.bench.loss`).
- ``dist`` (also chosen by ``--world N`` alone): the gathered loss on N gloo
  processes, time and bytes sent per rank (:mod:`dist_infonce.bench.dist`).
- ``cache``: one trainer step with and without gradient caching
  (:mod:`dist_infonce.bench.cache`).
- ``data``: rows/s of each data source alone (0, 1, 2 DataLoader workers) next to the
  trainer's step rate on it (:mod:`dist_infonce.bench.data`).

Shared helpers live in :mod:`dist_infonce.bench.common`. Importing this package
imports no mode; ``python -m dist_infonce.bench`` imports only the mode it runs.
"""
