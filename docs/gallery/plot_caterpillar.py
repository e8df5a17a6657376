"""
Caterpillar plot
================

The best linear unbiased predictions (BLUPs) of the district effects, sorted, with
intervals :math:`\\hat u_g \\pm 1.96\\,\\mathrm{se}_g` from the comparative standard
errors (the prediction-error variance, including the uncertainty of
:math:`\\hat\\beta`, as metafor's ``ranef``).
"""

import mlmeta
from mlmeta.plots import caterpillar_plot

df = mlmeta.datasets.load("schoolcal")
res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)", df,
                       variance="var")
fig = caterpillar_plot(res, group="district")

# %%
# The same for a random slope: the district-specific deviations of the trend in
# ``year_c`` from the average trend.

slope = mlmeta.meregress("stdmdiff ~ year_c + (1 + year_c | district) + (1 | district:school)",
                         df, variance="var")
fig = caterpillar_plot(slope, group="district", effect="year_c")

# %%
# The numbers behind the plot:

print(res.random_effects()["district"].round(4))
