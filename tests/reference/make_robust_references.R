#!/usr/bin/env Rscript
## Reference values for mlmeta's cluster-robust inference and vcalc().
##
## Run from the repository root:
##
##     Rscript tests/reference/make_robust_references.R
##
## Inputs : src/mlmeta/datasets/{berkey,schoolcal}.csv (bundled data)
## Outputs: tests/reference/data/robust_synthetic.csv  (seeded synthetic meta-analytic data)
##          tests/reference/data/robust_vcalc.csv      (seeded data for vcalc cases)
##          tests/reference/robust_reference.json
##
## Packages: metafor (rma.mv, robust, vcalc), clubSandwich (vcovCR, coef_test,
## Wald_test, impute_covariance_matrix), jsonlite. Numbers are written with 17
## significant digits.
##
## For every rma.mv fit the JSON holds the fit itself (params, bse, sigma2 / tau2 /
## rho, llf) and, per small-sample type CR0, CR1, CR1p, CR1S, CR2, CR3, the
## clubSandwich robust covariance matrix, SEs, Satterthwaite df and p-values and
## HTZ Wald tests. clubSandwich's CR2 on rma.mv uses the fitted marginal
## covariance M = V + ZGZ' as working model (target) and W = M^-1.
## metafor's own robust(fit, cluster) (adjust = TRUE: the CR0 matrix times
## J / (J - p), J clusters, p coefficients; t tests on J - p df; the omnibus
## test F = Q / m on (m, J - p) df) is stored under "metafor_robust".

suppressPackageStartupMessages({
  library(metafor)
  library(clubSandwich)
  library(jsonlite)
})

if (!file.exists("src/mlmeta/datasets")) stop("run from the repository root")
REF_DIR <- "tests/reference"
dir.create(file.path(REF_DIR, "data"), showWarnings = FALSE)

TYPES <- c("CR0", "CR1", "CR1p", "CR1S", "CR2", "CR3")

mat <- function(m) unname(lapply(seq_len(nrow(m)), function(i) unname(as.numeric(m[i, ]))))
named <- function(x, nm) setNames(as.list(as.numeric(x)), nm)

## fixed-effect names in mlmeta's spelling (intercept "_cons")
ml_names <- function(nm) ifelse(nm %in% c("intrcpt", "(Intercept)"), "_cons", nm)

wald_rows <- function(w) {
  lapply(seq_len(nrow(w)), function(i) list(
    test = as.character(w$test[i]), Fstat = w$Fstat[i], delta = w$delta[i],
    df_num = w$df_num[i], df_denom = w$df_denom[i], p_val = w$p_val[i]))
}

## clubSandwich on one fitted object, all CR types; constraints = list of index vectors
cs_block <- function(fit, cluster, constraints, extra = list()) {
  nm <- ml_names(names(clubSandwich:::coef_CS(fit)))
  out <- list()
  for (ty in TYPES) {
    vc <- do.call(vcovCR, c(list(fit, cluster = cluster, type = ty), extra))
    ct <- coef_test(fit, vcov = vc, test = c("Satterthwaite", "naive-t", "naive-tp", "z"))
    tests <- lapply(constraints, function(idx) {
      w <- Wald_test(fit, constraints = constrain_zero(idx), vcov = vc,
                     test = c("HTZ", "chi-sq", "Naive-F", "Naive-Fp"))
      list(coefs = as.list(nm[idx]), results = wald_rows(w))
    })
    out[[ty]] <- list(
      vcov = mat(as.matrix(vc)), se = named(ct$SE, nm), tstat = named(ct$tstat, nm),
      df_satterthwaite = named(ct$df_Satt, nm), p_satterthwaite = named(ct$p_Satt, nm),
      p_naive_t = named(ct$p_t, nm), p_naive_tp = named(ct$p_tp, nm), p_z = named(ct$p_z, nm),
      wald = tests)
  }
  out
}

mv_fit_block <- function(fit) {
  nm <- ml_names(rownames(fit$beta))
  list(params = named(fit$beta, nm), bse = named(fit$se, nm), llf = as.numeric(logLik(fit)),
       sigma2 = as.list(fit$sigma2), tau2 = as.list(fit$tau2), rho = as.list(fit$rho),
       names = as.list(nm), k = fit$k)
}

metafor_robust_block <- function(fit, cluster) {
  rb <- robust(fit, cluster = cluster)
  nm <- ml_names(rownames(fit$beta))
  list(call = "robust(fit, cluster) with adjust = TRUE (metafor's default)",
       vcov = mat(rb$vb), se = named(rb$se, nm), df = rb$dfs, tstat = named(rb$zval, nm),
       pval = named(rb$pval, nm), ci_lb = named(rb$ci.lb, nm), ci_ub = named(rb$ci.ub, nm),
       QM = rb$QM, QMdf = as.list(rb$QMdf), QMp = rb$QMp, n_clusters = rb$n)
}

