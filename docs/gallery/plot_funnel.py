"""
Funnel plot
===========

Each effect size of the three-level ``schoolcal`` model against its sampling standard
error :math:`\\sqrt{v_i}` (0 at the top), as metafor's ``funnel()``. Without
moderators the effects are centred on the pooled estimate :math:`\\hat\\beta`, and
the white funnel is the pseudo confidence region
:math:`\\hat\\beta \\pm 1.96\\,\\mathrm{se}`: without heterogeneity and without
small-study effects, about 95 % of the points would fall inside it. Here the
district and school variances spread the precise studies far beyond it.
"""

import mlmeta
from mlmeta.plots import funnel_plot

df = mlmeta.datasets.load("schoolcal")
res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)", df,
                       variance="var")
ax = funnel_plot(res)

# %%
# Contour-enhanced funnel
# -----------------------
#
# ``contours=True`` shades, around 0, the regions where a two-sided test of a single
# effect would have p > 0.10 (white), 0.05 < p < 0.10, 0.01 < p < 0.05 and p < 0.01
# (Peters et al., 2008). Missing studies in the white region, where results are not
# significant, point to publication bias rather than to other causes of asymmetry.

ax = funnel_plot(res, contours=True)

# %%
# The regression test of asymmetry
# --------------------------------
#
# The multilevel Egger-type test refits the model with :math:`\sqrt{v_i}` as a
# moderator; its intercept is the limit estimate, the effect of a study of infinite
# precision. With ``robust="CR2"`` the slope is tested with a cluster-robust standard
# error on Satterthwaite degrees of freedom.

print(res.egger_test(robust="CR2"))

# %%
# For a meta-regression the funnel shows the marginal residuals
# :math:`y_i - x_i'\hat\beta` around 0.

res_year = mlmeta.meregress("stdmdiff ~ year_c + (1 | district) + (1 | district:school)", df,
                            variance="var")
ax = funnel_plot(res_year)
