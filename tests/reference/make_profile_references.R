#!/usr/bin/env Rscript
## Reference values for profile-likelihood intervals of correlated random effects
## (mlmeta's profile_ci for unstructured and exchangeable levels).
##
## Run from the repository root:
##
##     Rscript tests/reference/make_profile_references.R
##
## Input : src/mlmeta/datasets/berkey.csv (Berkey et al. 1998: 5 trials x 2 outcomes)
## Output: tests/reference/profile_reference.json
##
## Models (metafor::rma.mv, REML, outcome-specific means):
##   un_V      random = ~ outcome | trial, struct = "UN", V = the trials' 2 x 2 blocks
##   un_diag   the same with the diagonal sampling variances only
##   cs_diag   struct = "CS" (exchangeable: one variance, one correlation), diagonal V
## For each: llf, tau2, rho and confint() (profile-likelihood limits of each tau2 and rho).

suppressPackageStartupMessages({
  library(metafor)
  library(jsonlite)
})

dat <- read.csv("src/mlmeta/datasets/berkey.csv")
dat <- dat[order(dat$trial), ]   # rows of a trial in file order (PD, AL), as v1i, v2i
V <- bldiag(lapply(split(dat[, c("v1i", "v2i")], dat$trial), as.matrix))
ctrl <- list(rel.tol = 1e-10, iter.max = 10000, eval.max = 10000)

fit_case <- function(Vmat, struct) {
  res <- rma.mv(yi, Vmat, mods = ~ outcome - 1, random = ~ outcome | trial, struct = struct,
                data = dat, method = "REML", control = ctrl)
  ci <- confint(res, control = list(tol = 1e-10))
  one <- function(x) list(estimate = unname(x$random[, "estimate"]),
                          lower = unname(x$random[, "ci.lb"]),
                          upper = unname(x$random[, "ci.ub"]),
                          names = rownames(x$random))
  cis <- if (inherits(ci, "list.confint.rma")) lapply(ci[sapply(ci, inherits, "confint.rma")], one) else list(one(ci))
  list(llf = as.numeric(logLik(res)), tau2 = res$tau2, rho = res$rho, confint = cis)
}

out <- list(
  un_V = fit_case(V, "UN"),
  un_diag = fit_case(dat$vi, "UN"),
  cs_diag = fit_case(dat$vi, "CS"),
  info = list(metafor = as.character(packageVersion("metafor")))
)
writeLines(toJSON(out, digits = NA, auto_unbox = TRUE, pretty = TRUE),
           "tests/reference/profile_reference.json")
