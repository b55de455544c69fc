"""The benchmark suite: ``python -m jorbmp.bench [--quick] [--scaling] [--json PATH]``.

Every scenario measures jorbmp and its baseline in the same run and reports their
ratio, because shared 2-core machines drift too much for absolute figures to mean
anything across runs. Baselines that need a package that is not installed (mpire,
Dask's ``distributed``) are skipped, and the table says why.
"""