cases <- list()

## ---------------------------------------------------------------- Berkey et al. (1998)
dat <- read.csv("src/mlmeta/datasets/berkey.csv")
dat$outcome <- factor(dat$outcome)           # levels AL, PD (mlmeta: outcome[AL], outcome[PD])
V <- bldiag(lapply(split(dat[, c("v1i", "v2i")], dat$trial), as.matrix))
ctl <- list(optimizer = "bobyqa", rhoend = 1e-12)   # tight convergence: the fits agree with mlmeta to ~1e-9
res1 <- rma.mv(yi, V, mods = ~ outcome - 1, random = ~ outcome | trial, struct = "UN",
               data = dat, control = ctl)
res2 <- rma.mv(yi, vi, mods = ~ outcome - 1, random = ~ outcome | trial, struct = "UN",
               data = dat, control = ctl)
ren <- function(nm) sub("^outcome", "outcome[", paste0(nm, "]"))
fix_names <- function(b) {
  names(b$params) <- ren(names(b$params)); names(b$bse) <- ren(names(b$bse))
  b$names <- as.list(ren(unlist(b$names))); b
}
fix_cs <- function(cs) {
  for (ty in names(cs)) {
    for (f in c("se", "tstat", "df_satterthwaite", "p_satterthwaite", "p_naive_t", "p_naive_tp", "p_z"))
      names(cs[[ty]][[f]]) <- ren(names(cs[[ty]][[f]]))
    for (i in seq_along(cs[[ty]]$wald)) cs[[ty]]$wald[[i]]$coefs <- as.list(ren(unlist(cs[[ty]]$wald[[i]]$coefs)))
  }
  cs
}
fix_mr <- function(m) { for (f in c("se", "tstat", "pval", "ci_lb", "ci_ub")) names(m[[f]]) <- ren(names(m[[f]])); m }
cases$berkey_res2 <- list(
  data = "berkey", formula = "yi ~ 0 + outcome + (0 + outcome | trial)", variance = "vi",
  method = "reml", cluster = "trial",
  source = "rma.mv(yi, vi, mods = ~ outcome - 1, random = ~ outcome | trial, struct = 'UN', data = dat)",
  fit = c(fix_names(mv_fit_block(res2)), list(tau_cor = res2$rho)),
  metafor_robust = fix_mr(metafor_robust_block(res2, dat$trial)),
  clubSandwich = fix_cs(cs_block(res2, dat$trial, list(1:2, 2))))
cases$berkey_res1 <- list(
  data = "berkey", formula = "yi ~ 0 + outcome + (0 + outcome | trial)",
  V = "block-diagonal by trial from columns v1i, v2i (row i: its own variance and the covariance with the other outcome)",
  method = "reml", cluster = "trial",
  source = "rma.mv(yi, V, mods = ~ outcome - 1, random = ~ outcome | trial, struct = 'UN', data = dat)",
  fit = c(fix_names(mv_fit_block(res1)), list(tau_cor = res1$rho)),
  metafor_robust = fix_mr(metafor_robust_block(res1, dat$trial)),
  clubSandwich = fix_cs(cs_block(res1, dat$trial, list(1:2, 2))))

## ---------------------------------------------------------------- schoolcal, three levels
sc <- read.csv("src/mlmeta/datasets/schoolcal.csv")
fit_sc <- rma.mv(stdmdiff, var, mods = ~ year_c, random = ~ 1 | district / school, data = sc,
                 control = ctl)
cases$schoolcal_3level <- list(
  data = "schoolcal", formula = "stdmdiff ~ year_c + (1 | district) + (1 | district:school)",
  variance = "var", method = "reml", cluster = "district",
  source = "rma.mv(stdmdiff, var, mods = ~ year_c, random = ~ 1 | district/school, data = dat)",
  fit = mv_fit_block(fit_sc),
  metafor_robust = metafor_robust_block(fit_sc, sc$district),
  ## school ids repeat across districts, so clustering by them is not nested:
  ## metafor still computes its sandwich (W = M^-1 of the whole model)
  metafor_robust_school = metafor_robust_block(fit_sc, sc$school),
  clubSandwich = cs_block(fit_sc, sc$district, list(1:2, 2)))

fit_sc_ml <- rma.mv(stdmdiff, var, mods = ~ year_c, random = ~ 1 | district / school, data = sc,
                    method = "ML", control = ctl)
