"""The application layer on top of rdsim: the ``rdsim`` command line, the edge-of-stability demo,
declarative sweeps (:mod:`rdsim_experiments.sweep`) and the paper reproductions
(:mod:`rdsim_experiments.reproduce`).

Unlike the library (``rdsim``), this package may use the experiment models and data sets in
``models``; ``rdsim`` itself never imports either.
"""
