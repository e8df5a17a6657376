# A phylogenetic multilevel meta-analysis (metadat's dat.moura2021, as in its help page,
# on its first 150 studies: metafor's dense fit of all 1,828 effects takes over half an
# hour per method): metafor's answers for tests/test_known_correlation.py. Run from the
# repository root:
#   Rscript tests/reference/make_phylo_references.R
# Needs tests/reference/data/moura2021.csv (make_crossed_references.R); writes
# tests/reference/data/moura2021_phylo_cor.csv.gz (the phylogenetic correlation matrix,
# Grafen branch lengths) and tests/reference/phylo_reference.json.
suppressMessages({library(metafor); library(ape); library(jsonlite)})
dat <- read.csv("tests/reference/data/moura2021.csv")
dat <- dat[dat$study %in% sort(unique(dat$study))[1:150], ]
tree <- compute.brlen(dat.moura2021$tree)
A <- vcv(tree, corr = TRUE)
stopifnot(all(dat$species %in% rownames(A)))
A <- A[sort(unique(read.csv("tests/reference/data/moura2021.csv")$species)),
       sort(unique(read.csv("tests/reference/data/moura2021.csv")$species))]
con <- gzfile("tests/reference/data/moura2021_phylo_cor.csv.gz", "w")
write.csv(formatC(A, digits = 17, format = "g"), con, quote = TRUE)
close(con)
dat$phylogeny <- dat$species
cases <- list()
for (method in c("REML", "ML")) {
  r <- rma.mv(yi, vi, random = list(~ 1 | study, ~ 1 | esid, ~ 1 | species, ~ 1 | phylogeny),
              R = list(phylogeny = A), data = dat, method = method, sparse = TRUE)
  cases[[tolower(method)]] <- list(method = tolower(method), loglik = as.numeric(logLik(r)),
    beta = as.numeric(r$beta), se = as.numeric(r$se),
    sigma2 = as.list(setNames(r$sigma2, c("study", "esid", "species", "phylogeny"))))
}
write_json(list(metafor_version = as.character(packageVersion("metafor")), cases = cases),
           "tests/reference/phylo_reference.json", digits = NA, auto_unbox = TRUE, pretty = TRUE)