cases$schoolcal_3level_ml <- list(
  data = "schoolcal", formula = "stdmdiff ~ year_c + (1 | district) + (1 | district:school)",
  variance = "var", method = "ml", cluster = "district",
  source = "rma.mv(stdmdiff, var, mods = ~ year_c, random = ~ 1 | district/school, data = dat, method = 'ML')",
  fit = mv_fit_block(fit_sc_ml),
  clubSandwich = cs_block(fit_sc_ml, sc$district, list(1:2)))

## ---------------------------------------------------------------- synthetic, 30 studies in 12 labs
set.seed(20240605)
n_study <- 30
lab_of_study <- sort(c(1:12, sample(1:12, n_study - 12, replace = TRUE)))
k_study <- sample(1:8, n_study, replace = TRUE)
syn <- data.frame(
  lab = rep(lab_of_study, k_study),
  study = rep(seq_len(n_study), k_study),
  es = unlist(lapply(k_study, seq_len)))
n <- nrow(syn)
syn$x1 <- round(rnorm(n), 4)
syn$x2 <- round(rep(rnorm(n_study), k_study), 4)
syn$x3 <- rbinom(n, 1, 0.4)
syn$v <- round(runif(n, 0.01, 0.1), 4)
u_study <- rnorm(n_study, 0, 0.25)[syn$study]
u_es <- rnorm(n, 0, 0.15)
syn$y <- round(0.3 + 0.2 * syn$x1 - 0.1 * syn$x2 + 0.15 * syn$x3 + u_study + u_es +
               rnorm(n, 0, sqrt(syn$v)), 4)
syn <- syn[sample(n), ]                        # rows in random order
rownames(syn) <- NULL
write.csv(syn, file.path(REF_DIR, "data", "robust_synthetic.csv"), row.names = FALSE)
syn <- read.csv(file.path(REF_DIR, "data", "robust_synthetic.csv"))

fit_syn <- rma.mv(y, v, mods = ~ x1 + x2 + x3, random = ~ 1 | study / es, data = syn,
                  control = ctl)
cases$synthetic_study <- list(
  data = "tests/reference/data/robust_synthetic.csv",
  formula = "y ~ x1 + x2 + x3 + (1 | study) + (1 | study:es)", variance = "v",
  method = "reml", cluster = "study",
  source = "rma.mv(y, v, mods = ~ x1 + x2 + x3, random = ~ 1 | study/es, data = dat)",
  fit = mv_fit_block(fit_syn),
  metafor_robust = metafor_robust_block(fit_syn, syn$study),
  clubSandwich = cs_block(fit_syn, syn$study, list(2:3, 2:4, 4)))
cases$synthetic_lab <- list(
  data = "tests/reference/data/robust_synthetic.csv",
  formula = "y ~ x1 + x2 + x3 + (1 | study) + (1 | study:es)", variance = "v",
  method = "reml", cluster = "lab",
  source = "rma.mv(y, v, mods = ~ x1 + x2 + x3, random = ~ 1 | study/es, data = dat); clusters = lab (studies nested in labs)",
  fit = mv_fit_block(fit_syn),
  metafor_robust = metafor_robust_block(fit_syn, syn$lab),
  clubSandwich = cs_block(fit_syn, syn$lab, list(2:3, 2:4)))

## ordinary and weighted least squares (the core with W = I, and with W != target^-1)
ols <- lm(y ~ x1 + x2 + x3, data = syn)
cases$synthetic_ols <- list(
  data = "tests/reference/data/robust_synthetic.csv", model = "ols",
  formula = "y ~ x1 + x2 + x3", cluster = "study",
  source = "lm(y ~ x1 + x2 + x3, data = dat)",
  fit = list(params = named(coef(ols), ml_names(names(coef(ols))))),
  clubSandwich = cs_block(ols, syn$study, list(2:3, 2:4)))
wls <- lm(y ~ x1 + x2 + x3, data = syn, weights = 1 / v)
cases$synthetic_wls <- list(
  data = "tests/reference/data/robust_synthetic.csv", model = "wls", weights = "1 / v",
  formula = "y ~ x1 + x2 + x3", cluster = "study",
  source = "lm(y ~ x1 + x2 + x3, data = dat, weights = 1 / v); working model (target) = identity, so W != target^-1",
  fit = list(params = named(coef(wls), ml_names(names(coef(wls))))),
  clubSandwich = cs_block(wls, syn$study, list(2:3, 2:4)))

## ---------------------------------------------------------------- vcalc
set.seed(777)
n_cl <- 8
kk <- c(1, 2, 3, 4, 3, 5, 2, 4)
vc <- data.frame(cluster = rep(sprintf("s%02d", n_cl:1), kk))   # labels not in data order
vc$esid <- unlist(lapply(kk, seq_len))
vc$type <- unlist(lapply(kk, function(k) sample(c("A", "B", "C"), k, replace = TRUE)))
vc$time <- unlist(lapply(kk, function(k) sample(0:5, k)))          # distinct within a cluster
vc$vi <- round(runif(nrow(vc), 0.01, 0.2), 4)
vc <- vc[sample(nrow(vc)), ]
rownames(vc) <- NULL
write.csv(vc, file.path(REF_DIR, "data", "robust_vcalc.csv"), row.names = FALSE)
vc <- read.csv(file.path(REF_DIR, "data", "robust_vcalc.csv"))

