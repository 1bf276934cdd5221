"""The workshop: measurements of this package (speed, the model table, the upsampling ablation), apart from the product.

:mod:`fcn.bench.probes` times training, loading, evaluation and peak FLOP/s through the functions
training uses; :mod:`fcn.bench.run` is ``fcn-benchmark`` / ``scripts/benchmark.py`` (a Hydra entry
point over the training config); :mod:`fcn.bench.fast_paths` is ``scripts/measure_fast_paths.py``
(per-backbone fast paths, A B A B in one process); :mod:`fcn.bench.upsampling_ablation` is
``scripts/upsampling_ablation.py`` (docs/upsampling-ablation.md); :mod:`fcn.bench.model_table` is
``fcn-model-table`` / ``scripts/model_table.py`` (docs/results.md's model zoo table). Nothing in the product imports
this package.
"""
