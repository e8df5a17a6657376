"""
Forest plot
===========

Every effect size of the three-level ``schoolcal`` model with its 95 % sampling
interval :math:`y_i \\pm 1.96\\,\\sigma_i`, grouped by district and labelled by
``district/school``, and the pooled estimate as a diamond (its confidence interval)
with whiskers for the prediction interval of a new school in a new district,
:math:`\\hat\\beta \\pm 1.96 \\sqrt{\\mathrm{se}^2 + \\tau_1^2 + \\tau_2^2}`.
"""

import mlmeta
from mlmeta.plots import forest_plot

df = mlmeta.datasets.load("schoolcal")
res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)", df,
                       variance="var")
fig = forest_plot(res, figsize=(6.5, 12))

# %%
# With moderators the plot marks each study's fitted value :math:`x_i'\hat\beta`
# instead of a pooled diamond.

res_year = mlmeta.meregress("stdmdiff ~ year_c + (1 | district) + (1 | district:school)", df,
                            variance="var")
fig = forest_plot(res_year, figsize=(6.5, 12))
