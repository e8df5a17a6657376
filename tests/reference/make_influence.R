#!/usr/bin/env Rscript
## Reference values for mlmeta's influence diagnostics and the multilevel Egger-type test.
##
## Run from the repository root:
##
##     Rscript tests/reference/make_influence.R
##
## Inputs : src/mlmeta/datasets/{schoolcal,berkey}.csv (bundled data),
##          tests/reference/data/mixed_g10_o5_sd1_s11.csv (made by make_mixed_references.R)
## Outputs: tests/reference/data/sleepstudy.csv (lme4's sleepstudy, written here)
##          tests/reference/influence_reference.json
##
## Packages: metafor (rma.mv, cooks.distance, hatvalues, rstudent, dfbetas), clubSandwich
## (coef_test with CR2), lme4 (lmer, influence.merMod, hatvalues, rstudent), jsonlite.
## Numbers are written with 17 significant digits.
##
## "meta" cases: rma.mv fits with tight optimiser control (bobyqa, rhoend 1e-12), which
## metafor hands on to every deletion refit (reestimate = TRUE: the variance components
## are re-estimated in each deletion fit, started from the full-data estimates). Stored
## per row: cooks.distance, hatvalues, rstudent()$z, dfbetas; per cluster (cluster =):
## cooks.distance, rstudent()$cluster$X2, dfbetas.
##
## "egger" cases: rma.mv(yi, V, mods = ~ <moderators> + sqrt(vi), random = ...), the
## coefficient of sqrt(vi) (or of vi) with its z test, t tests on residual and
## containment df, and clubSandwich's coef_test(vcov = "CR2", test = "Satterthwaite").
##
## "mixed" cases: lmer fits (REML, tight bobyqa control); deletion refits (one row, or one
## group) as lme4's influence.merMod does them (update(model, subset = ..., start =
## theta)), but with the same tight control instead of influence.merMod's default
## optimiser settings; lme4's own cooks.distance / dfbetas methods are applied to the
## resulting "influence.merMod" object. hatvalues() and rstudent() are lme4's
## (no refits). X2 per group is metafor's cluster statistic computed from the lme4
## deletion fits: r' (M + X Var(b_(-c)) X')^-1 r with r = y_c - X_c b_(-c) and
## M = sigma2_(-c) I + Z_c Sigma_(-c) Z_c'. The largest relative difference between the
## tight and lme4's default-control deletion results is stored as "default_control_diff".

suppressPackageStartupMessages({
  library(metafor)
  library(clubSandwich)
  library(lme4)
  library(jsonlite)
})

if (!file.exists("src/mlmeta/datasets")) stop("run from the repository root")
REF_DIR <- "tests/reference"
dir.create(file.path(REF_DIR, "data"), showWarnings = FALSE)
ctl <- list(optimizer = "bobyqa", rhoend = 1e-12)

ml_names <- function(nm) {
  nm <- ifelse(nm %in% c("intrcpt", "(Intercept)"), "_cons", nm)
  nm <- sub("^outcome(AL|PD)$", "outcome[\\1]", nm)
  nm <- sub("^sqrt\\(vi\\)$|^sqrt\\(var\\)$", "sei", nm)
  nm
}
num <- function(x) unname(as.numeric(x))
cols <- function(df) setNames(lapply(seq_len(ncol(df)), function(j) num(df[, j])), ml_names(colnames(df)))

meta_case <- function(fit, cluster, cluster_name) {
  rows <- list(cooks_distance = num(cooks.distance(fit)), hat = num(hatvalues(fit)),
               rstudent = num(rstudent(fit)$z), dfbetas = cols(dfbetas(fit)))
  cd <- cooks.distance(fit, cluster = cluster)
  rs <- rstudent(fit, cluster = cluster)
  db <- dfbetas(fit, cluster = cluster)
  stopifnot(identical(names(cd), as.character(rs$cluster$slab)),
            identical(names(cd), rownames(db)))
  clusters <- list(name = cluster_name, labels = names(cd), cooks_distance = num(cd),
                   X2 = num(rs$cluster$X2), k = num(rs$cluster$k), dfbetas = cols(db))
  nm <- ml_names(rownames(fit$beta))
  list(fit = list(params = setNames(as.list(num(fit$beta)), nm), sigma2 = as.list(fit$sigma2),
                  tau2 = as.list(fit$tau2), rho = as.list(fit$rho), llf = as.numeric(logLik(fit))),
       rows = rows, clusters = clusters)
}