Rtype <- matrix(c(1, 0.3, 0.5, 0.3, 1, 0.6, 0.5, 0.6, 1), 3, 3,
                dimnames = list(c("A", "B", "C"), c("A", "B", "C")))
vcalc_case <- function(name, call, expr, args) {
  warns <- character(0)
  V <- withCallingHandlers(expr, warning = function(w) {
    warns <<- c(warns, conditionMessage(w)); invokeRestart("muffleWarning")
  })
  list(name = name, call = call, args = args, V = mat(as.matrix(V)), warnings = as.list(warns))
}
vcalc_cases <- list(
  vcalc_case("constant", "vcalc(vi, cluster, obs = esid, rho = 0.6, data = dat)",
             vcalc(vi, cluster, obs = esid, rho = 0.6, data = vc),
             list(rho = 0.6, obs = "esid")),
  vcalc_case("type_obs", "vcalc(vi, cluster, type = type, obs = esid, rho = c(0.7, 0.4), data = dat)",
             vcalc(vi, cluster, type = type, obs = esid, rho = c(0.7, 0.4), data = vc),
             list(rho = c(0.7, 0.4), type = "type", obs = "esid")),
  vcalc_case("type_matrix_obs", "vcalc(vi, cluster, type = type, obs = esid, rho = list(0.8, R), data = dat)",
             vcalc(vi, cluster, type = type, obs = esid, rho = list(0.8, Rtype), data = vc),
             list(rho_within = 0.8, rho_between = mat(Rtype), types = c("A", "B", "C"),
                  type = "type", obs = "esid")),
  vcalc_case("time", "vcalc(vi, cluster, time1 = time, phi = 0.8, data = dat)",
             vcalc(vi, cluster, time1 = time, phi = 0.8, data = vc),
             list(time = "time", phi = 0.8)),
  vcalc_case("obs_time", "vcalc(vi, cluster, obs = esid, time1 = time, rho = 0.5, phi = 0.9, data = dat)",
             vcalc(vi, cluster, obs = esid, time1 = time, rho = 0.5, phi = 0.9, data = vc),
             list(obs = "esid", time = "time", rho = 0.5, phi = 0.9)),
  vcalc_case("type_time", "vcalc(vi, cluster, type = type, obs = esid, time1 = time, rho = c(0.6, 0.3), phi = 0.7, data = dat)",
             vcalc(vi, cluster, type = type, obs = esid, time1 = time, rho = c(0.6, 0.3), phi = 0.7, data = vc),
             list(type = "type", obs = "esid", time = "time", rho = c(0.6, 0.3), phi = 0.7)),
  vcalc_case("type_only_npd", "vcalc(vi, cluster, type = type, rho = 0.4, data = dat)",
             vcalc(vi, cluster, type = type, rho = 0.4, data = vc),
             list(type = "type", rho = 0.4)),
  vcalc_case("berkey_type", "vcalc(vi, cluster = trial, type = outcome, rho = 0.4, data = dat.berkey1998)",
             vcalc(vi, cluster = trial, type = outcome, rho = 0.4, data = dat),
             list(data = "berkey", type = "outcome", rho = 0.4, cluster = "trial")))
imp <- impute_covariance_matrix(vc$vi, vc$cluster, r = 0.6, return_list = FALSE)
vcalc_cases[[length(vcalc_cases) + 1]] <- list(
  name = "impute_constant", call = "clubSandwich::impute_covariance_matrix(vi, cluster, r = 0.6, return_list = FALSE)",
  args = list(rho = 0.6), V = mat(as.matrix(imp)), warnings = list())

## ---------------------------------------------------------------- write
out <- list(
  generated_by = "tests/reference/make_robust_references.R",
  R = R.version.string,
  packages = list(metafor = as.character(packageVersion("metafor")),
                  clubSandwich = as.character(packageVersion("clubSandwich"))),
  cases = unname(lapply(names(cases), function(nm) c(list(name = nm), cases[[nm]]))),
  vcalc = vcalc_cases)
writeLines(toJSON(out, auto_unbox = TRUE, digits = I(17), pretty = TRUE, null = "null", na = "null"),
           file.path(REF_DIR, "robust_reference.json"))
cat("wrote", file.path(REF_DIR, "robust_reference.json"), "\n")
