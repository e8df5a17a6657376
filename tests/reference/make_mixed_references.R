#!/usr/bin/env Rscript
## Reference fits of linear mixed models for mlmeta.mixed: lme4 and lmerTest on the
## repeated-measures design of the simulation study (pymer4's simulate_lmm; data
## from mlmeta.simulate.lmm).
##
## Run from the repository root (mlmeta importable by `python`):
##
##     Rscript tests/reference/make_mixed_references.R
##
## Inputs : none; the data are simulated first by mlmeta.simulate.lmm (seeded) and
##          written to tests/reference/data/mixed_*.csv.
## Outputs: tests/reference/data/mixed_*.csv, tests/reference/mixed_reference.json
##
## Packages: lme4, lmerTest, jsonlite.
##
## Each dataset is fitted with DV ~ IV1 + IV2 + IV3 + (IV1 + IV2 + IV3 | Group) ("full")
## and DV ~ IV1 + IV2 + IV3 + (1 | Group) ("intercept"), by REML and ML, twice:
##   "default": lmerTest::lmer with lme4's default control (what a user gets), with
##              the convergence warnings and singular-fit message it raises;
##   "refit"  : the same model refitted with bobyqa, maxfun 1e5, from the default
##              fit's theta, with tight tolerances (the reference optimum).
## Stored per fit: logLik (lme4's convention: REML criterion without the
## 1/2 log|X'X| term), fixef, vcov, sigma^2, the random-effects covariance in
## lme4's order ((Intercept) first), theta, isSingular, the warnings and the
## lmerTest Satterthwaite df of summary(fit).

suppressPackageStartupMessages({
  library(lme4)
  library(lmerTest)
  library(jsonlite)
})

if (!file.exists("src/mlmeta")) stop("run from the repository root")
REF_DIR <- "tests/reference"
dir.create(file.path(REF_DIR, "data"), showWarnings = FALSE)

## name, groups, obs per group, group SD, seed
DESIGNS <- data.frame(
  name = c("essay_s1", "essay_s2", "essay_s3", "essay_s4", "essay_sd0.1_s5", "essay_sd0.1_s6",
           "essay_sd4_s7", "g10_o5_sd0.1_s8", "g10_o25_sd0.1_s9", "g30_o5_sd0.25_s10",
           "g10_o5_sd1_s11", "g30_o5_sd0.1_s12"),
  groups = c(50, 50, 50, 50, 50, 50, 50, 10, 10, 30, 10, 30),
  obs = c(50, 50, 50, 50, 50, 50, 50, 5, 25, 5, 5, 5),
  sd = c(0.25, 0.25, 0.25, 0.25, 0.1, 0.1, 4, 0.1, 0.1, 0.25, 1, 0.1),
  seed = c(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12),
  stringsAsFactors = FALSE)

py <- paste0('
from mlmeta.simulate import lmm
designs = ', toJSON(DESIGNS, dataframe = "rows"), '
for d in designs:
    data, _, _ = lmm(int(d["obs"]), 3, int(d["groups"]), group_sd=d["sd"], seed=int(d["seed"]))
    data.to_csv("tests/reference/data/mixed_%s.csv" % d["name"], index=False, float_format="%.17g")
')
## R puts its own libraries on LD_LIBRARY_PATH, which can hide the Python packages.
status <- system2("env", c("-u", "LD_LIBRARY_PATH", Sys.getenv("PYTHON", "python"), "-c", shQuote(py)))
if (status != 0) stop("python data generation failed")

mat <- function(m) unname(lapply(seq_len(nrow(m)), function(i) unname(as.numeric(m[i, ]))))
FORMULAS <- c(full = "DV ~ IV1 + IV2 + IV3 + (IV1 + IV2 + IV3 | Group)",
              intercept = "DV ~ IV1 + IV2 + IV3 + (1 | Group)")

describe <- function(fit, warns) {
  vc <- VarCorr(fit)$Group
  co <- summary(fit)$coefficients
  list(llf = as.numeric(logLik(fit)), fixef = unname(fixef(fit)), names = names(fixef(fit)),
       vcov = mat(as.matrix(vcov(fit))), sigma2 = sigma(fit)^2,
       re_cov = mat(matrix(as.numeric(vc), nrow(vc))), re_names = rownames(vc),
       theta = unname(getME(fit, "theta")), singular = isSingular(fit),
       df_satterthwaite = unname(co[, "df"]),
       conv_messages = as.list(c(fit@optinfo$conv$lme4$messages, fit@optinfo$warnings)),
       warnings = as.list(warns))
}

fit_with_warnings <- function(expr) {
  warns <- character(0)
  fit <- withCallingHandlers(expr, warning = function(w) {
    warns <<- c(warns, conditionMessage(w)); invokeRestart("muffleWarning")
  }, message = function(m) {
    warns <<- c(warns, trimws(conditionMessage(m))); invokeRestart("muffleMessage")
  })
  list(fit = fit, warnings = warns)
}

cases <- list()
for (i in seq_len(nrow(DESIGNS))) {
  d <- DESIGNS[i, ]
  file <- file.path(REF_DIR, "data", sprintf("mixed_%s.csv", d$name))
  dat <- read.csv(file)
  for (model in names(FORMULAS)) {
    for (reml in c(TRUE, FALSE)) {
      f <- as.formula(FORMULAS[[model]])
      a <- fit_with_warnings(lmerTest::lmer(f, data = dat, REML = reml))
      tight <- lmerControl(optimizer = "bobyqa",
                           optCtrl = list(maxfun = 1e5, rhobeg = 1e-3, rhoend = 1e-12))
      b <- fit_with_warnings(lmerTest::lmer(f, data = dat, REML = reml, control = tight,
                                            start = list(theta = getME(a$fit, "theta"))))
      cases[[length(cases) + 1]] <- list(
        name = sprintf("%s_%s_%s", d$name, model, if (reml) "reml" else "ml"),
        dataset = d$name, data = file, groups = d$groups, obs_per_group = d$obs,
        group_sd = d$sd, seed = d$seed, model = model, formula = FORMULAS[[model]],
        method = if (reml) "reml" else "ml",
        default = describe(a$fit, a$warnings), refit = describe(b$fit, b$warnings))
    }
  }
}

ref <- list(generated_by = "tests/reference/make_mixed_references.R", R = R.version.string,
            lme4 = as.character(packageVersion("lme4")),
            lmerTest = as.character(packageVersion("lmerTest")),
            simulator = "mlmeta.simulate.lmm(obs_per_group, 3, groups, group_sd=group_sd, seed=seed)",
            cases = cases)
writeLines(toJSON(ref, auto_unbox = TRUE, digits = NA, pretty = TRUE),
           file.path(REF_DIR, "mixed_reference.json"))
cat("wrote", length(cases), "cases to", file.path(REF_DIR, "mixed_reference.json"), "\n")
