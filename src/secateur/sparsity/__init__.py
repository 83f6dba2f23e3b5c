"""Sparsity: zero individual weights (unstructured or N:M) with magnitude, Wanda, SparseGPT, RIA or
GBLM scores, layer-wise allocation, refinement and permutations, block by block (`prune`)."""
