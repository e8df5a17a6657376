# lme4's answers for the validation tests (tests/test_validation.py), and its
# Penicillin data. Run from the repository root:
#   Rscript tests/reference/make_validation_references.R
# Writes tests/reference/data/penicillin.csv and tests/reference/validation_reference.json.
suppressMessages(library(lme4))
write.csv(Penicillin, "tests/reference/data/penicillin.csv", row.names = FALSE)
num <- function(x) formatC(x, digits = 17, format = "g")
err <- try(lmer(diameter ~ 1 + (1 | plate) + (1 | plate:sample), Penicillin), silent = TRUE)
msg <- gsub("\"", "'", trimws(sub("^Error[^:]*: *", "", as.character(err))))
m <- lmer(diameter ~ 1 + (1 | plate), Penicillin, REML = TRUE)
json <- sprintf(paste0('{\n "lme4_version": "%s",\n "one_row_per_group_error": "%s",\n',
                       ' "plate_only": {"loglik_reml": %s, "sigma2": %s}\n}\n'),
                as.character(packageVersion("lme4")), msg, num(as.numeric(logLik(m))),
                num(sigma(m)^2))
writeLines(json, "tests/reference/validation_reference.json", sep = "")
stopifnot(jsonlite::validate(readLines("tests/reference/validation_reference.json")))
