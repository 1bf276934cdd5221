"""The workshop: measurements of this package (speed, the upsampling ablation), kept apart from the product.

:mod:`fcn.bench.probes` times training, loading, evaluation and peak FLOP/s through the functions
training uses; :mod:`fcn.bench.run` is ``fcn-benchmark`` / ``scripts/benchmark.py`` (a Hydra entry
point over the training config); :mod:`fcn.bench.fast_paths` is ``scripts/measure_fast_paths.py``
(per-backbone fast paths, A B A B in one process); :mod:`fcn.bench.upsampling_ablation` is
``scripts/upsampling_ablation.py`` (docs/upsampling-ablation.md). Nothing in the product imports this package
except ``fcn/cli/model_table.py`` (its timing column).
"""
