"""
Forest plot
===========

Every effect size with its sampling confidence interval, grouped by cluster.
"""

import mlmeta
from mlmeta.plots import forest_plot

df = mlmeta.datasets.load("schoolcal")
res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)", df,
                       variance="var")
fig = forest_plot(res)