## ---------------------------------------------------------------- influence, rma.mv
sc <- read.csv("src/mlmeta/datasets/schoolcal.csv")
dat <- read.csv("src/mlmeta/datasets/berkey.csv")
dat$outcome <- factor(dat$outcome)
V <- bldiag(lapply(split(dat[, c("v1i", "v2i")], dat$trial), as.matrix))

meta <- list()
fit <- rma.mv(stdmdiff, var, random = ~ 1 | district / school, data = sc, control = ctl)
meta$schoolcal_3level <- c(list(
  data = "schoolcal", formula = "stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
  variance = "var", method = "reml", cluster = "district",
  source = "rma.mv(stdmdiff, var, random = ~ 1 | district/school, data = dat)"),
  meta_case(fit, sc$district, "district"))

fit <- rma.mv(stdmdiff, var, mods = ~ year_c, random = ~ 1 | district / school, data = sc,
              control = ctl)
meta$schoolcal_metareg <- c(list(
  data = "schoolcal", formula = "stdmdiff ~ year_c + (1 | district) + (1 | district:school)",
  variance = "var", method = "reml", cluster = "district",
  source = "rma.mv(stdmdiff, var, mods = ~ year_c, random = ~ 1 | district/school, data = dat)"),
  meta_case(fit, sc$district, "district"))

fit <- rma.mv(stdmdiff, var, mods = ~ year_c, random = ~ 1 | district / school, data = sc,
              method = "ML", control = ctl)
meta$schoolcal_metareg_ml <- c(list(
  data = "schoolcal", formula = "stdmdiff ~ year_c + (1 | district) + (1 | district:school)",
  variance = "var", method = "ml", cluster = "district",
  source = "rma.mv(stdmdiff, var, mods = ~ year_c, random = ~ 1 | district/school, data = dat, method = 'ML')"),
  meta_case(fit, sc$district, "district"))

fit <- rma.mv(yi, V, mods = ~ outcome - 1, random = ~ outcome | trial, struct = "UN",
              data = dat, control = ctl)
meta$berkey_V <- c(list(
  data = "berkey", formula = "yi ~ 0 + outcome + (0 + outcome | trial)",
  V = "block-diagonal by trial from columns v1i, v2i", method = "reml", cluster = "trial",
  source = "rma.mv(yi, V, mods = ~ outcome - 1, random = ~ outcome | trial, struct = 'UN', data = dat)"),
  meta_case(fit, dat$trial, "trial"))

## ---------------------------------------------------------------- Egger-type test
egger_block <- function(fit, coef, cluster) {
  i <- which(ml_names(rownames(fit$beta)) == coef)
  z <- list(coef = fit$beta[i, 1], se = fit$se[i], statistic = fit$zval[i], pvalue = fit$pval[i])
  cs <- coef_test(fit, vcov = "CR2", cluster = cluster, test = "Satterthwaite")
  cr2 <- list(coef = cs$beta[i], se = cs$SE[i], statistic = cs$tstat[i], df = cs$df_Satt[i],
              pvalue = cs$p_Satt[i])
  tt <- function(dfs) {
    f <- update(fit, test = "t", dfs = dfs)
    list(statistic = f$zval[i], df = as.numeric(f$ddf[i]), pvalue = f$pval[i])
  }
  list(z = z, t_residual = tt("residual"), t_contain = tt("contain"), CR2 = cr2)
}

egger <- list()
fit <- rma.mv(stdmdiff, var, mods = ~ sqrt(var), random = ~ 1 | district / school, data = sc,
              control = ctl)
