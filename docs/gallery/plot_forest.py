"""
Forest plot
===========

Every effect size of the three-level ``schoolcal`` model with its 95 % sampling
interval :math:`y_i \\pm 1.96 \\sqrt{v_i}`, drawn as metafor's ``forest()`` draws an
``rma.mv`` fit: a square of area proportional to the effect size's weight
:math:`w_i = (V^{-1})_{ii} / \\sum_k (V^{-1})_{kk}`, and on the right its estimate
with the interval and the weight in percent.

Rows are grouped by district. With ``subtotals=True`` each district closes with its
own mean effect, the GLS mean of its rows given the school-level variance and the
sampling errors, as a grey diamond. At the bottom the pooled estimate is a black
diamond (its confidence interval), followed by the prediction interval of a new
school in a new district,
:math:`\\hat\\beta \\pm 1.96 \\sqrt{\\mathrm{se}^2 + \\tau_1^2 + \\tau_2^2}`.
"""

import mlmeta
from mlmeta.plots import forest_plot

df = mlmeta.datasets.load("schoolcal")
res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)", df,
                       variance="var")
fig = forest_plot(res, subtotals=True)

# %%
# Meta-regression
# ---------------
#
# With a moderator there is no single pooled effect: each row also shows its fitted
# value :math:`x_i'\hat\beta \pm 1.96 \sqrt{x_i' \mathrm{Var}(\hat\beta) x_i}` as a
# grey diamond (metafor's ``addfit``). Here the rows are labelled by study and the
# x range is cut at -0.8 and 1.2: intervals beyond it end in arrows.

res_year = mlmeta.meregress("stdmdiff ~ year_c + (1 | district) + (1 | district:school)", df,
                            variance="var")
fig = forest_plot(res_year, label="study", data=df, xlim=(-0.8, 1.2))
