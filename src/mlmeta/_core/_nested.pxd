# Declarations shared by kernels that reuse the nested-tree factorisation.
