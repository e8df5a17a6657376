#!/usr/bin/env Rscript
## Reference values for ANOVA tables, Kenward-Roger inference, estimated marginal means
## and profile-likelihood intervals of linear mixed models (lmerTest, pbkrtest, emmeans,
## lme4), and for Wald-type ANOVA tables and marginal means of a meta-regression
## (metafor, emmeans).
##
## Run from the repository root:
##
##     Rscript tests/reference/make_anova.R
##
## Inputs : nlme's Orthodont, lme4's sleepstudy, metadat's dat.bcg and a seeded
##          synthetic split-plot design; all are first written to
##          tests/reference/data/{orthodont,sleepstudy,splitplot,bcg}.csv and the fits
##          read those files back, so R and the tests see the same numbers.
## Outputs: those CSV files and tests/reference/anova_reference.json.
##
## Packages: lme4, lmerTest, pbkrtest, emmeans, metafor, metadat, nlme, jsonlite.
##
## Per mixed-model case (REML fits, refitted with bobyqa and tight tolerances so the
## optimum is the reference optimum):
##   fixef / vcov / vcov_kr  : estimates, vcov(fit) and pbkrtest::vcovAdj(fit)
##   coef_satterthwaite / coef_kr : summary(fit, ddf=...) coefficient tables
##   anova3_satterthwaite / anova3_kr / anova1_satterthwaite / anova1_kr :
##       lmerTest::anova(fit, type=..., ddf=...) (NumDF, DenDF, F value, Pr(>F))
##   profile / profile_fine : lme4's confint(fit, method="profile") for the variance
##       parameters (sd, cor, sigma): the default profile, and a dense one
##       (delta.cutoff = 1/64) whose spline interpolation error is negligible
##   emmeans : emmeans(fit, specs, lmer.df=..., at=...) tables and their pairs()
## Coefficient names are written in mlmeta's spelling (``_cons``, ``Sex[T.Male]``).

suppressPackageStartupMessages({
  library(lme4)
  library(lmerTest)
  library(pbkrtest)
  library(emmeans)
  library(metafor)
  library(jsonlite)
})

if (!file.exists("src/mlmeta")) stop("run from the repository root")
REF_DIR <- "tests/reference"
DATA_DIR <- file.path(REF_DIR, "data")
emm_options(pbkrtest.limit = 1e5, lmerTest.limit = 1e5)

## ---------------------------------------------------------------- data
data(Orthodont, package = "nlme")
orth <- data.frame(distance = Orthodont$distance, age = Orthodont$age,
                   agec = Orthodont$age - 11, Subject = as.character(Orthodont$Subject),
                   Sex = as.character(Orthodont$Sex))
write.csv(orth, file.path(DATA_DIR, "orthodont.csv"), row.names = FALSE)
sleep <- data.frame(Reaction = sleepstudy$Reaction, Days = sleepstudy$Days,
                    Subject = as.character(sleepstudy$Subject))
write.csv(sleep, file.path(DATA_DIR, "sleepstudy.csv"), row.names = FALSE)

## split-plot: 14 blocks (B between blocks), 3 plots per block, A (3 levels) within plots,
## covariate x, 2 replicates per cell, about 15 % of the rows dropped (unbalanced)
set.seed(15)
rows <- list()
for (g in 1:14) {
  B <- c("ctl", "trt")[1 + g %% 2]
  u <- rnorm(1, 0, 1.2)
  for (s in 1:3) {
    v <- rnorm(1, 0, 0.7)
    for (A in c("hi", "lo", "mid")) for (r in 1:2) {
      x <- round(runif(1, 0, 10), 2)
      mu <- 10 + c(hi = 1.5, lo = 0, mid = 0.6)[[A]] + (B == "trt") * 0.8 +
        (B == "trt") * (A == "hi") * 1.1 + 0.3 * x
      rows[[length(rows) + 1]] <- data.frame(y = round(mu + u + v + rnorm(1), 4), A = A, B = B,
                                             x = x, block = g, plot = s)
    }
  }
}
spl <- do.call(rbind, rows)
spl <- spl[sort(sample(nrow(spl), round(0.85 * nrow(spl)))), ]
write.csv(spl, file.path(DATA_DIR, "splitplot.csv"), row.names = FALSE)

dat <- escalc(measure = "RR", ai = tpos, bi = tneg, ci = cpos, di = cneg, data = metadat::dat.bcg)
bcg <- data.frame(trial = dat$trial, yi = as.numeric(dat$yi), vi = as.numeric(dat$vi),
                  alloc = as.character(dat$alloc), ablat = dat$ablat, year = dat$year)
write.csv(bcg, file.path(DATA_DIR, "bcg.csv"), row.names = FALSE)

