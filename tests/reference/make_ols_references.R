#!/usr/bin/env Rscript
## Reference values for mlmeta.ols: classical and cluster-robust OLS covariances.
##
## Run from the repository root (mlmeta importable by `python`):
##
##     Rscript tests/reference/make_ols_references.R
##
## Inputs : none; the data are simulated first by mlmeta.simulate.lmm (seeded) and
##          written to tests/reference/data/ols_*.csv.
## Outputs: tests/reference/data/ols_unbalanced.csv, tests/reference/data/ols_factor.csv,
##          tests/reference/ols_reference.json
##
## Packages: sandwich (vcovCL), clubSandwich (vcovCR, coef_test), jsonlite.
## Per case: lm() coefficients and classical covariance; sandwich::vcovCL with
## type "HC0" (= CR1: vcovCL's default cadjust = TRUE multiplies by J/(J-1)),
## "HC0" with cadjust = FALSE (= CR0) and "HC1" (= CR1S: J/(J-1) (N-1)/(N-p)); clubSandwich::vcovCR
## for CR0, CR1, CR1p, CR1S, CR2, CR3 and the Satterthwaite df of coef_test for
## CR2. Numbers are written with 15 significant digits.

suppressPackageStartupMessages({
  library(sandwich)
  library(clubSandwich)
  library(jsonlite)
})

if (!file.exists("src/mlmeta")) stop("run from the repository root")
REF_DIR <- "tests/reference"
dir.create(file.path(REF_DIR, "data"), showWarnings = FALSE)

py <- '
import numpy as np, pandas as pd
from mlmeta.simulate import lmm
d, _, _ = lmm(20, 3, 30, group_sd=1.0, seed=101)
d = d[np.arange(len(d)) % 7 != 3]            # unequal cluster sizes
d = d[~((d.Group <= 5) & (np.arange(len(d)) % 2 == 0))]
d.to_csv("tests/reference/data/ols_unbalanced.csv", index=False, float_format="%.17g")
d, _, _ = lmm(6, 2, 8, group_sd=0.5, seed=102)
d["cond"] = np.array(["a", "b", "c"])[np.arange(len(d)) % 3]
d["site"] = ["s%02d" % g for g in d.Group]
d.to_csv("tests/reference/data/ols_factor.csv", index=False, float_format="%.17g")
'
## R puts its own libraries on LD_LIBRARY_PATH, which can hide the Python packages.
status <- system2("env", c("-u", "LD_LIBRARY_PATH", Sys.getenv("PYTHON", "python"), "-c", shQuote(py)))
if (status != 0) stop("python data generation failed")

mat <- function(m) unname(lapply(seq_len(nrow(m)), function(i) unname(as.numeric(m[i, ]))))
TYPES <- c("CR0", "CR1", "CR1p", "CR1S", "CR2", "CR3")

make_case <- function(name, file, formula_r, formula_py, cluster, names_py) {
  dat <- read.csv(file.path(REF_DIR, "data", file), stringsAsFactors = FALSE)
  fit <- lm(as.formula(formula_r), data = dat)
  cl <- dat[[cluster]]
  out <- list(name = name, data = file.path(REF_DIR, "data", file), formula = formula_py,
              cluster = cluster, names_r = names(coef(fit)), names = names_py,
              nobs = nobs(fit), n_clusters = length(unique(cl)),
              params = unname(coef(fit)), vcov_classical = mat(vcov(fit)),
              df_resid = fit$df.residual)
  out$sandwich <- list(
    HC0 = mat(vcovCL(fit, cluster = cl, type = "HC0")),
    HC0_nocadjust = mat(vcovCL(fit, cluster = cl, type = "HC0", cadjust = FALSE)),
    HC1 = mat(vcovCL(fit, cluster = cl, type = "HC1")))
  out$clubSandwich <- list()
  for (tp in TYPES) {
    V <- vcovCR(fit, cluster = cl, type = tp)
    ct <- coef_test(fit, vcov = V, test = "Satterthwaite")
    out$clubSandwich[[tp]] <- list(vcov = mat(as.matrix(V)), df_satterthwaite = unname(ct$df_Satt),
                                   se = unname(ct$SE))
  }
  out
}

cases <- list(
  make_case("unbalanced", "ols_unbalanced.csv", "DV ~ IV1 + IV2 + IV3", "DV ~ IV1 + IV2 + IV3",
            "Group", c("_cons", "IV1", "IV2", "IV3")),
  make_case("factor", "ols_factor.csv", "DV ~ IV1 + IV2 + cond", "DV ~ IV1 + IV2 + cond",
            "site", c("_cons", "IV1", "IV2", "cond[T.b]", "cond[T.c]"))
)

ref <- list(generated_by = "tests/reference/make_ols_references.R",
            R = R.version.string,
            packages = list(sandwich = as.character(packageVersion("sandwich")),
                            clubSandwich = as.character(packageVersion("clubSandwich"))),
            cases = cases)
writeLines(toJSON(ref, auto_unbox = TRUE, digits = NA, pretty = TRUE),
           file.path(REF_DIR, "ols_reference.json"))
cat("wrote", file.path(REF_DIR, "ols_reference.json"), "\n")
