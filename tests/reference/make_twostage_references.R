#!/usr/bin/env Rscript
## Reference values for mlmeta.two_stage: per-group lm() fits, one-sample t tests
## across groups, and metafor's multivariate meta-analysis of the group coefficients.
##
## Run from the repository root (mlmeta importable by `python`):
##
##     Rscript tests/reference/make_twostage_references.R
##
## Inputs : none; the data are simulated by mlmeta.simulate.lmm (seeded) and written
##          to tests/reference/data/twostage.csv.
## Outputs: tests/reference/data/twostage.csv, tests/reference/twostage_reference.json
##
## Packages: metafor (rma.mv with struct = "UN"), jsonlite. First stage: lm() per group,
## coefficients b_g and vcov() = s_g^2 (X_g'X_g)^-1. Second stage "ols": t.test() of each
## coefficient. Second stage "meta": rma.mv(yi, V = bldiag(vcov), mods = ~ 0 + coef,
## random = ~ coef | grp, struct = "UN") by REML and ML, with tight optimiser tolerances.
## Coefficient order is R's (intercept first).

suppressPackageStartupMessages({
  library(metafor)
  library(jsonlite)
})

if (!file.exists("src/mlmeta")) stop("run from the repository root")
REF_DIR <- "tests/reference"
dir.create(file.path(REF_DIR, "data"), showWarnings = FALSE)

py <- '
import numpy as np
from mlmeta.simulate import lmm
d, _, _ = lmm(12, 2, 25, group_sd=[0.3, 0.5, 0.2], seed=201)
d = d[(np.arange(len(d)) * 7) % 11 != 0]          # unequal group sizes
d.to_csv("tests/reference/data/twostage.csv", index=False, float_format="%.17g")
'
## R puts its own libraries on LD_LIBRARY_PATH, which can hide the Python packages.
status <- system2("env", c("-u", "LD_LIBRARY_PATH", Sys.getenv("PYTHON", "python"), "-c", shQuote(py)))
if (status != 0) stop("python data generation failed")

mat <- function(m) unname(lapply(seq_len(nrow(m)), function(i) unname(as.numeric(m[i, ]))))

dat <- read.csv(file.path(REF_DIR, "data", "twostage.csv"))
grp <- sort(unique(dat$Group))
fits <- lapply(grp, function(g) lm(DV ~ IV1 + IV2, data = dat[dat$Group == g, ]))
B <- t(sapply(fits, coef))
S <- lapply(fits, vcov)
J <- nrow(B); p <- ncol(B)
tt <- lapply(seq_len(p), function(k) t.test(B[, k]))
long <- data.frame(yi = as.vector(t(B)),
                   coef = factor(rep(colnames(B), J), levels = colnames(B)),
                   grp = rep(grp, each = p))
V <- bldiag(S)
ctrl <- list(rel.tol = 1e-14, iter.max = 10000, eval.max = 20000)
meta <- list()
for (m in c("REML", "ML")) {
  fit <- rma.mv(yi, V, mods = ~ 0 + coef, random = ~ coef | grp, struct = "UN",
                data = long, method = m, control = ctrl)
  meta[[tolower(m)]] <- list(beta = unname(as.numeric(fit$beta)), se = unname(fit$se),
                             zval = unname(fit$zval), G = mat(fit$G),
                             llf = as.numeric(logLik(fit)))
}
ref <- list(generated_by = "tests/reference/make_twostage_references.R", R = R.version.string,
            metafor = as.character(packageVersion("metafor")),
            data = file.path(REF_DIR, "data", "twostage.csv"), formula = "DV ~ IV1 + IV2",
            group = "Group", names_r = colnames(B), names = c("_cons", "IV1", "IV2"),
            groups = grp, b = mat(B), S = lapply(S, mat),
            sigma2 = unname(sapply(fits, function(f) summary(f)$sigma^2)),
            ttest = list(estimate = sapply(tt, function(x) unname(x$estimate)),
                         se = sapply(tt, function(x) unname(x$stderr)),
                         t = sapply(tt, function(x) unname(x$statistic)),
                         df = sapply(tt, function(x) unname(x$parameter)),
                         p = sapply(tt, function(x) x$p.value)),
            meta = meta)
writeLines(toJSON(ref, auto_unbox = TRUE, digits = NA, pretty = TRUE),
           file.path(REF_DIR, "twostage_reference.json"))
cat("wrote", file.path(REF_DIR, "twostage_reference.json"), "\n")