orth <- read.csv(file.path(DATA_DIR, "orthodont.csv"))
sleep <- read.csv(file.path(DATA_DIR, "sleepstudy.csv"))
spl <- read.csv(file.path(DATA_DIR, "splitplot.csv"))
bcg <- read.csv(file.path(DATA_DIR, "bcg.csv"))
for (v in c("Subject", "Sex")) orth[[v]] <- factor(orth[[v]])
sleep$Subject <- factor(sleep$Subject)
for (v in c("A", "B")) spl[[v]] <- factor(spl[[v]])
bcg$alloc <- factor(bcg$alloc)

## ---------------------------------------------------------------- helpers
## R coefficient name -> mlmeta's ("(Intercept)" -> "_cons", "SexMale" -> "Sex[T.Male]")
py_name <- function(nm, xlev) {
  if (nm == "(Intercept)") return("_cons")
  parts <- strsplit(nm, ":", fixed = TRUE)[[1]]
  parts <- vapply(parts, function(p) {
    for (f in names(xlev)) for (l in xlev[[f]]) if (p == paste0(f, l)) return(paste0(f, "[T.", l, "]"))
    p
  }, "")
  paste(parts, collapse = ":")
}
mat <- function(m) unname(lapply(seq_len(nrow(m)), function(i) unname(as.numeric(m[i, ]))))
table_rows <- function(df, cols, keys = cols) {
  out <- list()
  for (i in seq_len(nrow(df))) {
    out[[rownames(df)[i]]] <- setNames(as.list(as.numeric(df[i, cols])), keys)
  }
  out
}
anova_table <- function(fit, type, ddf) {
  a <- as.data.frame(anova(fit, type = type, ddf = ddf))
  table_rows(a, c("NumDF", "DenDF", "F value", "Pr(>F)"), c("df_num", "df_den", "F", "pvalue"))
}
coef_table <- function(fit, ddf, xlev) {
  s <- summary(fit, ddf = ddf)$coefficients
  rownames(s) <- vapply(rownames(s), py_name, "", xlev = xlev)
  table_rows(as.data.frame(s), c("Estimate", "Std. Error", "df", "t value", "Pr(>|t|)"),
             c("coef", "std_err", "df", "t", "pvalue"))
}
emm_frame <- function(em) {
  s <- as.data.frame(summary(em))
  lo <- if ("lower.CL" %in% names(s)) "lower.CL" else "asymp.LCL"
  hi <- if ("upper.CL" %in% names(s)) "upper.CL" else "asymp.UCL"
  facs <- setdiff(names(s), c("emmean", "SE", "df", lo, hi))
  list(levels = lapply(facs, function(f) as.character(s[[f]])), factors = facs,
       emmean = s$emmean, se = s$SE, df = s$df, lower = s[[lo]], upper = s[[hi]])
}
pairs_frame <- function(em, adjust) {
  p <- as.data.frame(summary(pairs(em, adjust = adjust)))
  stat <- if ("t.ratio" %in% names(p)) "t.ratio" else "z.ratio"
  list(adjust = adjust, contrast = as.character(p$contrast), estimate = p$estimate, se = p$SE,
       df = p$df, t = p[[stat]], pvalue = p$p.value)
}
profile_rows <- function(ci, fit) {
  ## lme4's names with oldNames = FALSE: sd_(Intercept)|Subject, cor_Days.(Intercept)|Subject, sigma
  keep <- grepl("^(sd_|cor_|sigma)", rownames(ci))
  out <- list()
  for (nm in rownames(ci)[keep]) out[[nm]] <- c(ci[nm, 1], ci[nm, 2])
  out
}

lmm_case <- function(name, formula, data, data_file, py_formula, emm = list(), profile = TRUE) {
  message("case ", name)
  fit0 <- lmer(as.formula(formula), data = data, REML = TRUE)
  fit <- update(fit0, start = getME(fit0, "theta"),
                control = lmerControl(optimizer = "bobyqa",
                                      optCtrl = list(maxfun = 1e5, rhobeg = 1e-3, rhoend = 1e-12)))
  xlev <- fit@frame[vapply(fit@frame, is.factor, TRUE)]
  xlev <- lapply(xlev, levels)
  fe <- fixef(fit)
  names(fe) <- vapply(names(fe), py_name, "", xlev = xlev)
  case <- list(
    name = name, data = data_file, formula = py_formula, r_formula = formula,
    names = names(fe), fixef = unname(fe), sigma = sigma(fit), theta = unname(getME(fit, "theta")),
    vcov = mat(as.matrix(vcov(fit))), vcov_kr = mat(as.matrix(vcovAdj(fit))),
    coef_satterthwaite = coef_table(fit, "Satterthwaite", xlev),
    coef_kr = coef_table(fit, "Kenward-Roger", xlev),
    anova3_satterthwaite = anova_table(fit, "III", "Satterthwaite"),
    anova3_kr = anova_table(fit, "III", "Kenward-Roger"),
    anova1_satterthwaite = anova_table(fit, "I", "Satterthwaite"),
    anova1_kr = anova_table(fit, "I", "Kenward-Roger"))
  if (profile) {
    ci <- confint(fit, method = "profile", oldNames = FALSE, parm = "theta_")
    pr <- profile(fit, which = "theta_", delta.cutoff = 1 / 64, maxpts = 400, signames = FALSE)
    ci_fine <- confint(pr)
    case$profile <- profile_rows(ci, fit)
    case$profile_fine <- profile_rows(ci_fine, fit)
  }
  case$emmeans <- lapply(emm, function(e) {
    args <- list(fit, specs = e$specs, lmer.df = e$ddf)
    if (!is.null(e$at)) args$at <- e$at
    em <- do.call(emmeans, args)
    c(list(specs = e$specs, ddf = e$ddf, at = e$at, table = emm_frame(em)),
      list(pairs = lapply(e$adjust, function(a) pairs_frame(em, a))))
  })
  case
}

