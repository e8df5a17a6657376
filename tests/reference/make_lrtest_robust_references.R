#!/usr/bin/env Rscript
## Reference values for mlmeta.lrtest() on covariance structures nested by equality
## constraints or by a variance fixed at zero, and for robust(type = "CR1p") as
## metafor's robust(fit, cluster) computes it.
##
## Run from the repository root:
##
##     Rscript tests/reference/make_lrtest_robust_references.R
##
## Inputs : src/mlmeta/datasets/berkey.csv (bundled; checked equal to metadat's
##          dat.berkey1998)
## Outputs: tests/reference/lrtest_robust_reference.json
##
## Packages: metafor (rma.mv, vcalc, anova, robust), metadat, jsonlite. Numbers are
## written with 17 significant digits.
##
## "lrtest": per case the full and reduced rma.mv fits (REML, identical fixed
## parts) and metafor's anova(full, reduced): LRT, df (difference in parameters),
## its plain chi2 p-value, and both log-likelihoods. metafor never uses a chi-bar
## mixture; "boundary" records whether the null fixes a variance at zero (then
## mlmeta also reports the 50:50 mixture p-value, 0.5 * (chi2_{df-1} + chi2_df)).
## The sampling covariance is V <- vcalc(vi, cluster = trial, obs = outcome,
## rho = 0.6) (stored too, to check mlmeta.vcalc("vi", "trial", rho = 0.6)).
##
## "robust": metafor's robust(fit, cluster = trial) (adjust = TRUE: CR0 x J/(J - p);
## t tests and CIs on J - p df; omnibus F = QM / m on (m, J - p) df) for the model
## with the diagonal vi and the model with V.

suppressPackageStartupMessages({
  library(metafor)
  library(metadat)
  library(jsonlite)
})

if (!file.exists("src/mlmeta/datasets")) stop("run from the repository root")
REF_DIR <- "tests/reference"

dat <- read.csv("src/mlmeta/datasets/berkey.csv")
mdat <- dat.berkey1998
stopifnot(nrow(dat) == nrow(mdat), all(dat$trial == mdat$trial),
          all(dat$outcome == as.character(mdat$outcome)),
          isTRUE(all.equal(dat$yi, as.numeric(mdat$yi))),
          isTRUE(all.equal(dat$vi, as.numeric(mdat$vi))))
dat$outcome <- factor(dat$outcome)           # levels AL, PD (mlmeta: outcome[AL], outcome[PD])
V <- vcalc(vi, cluster = trial, obs = outcome, rho = 0.6, data = dat)
ctl <- list(optimizer = "bobyqa", rhoend = 1e-12)   # tight convergence

ren <- function(nm) sub("^outcome", "outcome[", paste0(nm, "]"))
named <- function(x, nm) setNames(as.list(as.numeric(x)), nm)
mat <- function(m) unname(lapply(seq_len(nrow(m)), function(i) unname(as.numeric(m[i, ]))))

fit <- function(...) rma.mv(yi, V, mods = ~ outcome - 1, data = dat, control = ctl, ...)

lr_case <- function(name, full_src, reduced_src, full_ml, reduced_ml, full, reduced, boundary) {
  a <- anova(full, reduced)
  list(name = name, boundary = boundary,
       full = list(metafor = full_src, mlmeta = full_ml, llf = as.numeric(logLik(full)),
                   parms = a$parms.f),
       reduced = list(metafor = reduced_src, mlmeta = reduced_ml, llf = as.numeric(logLik(reduced)),
                      parms = a$parms.r),
       LRT = a$LRT, df = a$parms.f - a$parms.r, pval = a$pval)
}

f_un <- fit(random = ~ outcome | trial, struct = "UN")
f_cs <- fit(random = ~ outcome | trial, struct = "CS")
f_diag <- fit(random = ~ outcome | trial, struct = "DIAG")
f_id <- fit(random = ~ outcome | trial, struct = "ID")
f_diag0 <- fit(random = ~ outcome | trial, struct = "DIAG", tau2 = c(NA, 0))   # tau2(PD) = 0
f_3l <- fit(random = ~ 1 | trial / outcome)
f_2l <- fit(random = ~ 1 | trial)

