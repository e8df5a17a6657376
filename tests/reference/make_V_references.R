# Reference fits with a known sampling covariance V (metafor::rma.mv), for
# tests/test_sampling_covariance_reference.py. Run from the repository root:
#   Rscript tests/reference/make_V_references.R
suppressMessages(library(metafor))
dat <- read.csv("src/mlmeta/datasets/schoolcal.csv")
dat$year_c <- dat$year - 1990
dat <- dat[order(dat$district, dat$school), ]
out <- list()
for (rho in c(0.3, 0.6)) {
  V <- vcalc(var, cluster = district, obs = school, rho = rho, data = dat)
  for (method in c("REML", "ML")) {
    fit <- rma.mv(stdmdiff, V, mods = ~ year_c, random = ~ 1 | district/school, data = dat,
                  method = method, control = list(optimizer = "bobyqa", rhoend = 1e-12, maxfun = 100000))
    out[[length(out) + 1]] <- list(
      name = sprintf("schoolcal_vcalc_rho%.1f_%s", rho, tolower(method)), rho = rho,
      method = tolower(method), llf = as.numeric(logLik(fit)),
      params = list(year_c = unname(coef(fit)[2]), `_cons` = unname(coef(fit)[1])),
      bse = list(year_c = unname(fit$se[2]), `_cons` = unname(fit$se[1])),
      sigma2 = fit$sigma2,
      source = sprintf("rma.mv(stdmdiff, vcalc(var, cluster=district, obs=school, rho=%.1f), mods=~year_c, random=~1|district/school, method='%s')", rho, method))
  }
}
writeLines(jsonlite::toJSON(list(generated_by = "tests/reference/make_V_references.R",
                                 metafor_version = as.character(packageVersion("metafor")),
                                 cases = out), auto_unbox = TRUE, digits = 17, pretty = TRUE),
           "tests/reference/V_reference.json")