cases <- list(
  lmm_case("orthodont_ri", "distance ~ agec * Sex + (1 | Subject)", orth,
           "tests/reference/data/orthodont.csv", "distance ~ agec * Sex + (1 | Subject)",
           emm = list(list(specs = "Sex", ddf = "kenward-roger", adjust = c("tukey", "none")),
                      list(specs = "Sex", ddf = "satterthwaite", adjust = c("none")),
                      list(specs = "Sex", ddf = "kenward-roger", at = list(agec = 2),
                           adjust = c("none")))),
  lmm_case("orthodont_slope", "distance ~ agec * Sex + (agec | Subject)", orth,
           "tests/reference/data/orthodont.csv", "distance ~ agec * Sex + (1 + agec | Subject)",
           emm = list(list(specs = "Sex", ddf = "kenward-roger", adjust = c("none")))),
  lmm_case("sleepstudy", "Reaction ~ Days + (Days | Subject)", sleep,
           "tests/reference/data/sleepstudy.csv", "Reaction ~ Days + (1 + Days | Subject)"),
  lmm_case("sleepstudy_indep", "Reaction ~ Days + (Days || Subject)", sleep,
           "tests/reference/data/sleepstudy.csv", "Reaction ~ Days + (1 + Days || Subject)",
           profile = FALSE),
  lmm_case("splitplot", "y ~ A * B + x + (1 | block/plot)", spl,
           "tests/reference/data/splitplot.csv", "y ~ A * B + x + (1 | block/plot)",
           emm = list(list(specs = "A", ddf = "kenward-roger", adjust = c("tukey", "none", "holm",
                                                                          "bonferroni", "sidak")),
                      list(specs = "A", ddf = "satterthwaite", adjust = c("tukey")),
                      list(specs = c("A", "B"), ddf = "kenward-roger", adjust = c("tukey")),
                      list(specs = "B", ddf = "satterthwaite", at = list(x = 3), adjust = c("none"))))
)

## ---------------------------------------------------------------- meta-regression
meta_case <- function(name, mods, test) {
  message("case ", name)
  res <- rma.mv(yi, vi, mods = as.formula(mods), random = ~ 1 | trial, data = bcg, test = test)
  X <- model.matrix(as.formula(mods), data = bcg)
  asg <- attr(X, "assign")
  labs <- attr(terms(as.formula(mods)), "term.labels")
  xlev <- list(alloc = levels(bcg$alloc))
  tab <- list()
  for (k in seq_along(labs)) {
    a <- anova(res, btt = which(asg == k))
    tab[[labs[k]]] <- if (test == "t") list(F = a$QM, df_num = a$QMdf[1], df_den = a$QMdf[2], pvalue = a$QMp)
                      else list(chi2 = a$QM, df_num = a$QMdf[1], pvalue = a$QMp)
  }
  b <- as.numeric(coef(res))
  V <- vcov(res)
  df <- if (test == "t") res$ddf[[1]] else Inf
  rg <- qdrg(as.formula(mods), data = bcg, coef = b, vcov = V, df = df)
  em <- emmeans(rg, "alloc")
  list(name = name, data = "tests/reference/data/bcg.csv", formula = paste("yi ~", sub("~", "", mods), "+ (1 | trial)"),
       test = test, names = vapply(colnames(X), py_name, "", xlev = xlev), fixef = b, anova = tab,
       emmeans = list(list(specs = "alloc", ddf = if (test == "t") "t" else "z",
                           table = emm_frame(em), pairs = list(pairs_frame(em, "tukey"), pairs_frame(em, "none")))))
}
meta <- list(meta_case("bcg_z", "~ alloc + ablat", "z"), meta_case("bcg_t", "~ alloc + ablat", "t"))

out <- list(
  generated_by = "tests/reference/make_anova.R",
  versions = lapply(c(R = "base", lme4 = "lme4", lmerTest = "lmerTest", pbkrtest = "pbkrtest",
                      emmeans = "emmeans", metafor = "metafor"),
                    function(p) as.character(packageVersion(p))),
  mixed = setNames(cases, vapply(cases, `[[`, "", "name")),
  meta = setNames(meta, vapply(meta, `[[`, "", "name")))
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE, null = "null", na = "null"),
           file.path(REF_DIR, "anova_reference.json"))
message("wrote ", file.path(REF_DIR, "anova_reference.json"))