bar <- "yi ~ 0 + outcome + (0 + outcome | trial)"
lrtest <- list(
  lr_case("un_vs_cs", "random = ~ outcome | trial, struct = 'UN'",
          "random = ~ outcome | trial, struct = 'CS'",
          list(formula = bar, covariance = "unstructured"),
          list(formula = bar, covariance = "exchangeable"), f_un, f_cs, FALSE),
  lr_case("diag_vs_id", "random = ~ outcome | trial, struct = 'DIAG'",
          "random = ~ outcome | trial, struct = 'ID'",
          list(formula = bar, covariance = "independent"),
          list(formula = bar, covariance = "identity"), f_diag, f_id, FALSE),
  lr_case("un_vs_diag", "random = ~ outcome | trial, struct = 'UN'",
          "random = ~ outcome | trial, struct = 'DIAG'",
          list(formula = bar, covariance = "unstructured"),
          list(formula = bar, covariance = "independent"), f_un, f_diag, FALSE),
  lr_case("diag_vs_sd_fixed_zero", "random = ~ outcome | trial, struct = 'DIAG'",
          "random = ~ outcome | trial, struct = 'DIAG', tau2 = c(NA, 0)",
          list(formula = bar, covariance = "independent"),
          list(formula = bar, covariance = list(list(NULL, 0), list(0, 0))), f_diag, f_diag0, TRUE),
  lr_case("level_removed", "random = ~ 1 | trial / outcome", "random = ~ 1 | trial",
          list(formula = "yi ~ 0 + outcome + (1 | trial) + (1 | trial:outcome)"),
          list(formula = "yi ~ 0 + outcome + (1 | trial)"), f_3l, f_2l, TRUE)
)

robust_block <- function(name, src, res) {
  rr <- robust(res, cluster = dat$trial)
  nm <- ren(rownames(rr$beta))
  list(name = name, source = src, n_clusters = rr$n,
       params = named(rr$beta, nm), se = named(rr$se, nm), tstat = named(rr$zval, nm),
       pval = named(rr$pval, nm), df = rr$ddf[[1]], ci_lb = named(rr$ci.lb, nm),
       ci_ub = named(rr$ci.ub, nm), vcov = mat(rr$vb),
       QM = rr$QM, QMdf = as.numeric(rr$QMdf), QMp = rr$QMp)
}
f_un_vi <- rma.mv(yi, vi, mods = ~ outcome - 1, random = ~ outcome | trial, struct = "UN",
                  data = dat, control = ctl)
robust_cases <- list(
  c(robust_block("berkey_vi", "robust(rma.mv(yi ~ 0 + outcome, vi, random = ~ outcome | trial, struct = 'UN', data = dat), cluster = trial)", f_un_vi),
    list(variance = "vi")),
  c(robust_block("berkey_V", "robust(rma.mv(yi ~ 0 + outcome, V, random = ~ outcome | trial, struct = 'UN', data = dat), cluster = trial)", f_un),
    list(V = "vcalc")))

out <- list(
  generated_by = "tests/reference/make_lrtest_robust_references.R",
  versions = list(R = R.version.string, metafor = as.character(packageVersion("metafor")),
                  metadat = as.character(packageVersion("metadat"))),
  data = "berkey",
  V = list(call = "vcalc(vi, cluster = trial, obs = outcome, rho = 0.6, data = dat)",
           matrix = mat(as.matrix(V))),
  lrtest = lrtest,
  robust = robust_cases)
writeLines(toJSON(out, auto_unbox = TRUE, digits = I(17), pretty = TRUE, null = "null", na = "null"),
           file.path(REF_DIR, "lrtest_robust_reference.json"))
for (c in lrtest) cat(sprintf("%-22s LRT %.6f df %d p %.6f\n", c$name, c$LRT, c$df, c$pval))
for (c in robust_cases) cat(c$name, "se", unlist(c$se), "df", c$df, "p", unlist(c$pval),
                            "QM", c$QM, c$QMdf, c$QMp, "\n")
