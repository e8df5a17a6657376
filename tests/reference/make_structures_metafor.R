# metafor's covariance structures over a factor's levels (AR, HAR, CAR, HCS) and its
# CS, UN, DIAG, ID, for tests/test_structures_metafor.py.
# Run from the repository root:
#   Rscript tests/reference/make_structures_metafor.R
# Writes tests/reference/data/ishak2007.csv, ishak2007_V.csv (the known sampling
# covariance, long form), longitudinal_sim.csv and tests/reference/structures_metafor.json.
#
# ishak2007: metadat's example for the data set (long format, missing occasions dropped,
# an AR(1) sampling covariance with phi = 0.97 from vcalc), fitted as
#   rma.mv(yi, V, mods = ~ factor(time) - 1, random = ~ time | study, struct = s)
# and, for CAR, over the times in years (3, 6, 12 months; the long-term follow-up,
# whose length varies by study, coded 2 years): random = ~ years | study.
# longitudinal_sim: a seeded simulated data set with diagonal sampling variances and
# unequally spaced times t (0, 0.5, 1.5, 3, 6), true effects with a CAR(0.6) covariance.
# mlmeta's model: yi ~ 0 + C(time) + (0 + C(<factor>) | study), covariance={"study": s},
# with the case's factor (years for ishak2007's CAR, else time) and V or variance="vi".
suppressMessages({library(metafor); library(jsonlite)})

# Each case: metafor's fit with bobyqa (tight) and with its default nlminb, then bobyqa
# (tight) again from the better of the two; the highest (restricted) likelihood is stored.
# (bobyqa from metafor's default start stops far short of the optimum in sim_hcs_*.)
tight <- list(optimizer = "bobyqa", rhoend = 1e-12, maxfun = 100000)

dat <- dat.ishak2007
dat <- reshape(dat, direction = "long", idvar = "study", v.names = c("yi", "vi"),
               varying = list(c(2, 4, 6, 8), c(3, 5, 7, 9)))
dat <- dat[order(dat$study, dat$time), ]
dat <- dat[!is.na(dat$yi), ]
rownames(dat) <- NULL
dat$years <- c(0.25, 0.5, 1, 2)[dat$time]
V <- vcalc(vi, cluster = study, time1 = time, phi = 0.97, data = dat)
write.csv(dat[, c("study", "time", "years", "yi", "vi")], "tests/reference/data/ishak2007.csv",
          row.names = FALSE)
nz <- which(V != 0, arr.ind = TRUE)
nz <- nz[order(nz[, 1], nz[, 2]), ]
write.csv(data.frame(row = nz[, 1], col = nz[, 2], value = sprintf("%.17g", V[nz])),
          "tests/reference/data/ishak2007_V.csv", row.names = FALSE, quote = FALSE)

set.seed(20240612)
tt <- c(0, 0.5, 1.5, 3, 6)
sim <- do.call(rbind, lapply(1:50, function(k) {
  m <- sample(2:5, 1)
  t <- sort(sample(tt, m))
  S <- 0.09 * 0.6^abs(outer(t, t, "-"))
  u <- as.numeric(t(chol(S)) %*% rnorm(m))
  vi <- runif(m, 0.01, 0.06)
  data.frame(study = sprintf("s%02d", k), time = t, yi = 0.2 + 0.05 * match(t, tt) + u +
               rnorm(m, 0, sqrt(vi)), vi = vi)
}))
sim$yi <- round(sim$yi, 6)
sim$vi <- round(sim$vi, 6)
write.csv(sim, "tests/reference/data/longitudinal_sim.csv", row.names = FALSE)
sim <- read.csv("tests/reference/data/longitudinal_sim.csv")

fit_case <- function(d, Vmat, inner, struct, method, data_file, V_file, source, with_ci = FALSE) {
  f <- as.formula(paste("~", inner, "| study"))
  fit <- function(ctl) tryCatch(
    rma.mv(yi, Vmat, mods = ~ factor(time) - 1, random = f, struct = struct, data = d,
           method = method, control = ctl), error = function(e) NULL)
  ll <- function(r) if (is.null(r)) -Inf else as.numeric(logLik(r))
  fits <- list(bobyqa = fit(tight), nlminb = fit(list()))
  start <- fits[[which.max(sapply(fits, ll))]]
  init <- list(tau2.init = start$tau2)
  if (!struct %in% c("DIAG", "ID")) init$rho.init <- start$rho
  fits$bobyqa_polish <- fit(c(tight, init))
  lls <- sapply(fits, ll)
  best <- which.max(lls)
  r <- fits[[best]]
  G <- unname(r$G)
  ci <- NULL
  if (with_ci) {
    # profile-likelihood intervals of tau^2 and rho (metafor's confint)
    cr <- confint(r, control = list(tol = 1e-10))
    ci <- list(tau2 = unname(cr[[1]]$random["tau^2", c("ci.lb", "ci.ub")]),
               rho = unname(cr[[2]]$random["rho", c("ci.lb", "ci.ub")]))
  }
  list(data = data_file, V = V_file, variance = if (is.null(V_file)) "vi" else NULL,
       factor = inner, struct = struct,
       method = tolower(method), source = sprintf(source, inner, struct, method),
       optimizer = names(fits)[best],
       loglik_by_optimizer = lapply(lls, function(x) if (is.finite(x)) x else "failed"),
       loglik = as.numeric(logLik(r)), beta = as.numeric(r$beta), se = as.numeric(r$se),
       tau2 = as.numeric(r$tau2), rho = as.numeric(r$rho), G = lapply(seq_len(nrow(G)), function(i) G[i, ]),
       profile_ci = ci)
}

cases <- list()
src_V <- "rma.mv(yi, V, mods = ~ factor(time) - 1, random = ~ %s | study, struct = '%s', method = '%s')"
src_v <- "rma.mv(yi, vi, mods = ~ factor(time) - 1, random = ~ %s | study, struct = '%s', method = '%s')"
for (method in c("REML", "ML")) {
  for (s in c("AR", "HAR", "CAR", "HCS", "CS", "UN", "DIAG", "ID")) {
    inner <- if (s == "CAR") "years" else "time"
    cases[[paste0("ishak_", tolower(s), "_", tolower(method))]] <-
      fit_case(dat, V, inner, s, method, "tests/reference/data/ishak2007.csv",
               "tests/reference/data/ishak2007_V.csv", src_V,
               with_ci = s %in% c("AR", "CAR") && method == "REML")
  }
  for (s in c("AR", "HAR", "CAR", "HCS")) {
    cases[[paste0("sim_", tolower(s), "_", tolower(method))]] <-
      fit_case(sim, sim$vi, "time", s, method, "tests/reference/data/longitudinal_sim.csv", NULL, src_v)
  }
}

json <- list(metafor_version = as.character(packageVersion("metafor")),
             R_version = paste(R.version$major, R.version$minor, sep = "."), cases = cases)
write_json(json, "tests/reference/structures_metafor.json", digits = NA, auto_unbox = TRUE,
           pretty = TRUE, null = "null")
