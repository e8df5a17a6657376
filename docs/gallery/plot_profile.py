"""
Profile likelihood
==================

The restricted log-likelihood of the district variance, maximised over the other
variance at each value, with the cutoff :math:`\\ell_{max} - \\chi^2_{1,0.95}/2`.
Where the curve crosses the cutoff are the limits of the profile-likelihood
interval (metafor's ``confint``); unlike a Wald interval it is not symmetric.
"""

import matplotlib.pyplot as plt

import mlmeta
from mlmeta.plots import profile_plot

df = mlmeta.datasets.load("schoolcal")
res = mlmeta.meregress("stdmdiff ~ 1 + (1 | district) + (1 | district:school)", df,
                       variance="var")
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
profile_plot(res, "district", ax=axes[0])
profile_plot(res, "district:school", ax=axes[1])
fig.tight_layout()

# %%
# The intervals drawn, in the variance and in the SD metric:

print(res.profile_ci().round(4).to_string())
