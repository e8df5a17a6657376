#!/usr/bin/env Rscript
## Reference values for mlmeta's degrees-of-freedom rules:
##
##  * metafor's dfs = "contain" with random slopes ('~ inner | outer' terms: the
##    distinct (inner, outer) cells also contain a coefficient) and dfs = "residual";
##  * lmerTest's Satterthwaite df for single contrasts (contest1D) and the multi-df
##    F test (contest(..., joint = TRUE), i.e. contestMD).
##
## Run from the repository root:
##
##     Rscript tests/reference/make_df_references.R
##
## Input : src/mlmeta/datasets/schoolcal.csv, src/mlmeta/datasets/berkey.csv,
##         lme4's sleepstudy; seeded synthetic data (stored in the JSON itself, under
##         "data", so the tests need no CSV).
## Output: tests/reference/df_reference.json
##
## Coefficients are stored in metafor's/lme4's column order with the "intrcpt" /
## "(Intercept)" first; the tests map them by name (mlmeta's "_cons").
##
## metafor cases (REML, test = "t"):
##   schoolcal_gen  stdmdiff ~ year_c, random = list(~ year_c | district, ~ 1 | study),
##                  struct = "GEN"  == mlmeta (1 + year_c | district) + (1 | district:school)
##   berkey_un      yi ~ outcome, V = 2x2 blocks (v1i, v2i), random = ~ outcome | trial,
##                  struct = "UN"   == mlmeta (0 + outcome | trial), V blocks
##   synth_un       y ~ type + w, random = list(~ type | study, ~ 1 | esid), struct = "UN"
##                  == mlmeta (0 + type | study) + (1 | study:esid); 30 studies, types
##                  A/B with 1-3 effect sizes per (study, type); w varies by row.
## lmerTest cases (REML):
##   mixed_slope    y ~ x1 + x2 + f + (1 + x1 | subj); 30 subjects x 8 obs, x1 within,
##                  x2 between subjects, f a 3-level factor varying within subjects
##   sleepstudy     Reaction ~ Days + (Days | Subject)
##   nested         y ~ x + z + (1 | school) + (1 | school:class); 15 schools x 3 classes
##                  x 6 pupils, x pupil-level, z school-level

suppressPackageStartupMessages({
  library(metafor)
  library(lme4)
  library(lmerTest)
  library(jsonlite)
})

num <- function(x) unname(as.numeric(x))

meta_case <- function(fit_c, fit_r, hyp, names, joint = seq_along(hyp)) {
  ## fit_c: dfs = "contain"; fit_r: dfs = "residual"; hyp: list of contrast rows;
  ## joint: the rows (linearly independent) tested together
  an <- lapply(hyp, function(L) {
    L <- matrix(L, nrow = 1)
    a_c <- anova(fit_c, X = L)
    a_r <- anova(fit_r, X = L)
    list(L = num(L), F_contain = num(a_c$QM), ddf_contain = num(a_c$QMdf[2]),
         p_contain = num(a_c$QMp), F_residual = num(a_r$QM),
         ddf_residual = num(a_r$QMdf[2]), p_residual = num(a_r$QMp))
  })
  joint <- do.call(rbind, hyp[joint])
  j_c <- anova(fit_c, X = joint)
  j_r <- anova(fit_r, X = joint)
  list(names = names, beta = num(fit_c$beta), se = num(fit_c$se), ll = num(logLik(fit_c)),
       ddf_contain = num(fit_c$ddf), pval_contain = num(fit_c$pval),
       ci_lb_contain = num(fit_c$ci.lb), ci_ub_contain = num(fit_c$ci.ub),
       ddf_residual = num(fit_r$ddf), pval_residual = num(fit_r$pval),
       ci_lb_residual = num(fit_r$ci.lb), ci_ub_residual = num(fit_r$ci.ub),
       contrasts = an,
       joint = list(L = lapply(seq_len(nrow(joint)), function(i) num(joint[i, ])),
                    F_contain = num(j_c$QM), ddf_contain = num(j_c$QMdf[2]),
                    p_contain = num(j_c$QMp), F_residual = num(j_r$QM),
                    ddf_residual = num(j_r$QMdf[2]), p_residual = num(j_r$QMp)))
}

