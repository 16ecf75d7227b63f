"""Pure optimisation: the intra-op ILP (intra_op), the pipeline DP (pipeline), the search.

Import-light on purpose: nothing is imported here, so ``import autopar.solver.intra_op`` does not
pull in the search (and through it torch); import the submodule you need.
"""