egger$schoolcal_sei <- c(list(
  data = "schoolcal", formula = "stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
  variance = "var", method = "reml", predictor = "sei", coef = "sei", cluster = "district",
  source = "rma.mv(stdmdiff, var, mods = ~ sqrt(var), random = ~ 1 | district/school, data = dat)"),
  egger_block(fit, "sei", sc$district))

fit <- rma.mv(stdmdiff, var, mods = ~ var, random = ~ 1 | district / school, data = sc,
              control = ctl)
egger$schoolcal_vi <- c(list(
  data = "schoolcal", formula = "stdmdiff ~ 1 + (1 | district) + (1 | district:school)",
  variance = "var", method = "reml", predictor = "vi", coef = "var", cluster = "district",
  source = "rma.mv(stdmdiff, var, mods = ~ var, random = ~ 1 | district/school, data = dat)"),
  egger_block(fit, "var", sc$district))

fit <- rma.mv(stdmdiff, var, mods = ~ year_c + sqrt(var), random = ~ 1 | district / school,
              data = sc, control = ctl)
egger$schoolcal_metareg_sei <- c(list(
  data = "schoolcal", formula = "stdmdiff ~ year_c + (1 | district) + (1 | district:school)",
  variance = "var", method = "reml", predictor = "sei", coef = "sei", cluster = "district",
  source = "rma.mv(stdmdiff, var, mods = ~ year_c + sqrt(var), random = ~ 1 | district/school, data = dat)"),
  egger_block(fit, "sei", sc$district))

fit <- rma.mv(yi, V, mods = ~ outcome - 1 + sqrt(vi), random = ~ outcome | trial, struct = "UN",
              data = dat, control = ctl)
egger$berkey_V_sei <- c(list(
  data = "berkey", formula = "yi ~ 0 + outcome + (0 + outcome | trial)",
  V = "block-diagonal by trial from columns v1i, v2i", method = "reml", predictor = "sei",
  coef = "sei", cluster = "trial",
  source = "rma.mv(yi, V, mods = ~ outcome - 1 + sqrt(vi), random = ~ outcome | trial, struct = 'UN', data = dat)"),
  egger_block(fit, "sei", dat$trial))

## ---------------------------------------------------------------- mixed models, lme4
write.csv(sleepstudy, file.path(REF_DIR, "data", "sleepstudy.csv"), row.names = FALSE)
tight <- lmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5, rhoend = 1e-12))

deletion_fits <- function(m, data, del, control) {
  th <- getME(m, "theta")
  lapply(unique(del), function(d) {
    data$.keep <- del != d
    suppressWarnings(suppressMessages(update(m, data = data, subset = .keep,
                                             start = list(theta = th), control = control)))
  })
}

## an "influence.merMod" object built as lme4's influence() builds it, from given refits
as_influence <- function(m, fits, del, groups) {
  ids <- unique(del)
  fixed.1 <- t(sapply(fits, fixef))
  if (length(fixef(m)) == 1) fixed.1 <- t(fixed.1)
  rownames(fixed.1) <- ids
  vcov.1 <- lapply(fits, function(f) as.matrix(vcov(f)))
  names(vcov.1) <- ids
  out <- list(fixef(m), fixed.1, NULL, NULL, as.matrix(vcov(m)), vcov.1, groups, ids, NULL, NULL)
  names(out) <- c("fixed.effects", paste0("fixed.effects[-", groups, "]"), "var.cov.comps",
                  paste0("var.cov.comps[-", groups, "]"), "vcov", paste0("vcov[-", groups, "]"),
                  "groups", "deleted", "converged", "function.evals")
  class(out) <- "influence.merMod"
  out
}

## metafor's cluster statistic from lme4 deletion fits (one random term, grouped by `g`)
X2_mixed <- function(m, data, fits, del) {
  X <- getME(m, "X")
  y <- getME(m, "y")
  term <- names(getME(m, "cnms"))[1]
  slopes <- setdiff(getME(m, "cnms")[[1]], "(Intercept)")
  Zf <- model.matrix(as.formula(paste("~", paste(c("1", slopes), collapse = "+"))), data)
  mapply(function(d, f) {
    rows <- which(del == d)
    Xc <- X[rows, , drop = FALSE]
    Zc <- Zf[rows, , drop = FALSE]
    S <- as.matrix(VarCorr(f)[[term]])
    M <- sigma(f)^2 * diag(length(rows)) + Zc %*% S %*% t(Zc)
    r <- y[rows] - Xc %*% fixef(f)
    c(t(r) %*% solve(M + Xc %*% as.matrix(vcov(f)) %*% t(Xc), r))
  }, unique(del), fits)
}