## -- schoolcal, continuous random slope (struct = "GEN") ---------------------------
school <- read.csv("src/mlmeta/datasets/schoolcal.csv")
gen <- function(dfs) rma.mv(stdmdiff, var, mods = ~ year_c,
                            random = list(~ year_c | district, ~ 1 | study),
                            struct = "GEN", data = school, test = "t", dfs = dfs)
schoolcal_gen <- meta_case(gen("contain"), gen("residual"),
                           list(c(0, 1), c(1, 10)), c("_cons", "year_c"))

## -- berkey, factor slope (struct = "UN", known 2x2 sampling covariances) ------------
berkey <- read.csv("src/mlmeta/datasets/berkey.csv")
berkey$outcome <- factor(berkey$outcome, levels = c("AL", "PD"))
Vb <- bldiag(lapply(split(berkey[, c("v1i", "v2i")], berkey$trial), as.matrix))
un_b <- function(dfs) rma.mv(yi, Vb, mods = ~ outcome, random = ~ outcome | trial,
                             struct = "UN", data = berkey, test = "t", dfs = dfs)
berkey_un <- meta_case(un_b("contain"), un_b("residual"),
                       list(c(0, 1), c(1, 1)), c("_cons", "outcome[T.PD]"))

## -- synthetic factor slope with repeated (study, type) cells -------------------------
set.seed(20240611)
rows <- list()
for (s in 1:30) for (ty in c("A", "B")) {
  m <- sample(1:3, 1)
  rows[[length(rows) + 1]] <- data.frame(study = s, type = ty, rep = seq_len(m))
}
syn <- do.call(rbind, rows)
syn$esid <- seq_len(nrow(syn))
syn$w <- round(rnorm(nrow(syn)), 3)
syn$v <- round(runif(nrow(syn), 0.01, 0.1), 4)
u <- matrix(rnorm(60, sd = 0.2), 30, 2)
syn$y <- round(0.2 + 0.15 * (syn$type == "B") + 0.1 * syn$w +
                 u[cbind(syn$study, ifelse(syn$type == "A", 1, 2))] +
                 rnorm(nrow(syn), sd = 0.1) + rnorm(nrow(syn), sd = sqrt(syn$v)), 4)
syn$type <- factor(syn$type)
un_s <- function(dfs) rma.mv(y, v, mods = ~ type + w, random = list(~ type | study, ~ 1 | esid),
                             struct = "UN", data = syn, test = "t", dfs = dfs)
synth_un <- meta_case(un_s("contain"), un_s("residual"),
                      list(c(0, 1, 0), c(0, 0, 1), c(0, 1, -1)), c("_cons", "type[T.B]", "w"), joint = 1:2)

## -- lmerTest ------------------------------------------------------------------------
mixed_case <- function(fit, rows1, joints, names) {
  one <- lapply(rows1, function(L) {
    c1 <- contest1D(fit, L)
    list(L = num(L), estimate = num(c1$Estimate), se = num(c1$`Std. Error`),
         df = num(c1$df), t = num(c1$`t value`), p = num(c1$`Pr(>|t|)`))
  })
  jt <- lapply(joints, function(J) {
    L <- J$L
    rhs <- if (is.null(J$rhs)) rep(0, nrow(L)) else J$rhs
    ct <- contest(fit, L, rhs = rhs, joint = TRUE)
    list(L = lapply(seq_len(nrow(L)), function(i) num(L[i, ])), rhs = num(rhs),
         F = num(ct$`F value`), ndf = num(ct$NumDF), ddf = num(ct$DenDF),
         p = num(ct$`Pr(>F)`))
  })
  sm <- summary(fit)$coefficients
  list(names = names, beta = num(fixef(fit)), df = num(sm[, "df"]),
       contrasts = one, joint = jt)
}

