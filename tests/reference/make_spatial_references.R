# Spatial correlation structures (metafor's SPEXP, SPGAU, SPLIN, SPRAT, SPSPH): metafor's
# answers for tests/test_spatial.py. Run from the repository root:
#   Rscript tests/reference/make_spatial_references.R
# Writes the seeded simulated data tests/reference/data/spatial_sites.csv (64 sites with
# 2-D coordinates, 60 of them used), tests/reference/data/spatial_sim.csv (effect sizes:
# 2-4 per site in 40 studies, known sampling variances vi ~ U(0.01, 0.1), a moderator x1),
# tests/reference/data/spatial_manhattan.csv (Manhattan distances between all 64 sites,
# labelled) and tests/reference/spatial_reference.json.
suppressMessages({library(metafor); library(jsonlite)})
set.seed(2)

n_sites <- 64
sites <- data.frame(site = sprintf("s%02d", seq_len(n_sites)),
                    lon = round(runif(n_sites, 0, 10), 3), lat = round(runif(n_sites, 0, 10), 3))
used <- sites[sort(sample(n_sites, 60)), ]
D <- as.matrix(dist(used[, c("lon", "lat")]))
tau2 <- 0.4
w <- drop(t(chol(tau2 * exp(-D / 1.5))) %*% rnorm(nrow(used)))
per_site <- sample(2:4, nrow(used), replace = TRUE)
dat <- data.frame(site = rep(used$site, per_site), lon = rep(used$lon, per_site),
                  lat = rep(used$lat, per_site), w = rep(w, per_site))
dat$study <- sample(rep(seq_len(40), length.out = nrow(dat)))
dat$x1 <- round(rnorm(nrow(dat)), 3)
dat$vi <- round(runif(nrow(dat), 0.01, 0.1), 5)
u <- rnorm(40, 0, sqrt(0.05))
dat$yi <- round(0.3 + 0.2 * dat$x1 + u[dat$study] + dat$w + rnorm(nrow(dat), 0, sqrt(dat$vi)), 5)
dat$w <- NULL
dat$const <- 1
write.csv(sites, "tests/reference/data/spatial_sites.csv", row.names = FALSE)
write.csv(dat[, c("study", "site", "lon", "lat", "x1", "yi", "vi")],
          "tests/reference/data/spatial_sim.csv", row.names = FALSE)
M <- as.matrix(dist(sites[, c("lon", "lat")], method = "manhattan"))
dimnames(M) <- list(sites$site, sites$site)
write.csv(M, "tests/reference/data/spatial_manhattan.csv")

# read back what was written, so the fits see exactly the committed numbers
dat <- read.csv("tests/reference/data/spatial_sim.csv")
dat$const <- 1
M <- as.matrix(read.csv("tests/reference/data/spatial_manhattan.csv", row.names = 1,
                        check.names = FALSE))

# metafor's default start (rho: the first quartile of the distances) stops at a lower
# local optimum for these fits; started near the higher optimum mlmeta reports, metafor
# converges there (sigma2 of study, tau2, rho), and that fit is the reference (the
# default start's log-likelihood is kept as loglik_default_start; NA where nlminb did not
# converge from it)
starts <- list(splin_reml = c(0.0537, 2.03, 9.54), splin_ml = c(0.0544, 0.343, 1.27),
               spsph_ml = c(0.0537, 0.3746, 2.4228))

fit_case <- function(struct, method, dist = NULL) {
  if (is.null(dist)) {
    key <- paste(tolower(struct), tolower(method), sep = "_")
    r <- tryCatch(rma.mv(yi, vi, mods = ~ x1, random = list(~ 1 | study, ~ lon + lat | const),
                         struct = struct, data = dat, method = method),
                  error = function(e) if (is.null(starts[[key]])) stop(e) else NULL)
    if (!is.null(starts[[key]])) {
      st <- starts[[key]]
      r2 <- rma.mv(yi, vi, mods = ~ x1, random = list(~ 1 | study, ~ lon + lat | const),
                   struct = struct, data = dat, method = method,
                   control = list(sigma2.init = st[1], tau2.init = st[2], rho.init = st[3]))
      stopifnot(is.null(r) || logLik(r2) > logLik(r))
      out <- list(struct = struct, method = tolower(method), dist = "euclidean",
                  loglik = as.numeric(logLik(r2)), beta = as.numeric(r2$beta), se = as.numeric(r2$se),
                  sigma2_study = r2$sigma2, tau2 = r2$tau2, rho = r2$rho, start = st,
                  loglik_default_start = if (is.null(r)) NA else as.numeric(logLik(r)))
      return(out)
    }
  } else {
    r <- rma.mv(yi, vi, mods = ~ x1, random = list(~ 1 | study, ~ site | const),
                struct = struct, data = dat, method = method, dist = list(dist))
  }
  list(struct = struct, method = tolower(method), dist = if (is.null(dist)) "euclidean" else "manhattan",
       loglik = as.numeric(logLik(r)), beta = as.numeric(r$beta), se = as.numeric(r$se),
       sigma2_study = r$sigma2, tau2 = r$tau2, rho = r$rho)
}

cases <- list()
for (struct in c("SPEXP", "SPGAU", "SPLIN", "SPRAT", "SPSPH")) {
  for (method in c("REML", "ML")) {
    res <- tryCatch(fit_case(struct, method), error = function(e) { message(conditionMessage(e)); NULL },
                    warning = function(w) { message(conditionMessage(w)); NULL })
    if (is.null(res)) {
      message(struct, " ", method, ": did not converge cleanly, left out")
      next
    }
    cases[[paste(tolower(struct), tolower(method), sep = "_")]] <- res
  }
}
cases[["spexp_reml_manhattan"]] <- fit_case("SPEXP", "REML", M)
cases[["spexp_ml_manhattan"]] <- fit_case("SPEXP", "ML", M)
write_json(list(metafor_version = as.character(packageVersion("metafor")),
                data = "tests/reference/data/spatial_sim.csv",
                formula = "yi ~ x1, random = list(~ 1 | study, ~ lon + lat | const)",
                cases = cases),
           "tests/reference/spatial_reference.json", digits = NA, auto_unbox = TRUE, pretty = TRUE)