rel_diff <- function(a, b) max(abs(a - b) / pmax(abs(b), 1e-8))

mixed_case <- function(formula, data, group) {
  m <- lmer(as.formula(formula), data = data, REML = TRUE, control = tight)
  rows_del <- seq_len(nrow(data))
  rfits <- deletion_fits(m, data, rows_del, tight)
  ri <- as_influence(m, rfits, rows_del, "case")
  default_r <- influence(m)          # lme4's own, default optimiser settings
  g_del <- data[[group]]
  gfits <- deletion_fits(m, data, g_del, tight)
  gi <- as_influence(m, gfits, g_del, group)
  default_g <- influence(m, groups = group)
  ord <- order(unique(g_del))
  list(
    fit = list(fixef = setNames(as.list(num(fixef(m))), ml_names(names(fixef(m)))),
               theta = num(getME(m, "theta")), sigma = sigma(m)),
    rows = list(cooks_distance = num(cooks.distance(ri)), hat = num(hatvalues(m)),
                rstudent = num(rstudent(m)), dfbetas = cols(dfbetas(ri))),
    clusters = list(name = group, labels = as.character(unique(g_del))[ord],
                    cooks_distance = num(cooks.distance(gi))[ord],
                    X2 = num(X2_mixed(m, data, gfits, g_del))[ord],
                    dfbetas = lapply(cols(dfbetas(gi)), function(v) v[ord])),
    default_control_diff = list(
      rows_cooks = rel_diff(cooks.distance(default_r), cooks.distance(ri)),
      rows_dfbetas = rel_diff(as.matrix(dfbetas(default_r)), as.matrix(dfbetas(ri))),
      clusters_cooks = rel_diff(cooks.distance(default_g), cooks.distance(gi)),
      clusters_dfbetas = rel_diff(as.matrix(dfbetas(default_g)), as.matrix(dfbetas(gi)))))
}

mixed <- list()
ss <- read.csv(file.path(REF_DIR, "data", "sleepstudy.csv"))
mixed$sleepstudy_slopes <- c(list(
  data = "tests/reference/data/sleepstudy.csv", formula = "Reaction ~ Days + (Days | Subject)",
  method = "reml", cluster = "Subject",
  source = "lmer(Reaction ~ Days + (Days | Subject), data = sleepstudy)"),
  mixed_case("Reaction ~ Days + (Days | Subject)", ss, "Subject"))

g10 <- read.csv(file.path(REF_DIR, "data", "mixed_g10_o5_sd1_s11.csv"))
mixed$g10_intercept <- c(list(
  data = "tests/reference/data/mixed_g10_o5_sd1_s11.csv",
  formula = "DV ~ IV1 + IV2 + IV3 + (1 | Group)", method = "reml", cluster = "Group",
  source = "lmer(DV ~ IV1 + IV2 + IV3 + (1 | Group), data = dat)"),
  mixed_case("DV ~ IV1 + IV2 + IV3 + (1 | Group)", g10, "Group"))

## ---------------------------------------------------------------- write
out <- list(generated_by = "tests/reference/make_influence.R", R = R.version.string,
            metafor = as.character(packageVersion("metafor")),
            clubSandwich = as.character(packageVersion("clubSandwich")),
            lme4 = as.character(packageVersion("lme4")),
            meta = meta, egger = egger, mixed = mixed)
writeLines(toJSON(out, auto_unbox = TRUE, digits = I(17), pretty = TRUE, null = "null", na = "null"),
           file.path(REF_DIR, "influence_reference.json"))
cat("wrote", file.path(REF_DIR, "influence_reference.json"), "\n")