set.seed(4711)
ns <- 30; per <- 8
ms <- data.frame(subj = rep(1:ns, each = per))
ms$x1 <- round(rnorm(nrow(ms)), 3)
ms$x2 <- round(rep(rnorm(ns), each = per), 3)
ms$f <- factor(sample(c("a", "b", "c"), nrow(ms), replace = TRUE))
b0 <- rnorm(ns, sd = 1); b1 <- rnorm(ns, sd = 0.5)
ms$y <- round(1 + 0.3 * ms$x1 + 0.5 * ms$x2 + 0.4 * (ms$f == "b") - 0.2 * (ms$f == "c") +
                b0[ms$subj] + b1[ms$subj] * ms$x1 + rnorm(nrow(ms)), 4)
fit_ms <- lmer(y ~ x1 + x2 + f + (1 + x1 | subj), data = ms, REML = TRUE)
mixed_slope <- mixed_case(
  fit_ms,
  list(c(0, 1, 0, 0, 0), c(0, 0, 1, 0, 0), c(0, 1, -1, 0, 0), c(1, 0, 0, 1, 0)),
  list(list(L = rbind(c(0, 1, 0, 0, 0), c(0, 0, 1, 0, 0))),
       list(L = rbind(c(0, 0, 0, 1, 0), c(0, 0, 0, 0, 1))),
       list(L = rbind(c(0, 1, 0, 0, 0), c(0, 0, 1, 0, 0), c(0, 0, 0, 1, 0), c(0, 0, 0, 0, 1)),
            rhs = c(0.2, 0.5, 0, 0))),
  c("_cons", "x1", "x2", "f[T.b]", "f[T.c]"))

data(sleepstudy, package = "lme4")
fit_sl <- lmer(Reaction ~ Days + (Days | Subject), data = sleepstudy, REML = TRUE)
sleep <- mixed_case(fit_sl, list(c(0, 1), c(1, 5)),
                    list(list(L = rbind(c(1, 0), c(0, 1)))), c("_cons", "Days"))

set.seed(99)
ne <- expand.grid(pupil = 1:6, class = 1:3, school = 1:15)
ne <- ne[, c("school", "class", "pupil")]
ne$x <- round(rnorm(nrow(ne)), 3)
ne$z <- round(rnorm(15)[ne$school], 3)
ne$y <- round(0.5 + 0.2 * ne$x + 0.3 * ne$z + rnorm(15, sd = 0.7)[ne$school] +
                rnorm(45, sd = 0.5)[(ne$school - 1) * 3 + ne$class] + rnorm(nrow(ne)), 4)
fit_ne <- lmer(y ~ x + z + (1 | school) + (1 | school:class), data = ne, REML = TRUE)
nested <- mixed_case(fit_ne, list(c(0, 1, 0), c(0, 0, 1), c(0, 1, 1)),
                     list(list(L = rbind(c(0, 1, 0), c(0, 0, 1)))), c("_cons", "x", "z"))

cols <- function(d) lapply(d, function(v) if (is.factor(v)) as.character(v) else v)
out <- list(
  meta = list(schoolcal_gen = schoolcal_gen, berkey_un = berkey_un, synth_un = synth_un),
  mixed = list(mixed_slope = mixed_slope, sleepstudy = sleep, nested = nested),
  data = list(synth_un = cols(syn[, c("study", "type", "esid", "w", "v", "y")]),
              mixed_slope = cols(ms), nested = cols(ne),
              sleepstudy = cols(sleepstudy[, c("Reaction", "Days", "Subject")])),
  versions = list(R = R.version.string, metafor = as.character(packageVersion("metafor")),
                  lme4 = as.character(packageVersion("lme4")),
                  lmerTest = as.character(packageVersion("lmerTest"))))
json <- toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE)
writeLines(json, "tests/reference/df_reference.json")
