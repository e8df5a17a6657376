# Crossed random effects: lme4 and metafor answers for tests/test_crossed.py.
# Run from the repository root:
#   Rscript tests/reference/make_crossed_references.R
# Writes tests/reference/data/{pastes,moura2021}.csv and tests/reference/crossed_reference.json
# (tests/reference/data/crossed_sim.csv, a simulated subjects x items design, and
# penicillin.csv are inputs).
suppressMessages({library(lme4); library(metafor); library(jsonlite)})

lmer_case <- function(formula, data, reml, file) {
  m <- lmer(formula, data, REML = reml,
            control = lmerControl(optimizer = "bobyqa", optCtrl = list(maxfun = 1e5),
                                  check.conv.singular = "ignore"))
  vc <- as.data.frame(VarCorr(m))
  list(formula = deparse(formula, width.cutoff = 500), data = file, method = if (reml) "reml" else "ml",
       loglik = as.numeric(logLik(m)), beta = as.list(fixef(m)),
       se = as.list(sqrt(diag(as.matrix(vcov(m))))),
       vc = lapply(seq_len(nrow(vc)), function(i) list(grp = vc$grp[i], var1 = vc$var1[i],
                                                      var2 = vc$var2[i], vcov = vc$vcov[i],
                                                      sdcor = vc$sdcor[i])))
}

pen <- read.csv("tests/reference/data/penicillin.csv")
write.csv(Pastes, "tests/reference/data/pastes.csv", row.names = FALSE)
pastes <- read.csv("tests/reference/data/pastes.csv")
sim <- read.csv("tests/reference/data/crossed_sim.csv")
cases <- list()
for (reml in c(TRUE, FALSE)) {
  tag <- if (reml) "reml" else "ml"
  cases[[paste0("penicillin_", tag)]] <- lmer_case(diameter ~ 1 + (1 | plate) + (1 | sample), pen, reml,
                                                   "tests/reference/data/penicillin.csv")
  # cask ids a, b, c repeat across batches: read by the ids, batch and cask are crossed
  cases[[paste0("pastes_crossed_", tag)]] <- lmer_case(strength ~ 1 + (1 | batch) + (1 | cask), pastes,
                                                       reml, "tests/reference/data/pastes.csv")
  cases[[paste0("pastes_nested_", tag)]] <- lmer_case(strength ~ 1 + (1 | batch) + (1 | batch:cask),
                                                      pastes, reml, "tests/reference/data/pastes.csv")
  cases[[paste0("sim_slopes_", tag)]] <- lmer_case(y ~ x + (1 | subj) + (1 + x | item), sim, reml,
                                                   "tests/reference/data/crossed_sim.csv")
  cases[[paste0("sim_indep_", tag)]] <- lmer_case(y ~ x + (1 + x || subj) + (1 | item), sim, reml,
                                                  "tests/reference/data/crossed_sim.csv")
}

# a crossed meta-analysis: effects within studies, species crossed with studies
mo <- dat.moura2021$dat
mo <- escalc(measure = "ZCOR", ri = ri, ni = ni, data = mo)
mo$year_c <- mo$publication.year - 2000
out <- data.frame(study = mo$study.id, esid = mo$effect.size.id, species = mo$species.id,
                  yi = as.numeric(mo$yi), vi = as.numeric(mo$vi), year_c = mo$year_c)
write.csv(out, "tests/reference/data/moura2021.csv", row.names = FALSE)
meta <- list()
for (method in c("REML", "ML")) {
  for (mods in c("1", "year_c")) {
    f <- as.formula(paste("~", mods))
    r <- rma.mv(yi, vi, mods = f, random = list(~ 1 | study, ~ 1 | esid, ~ 1 | species), data = out,
                method = method, sparse = TRUE)
    meta[[paste0("moura_", tolower(method), "_", if (mods == "1") "int" else "year")]] <- list(
      mods = mods, method = tolower(method), loglik = as.numeric(logLik(r)),
      beta = as.list(setNames(as.numeric(r$beta), rownames(r$beta))), se = as.list(setNames(r$se, rownames(r$beta))),
      sigma2 = as.list(setNames(r$sigma2, c("study", "esid", "species"))))
  }
}

json <- list(lme4_version = as.character(packageVersion("lme4")),
             metafor_version = as.character(packageVersion("metafor")), lme4 = cases, metafor = meta)
write_json(json, "tests/reference/crossed_reference.json", digits = NA, auto_unbox = TRUE, pretty = TRUE)
