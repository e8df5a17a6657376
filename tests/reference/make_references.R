#!/usr/bin/env Rscript
## Reference values for mlmeta's multilevel meta-regression.
##
## Run from the repository root:
##
##     Rscript tests/reference/make_references.R              # references only
##     Rscript tests/reference/make_references.R --datasets   # also rewrite the bundled CSVs
##
## Inputs : src/mlmeta/datasets/{pupiliq,schoolcal}.csv (bundled data)
## Outputs: tests/reference/data/synthetic_*.csv  (seeded synthetic data)
##          tests/reference/meregress_reference.json
##
## Log-likelihood convention (Stata `meta meregress` and metafor agree on it):
##   ll_ML   = -1/2 [ n log(2 pi) + log|V| + r'V^-1 r ]
##   ll_REML = -1/2 [ (n-p) log(2 pi) + log|V| + r'V^-1 r + log|X'V^-1 X| - log|X'X| ]
## with V = Z G Z' + diag(v) and r = y - X b_GLS.
##
## Every case is fitted by a reference program (metafor::rma.mv or nlme::lme) and
## checked against a dense brute-force implementation of the formulas above
## (V built as a full n x n matrix). The stored estimates are the reference
## program's estimates refined by Newton steps on the dense likelihood (the
## printed llf, params and re_cov are at a point where the analytic gradient is
## ~1e-11); `llf_source` is what the program reported, `llf_dense` is the dense
## likelihood at the program's own estimates and `source_max_abs_diff` the
## largest difference between the program's estimates and the stored ones.
##
## nlme versus metafor (determined below, stored under "conventions"):
##   * ML: lme(..., weights = varFixed(~ v), control = lmeControl(sigma = 1))
##     reports exactly the ML log-likelihood above (difference ~1e-12); no
##     conversion is needed.
##   * REML: with the residual SD fixed, nlme (checked with 3.1-162) does not
##     maximise the restricted likelihood: its variance estimates differ from
##     metafor's and the dense REML optimum, and the gap between its reported
##     value and the REML criterion is not constant in the parameters (so no
##     +-1/2 log|X'X| shift reconciles them). This is a known nlme problem
##     (REML with fixed sigma). REML random-slope references therefore come
##     from metafor::rma.mv(struct = "GEN"), which fits random intercepts and
##     slopes for continuous inner variables, and from the dense likelihood;
##     nlme's REML numbers are recorded in each case for comparison only.

suppressPackageStartupMessages({
  library(metafor)
  library(nlme)
})
has_jsonlite <- requireNamespace("jsonlite", quietly = TRUE)

args <- commandArgs(trailingOnly = TRUE)
if (!file.exists("src/mlmeta/datasets")) stop("run from the repository root")
DATASETS_DIR <- "src/mlmeta/datasets"
REF_DIR <- "tests/reference"
DATA_DIR <- file.path(REF_DIR, "data")
dir.create(DATA_DIR, showWarnings = FALSE, recursive = TRUE)
RNGkind("Mersenne-Twister", "Inversion", "Rejection")

## ---- number formatting and writers ----------------------------------------

## Shortest decimal representation that reads back as the same double.
fmt_num <- function(x) {
  vapply(x, function(v) {
    if (is.na(v)) return("")
    if (v == round(v) && abs(v) < 1e15) return(format(v, scientific = FALSE))
    for (d in 15:17) {
      s <- sprintf("%.*g", d, v)
      if (as.numeric(s) == v) return(s)
    }
    s
  }, character(1))
}

csv_quote <- function(s) {
  need <- grepl("[\",\n]", s)
  s[need] <- paste0("\"", gsub("\"", "\"\"", s[need]), "\"")
  s
}

write_csv_exact <- function(df, path) {
  cols <- lapply(df, function(col) {
    if (is.character(col) || is.factor(col)) csv_quote(as.character(col))
    else if (is.integer(col)) as.character(col)
    else fmt_num(col)
  })
  lines <- c(paste(csv_quote(names(df)), collapse = ","),
             do.call(paste, c(cols, sep = ",")))
  writeLines(lines, path, useBytes = TRUE)
}

json_str <- function(s) {
  s <- gsub("\\\\", "\\\\\\\\", s)
  s <- gsub("\"", "\\\\\"", s)
  s <- gsub("\n", "\\\\n", s)
  s <- gsub("\t", "\\\\t", s)
  paste0("\"", s, "\"")
}

## Minimal JSON writer with round-trip precision for doubles.
## Named lists -> objects; unnamed lists -> arrays; matrices -> arrays of rows;
## vectors wrapped in I() -> arrays; length-1 atomics -> scalars.
to_json <- function(x, indent = 0) {
  pad <- strrep(" ", indent + 2)
  end <- strrep(" ", indent)
  scalar <- function(v) {
    if (is.null(v) || (length(v) == 1 && is.na(v))) return("null")
    if (is.logical(v)) return(if (v) "true" else "false")
    if (is.character(v)) return(json_str(v))
    if (!is.finite(v)) return("null")
    fmt_num(v)
  }
  if (is.null(x)) return("null")
  if (is.matrix(x)) {
    rows <- vapply(seq_len(nrow(x)), function(i)
      paste0("[", paste(vapply(x[i, ], scalar, ""), collapse = ", "), "]"), "")
    return(paste0("[", paste(rows, collapse = ", "), "]"))
  }
  if (is.list(x)) {
    if (length(x) == 0) return(if (is.null(names(x))) "[]" else "{}")
    items <- vapply(x, to_json, "", indent = indent + 2)
    if (!is.null(names(x))) {
      items <- paste0(json_str(names(x)), ": ", items)
      return(paste0("{\n", pad, paste(items, collapse = paste0(",\n", pad)), "\n", end, "}"))
    }
    return(paste0("[\n", pad, paste(items, collapse = paste0(",\n", pad)), "\n", end, "]"))
  }
  if (inherits(x, "AsIs") || length(x) != 1) {
    x <- unclass(x)
    if (!is.null(names(x))) return(to_json(as.list(x), indent))
    return(paste0("[", paste(vapply(x, scalar, ""), collapse = ", "), "]"))
  }
  scalar(x)
}

## ---- bundled datasets (only with --datasets) ------------------------------

write_bundled_datasets <- function() {
  if (!requireNamespace("metadat", quietly = TRUE)) stop("package metadat is needed for --datasets")
  ## Teacher expectancy and pupil IQ (Raudenbush 1984; Raudenbush and Bryk 1985).
  ## The original standard errors are reported to 3 decimals (Stata's pupiliq.dta
  ## keeps those); metadat's vi are their squares rounded to 4 decimals
  ## (round(se^2, 4) == vi for every study). `var` is se^2 (exact to 6 decimals), so `se` and `var`
  ## describe the same data and both reproduce the Stata manual.
  r <- metadat::dat.raudenbush1985
  se <- round(sqrt(r$vi), 3)
  stopifnot(all(round(se^2, 4) == r$vi))
  pupiliq <- data.frame(
    study = as.integer(r$study), author = r$author, year = as.integer(r$year),
    weeks = as.integer(r$weeks), setting = r$setting, tester = r$tester,
    nexper = as.integer(r$n1i), ncontrol = as.integer(r$n2i),
    stdmdiff = as.numeric(r$yi), se = se, var = round(se^2, 6),
    stringsAsFactors = FALSE)
  write_csv_exact(pupiliq, file.path(DATASETS_DIR, "pupiliq.csv"))

  ## Modified school calendars (Cooper, Valentine, Charlton and Melson 2003;
  ## Konstantopoulos 2011).
  k <- metadat::dat.konstantopoulos2011
  schoolcal <- data.frame(
    district = as.integer(k$district), school = as.integer(k$school),
    study = as.integer(k$study), stdmdiff = as.numeric(k$yi),
    var = as.numeric(k$vi), se = sqrt(as.numeric(k$vi)),
    year = as.integer(k$year), year_c = as.integer(k$year - 1990L))
  write_csv_exact(schoolcal, file.path(DATASETS_DIR, "schoolcal.csv"))

  ## Periodontal treatment, two correlated outcomes per trial (Berkey et al. 1998).
  b <- metadat::dat.berkey1998
  berkey <- data.frame(
    trial = as.integer(b$trial), author = b$author, year = as.integer(b$year),
    ni = as.integer(b$ni), outcome = b$outcome, yi = as.numeric(b$yi),
    vi = as.numeric(b$vi), v1i = as.numeric(b$v1i), v2i = as.numeric(b$v2i),
    stringsAsFactors = FALSE)
  write_csv_exact(berkey, file.path(DATASETS_DIR, "berkey.csv"))
  cat("wrote bundled datasets to", DATASETS_DIR, "\n")
}
if ("--datasets" %in% args) write_bundled_datasets()

pupiliq <- read.csv(file.path(DATASETS_DIR, "pupiliq.csv"), stringsAsFactors = FALSE)
schoolcal <- read.csv(file.path(DATASETS_DIR, "schoolcal.csv"), stringsAsFactors = FALSE)

## ---- synthetic data ---------------------------------------------------------

## Four levels of nested random intercepts; ids are local to their parent.
make_synthetic_4level <- function() {
  set.seed(20240401)
  rows <- NULL
  for (a in 1:30) {
    ua <- rnorm(1, 0, 0.30)
    for (b in seq_len(sample(2:4, 1))) {
      ub <- rnorm(1, 0, 0.20)
      for (cc in seq_len(sample(1:3, 1))) {
        uc <- rnorm(1, 0, 0.15)
        ne <- sample(1:3, 1)
        rows <- rbind(rows, cbind(a = a, b = b, c = cc, u = rep(ua + ub + uc, ne)))
      }
    }
  }
  n <- nrow(rows)
  x1 <- round(rnorm(n), 4)
  x2 <- round(runif(n), 4)
  v <- round(runif(n, 0.01, 0.1), 5)
  y <- round(0.3 + 0.2 * x1 - 0.25 * x2 + rows[, "u"] + rnorm(n, 0, sqrt(v)), 6)
  data.frame(a = as.integer(rows[, "a"]), b = as.integer(rows[, "b"]), c = as.integer(rows[, "c"]),
             x1 = x1, x2 = x2, y = y, v = v)
}

## Five levels of nested random intercepts.
make_synthetic_5level <- function() {
  set.seed(20240402)
  rows <- NULL
  for (a in 1:25) {
    ua <- rnorm(1, 0, 0.30)
    for (b in seq_len(sample(2:3, 1))) {
      ub <- rnorm(1, 0, 0.20)
      for (cc in seq_len(sample(1:3, 1))) {
        uc <- rnorm(1, 0, 0.15)
        for (dd in seq_len(sample(1:2, 1))) {
          ud <- rnorm(1, 0, 0.12)
          ne <- sample(1:3, 1)
          rows <- rbind(rows, cbind(a = a, b = b, c = cc, d = dd, u = rep(ua + ub + uc + ud, ne)))
        }
      }
    }
  }
  n <- nrow(rows)
  x1 <- round(rnorm(n), 4)
  v <- round(runif(n, 0.01, 0.1), 5)
  y <- round(0.1 + 0.15 * x1 + rows[, "u"] + rnorm(n, 0, sqrt(v)), 6)
  data.frame(a = as.integer(rows[, "a"]), b = as.integer(rows[, "b"]), c = as.integer(rows[, "c"]),
             d = as.integer(rows[, "d"]), x1 = x1, y = y, v = v)
}

## Random intercepts and slopes on 40 top groups (3-6 rows each), with a nested
## level h (1-3 subgroups per g, local ids) of random intercepts.
make_synthetic_slopes <- function() {
  set.seed(20240406)
  sd_g <- c(0.30, 0.20, 0.15)                      # (intercept, x1, x2)
  Rg <- diag(3); Rg[1, 2] <- Rg[2, 1] <- 0.5
  Gg <- diag(sd_g) %*% Rg %*% diag(sd_g)
  Lg <- t(chol(Gg))
  out <- NULL
  for (g in 1:40) {
    m <- sample(3:6, 1)
    k <- min(sample(1:3, 1), m)
    h <- sample(rep_len(seq_len(k), m))
    ug <- drop(Lg %*% rnorm(3))
    uh <- rnorm(k, 0, 0.20)
    x1 <- round(rnorm(m), 4)
    x2 <- round(runif(m, -1, 1), 4)
    v <- round(runif(m, 0.01, 0.1), 5)
    y <- round(0.2 + 0.3 * x1 - 0.2 * x2 + ug[1] + ug[2] * x1 + ug[3] * x2 + uh[h] +
                 rnorm(m, 0, sqrt(v)), 6)
    out <- rbind(out, data.frame(g = g, h = h, x1 = x1, x2 = x2, y = y, v = v))
  }
  out$g <- as.integer(out$g); out$h <- as.integer(out$h)
  out
}

synth_files <- list(
  synthetic_4level = make_synthetic_4level(),
  synthetic_5level = make_synthetic_5level(),
  synthetic_slopes = make_synthetic_slopes())
for (nm in names(synth_files))
  write_csv_exact(synth_files[[nm]], file.path(DATA_DIR, paste0(nm, ".csv")))
## Read back, so the references use exactly the values in the CSV files.
synth <- lapply(names(synth_files), function(nm)
  read.csv(file.path(DATA_DIR, paste0(nm, ".csv"))))
names(synth) <- names(synth_files)

## ---- dense brute-force likelihood ---------------------------------------------
## spec: y, X (n x p, named, intercept "_cons" last), v (sampling variances),
## method ("reml" | "ml"), levels: list of list(name, gid, Z (n x q, named,
## "_cons" last), struct ("identity" | "independent" | "unstructured")).
## theta: per level, SDs (identity/independent) or the lower triangle (column
## major) of a Cholesky factor L with Sigma = L L' (unstructured). Signs are
## free, so variances of 0 and |correlations| of 1 are interior points of theta.

npar_level <- function(lv) {
  q <- ncol(lv$Z)
  switch(lv$struct, identity = 1L, independent = q, unstructured = q * (q + 1L) / 2L)
}

theta_to_sigma <- function(spec, theta) {
  out <- list(); k <- 0L
  for (lv in spec$levels) {
    q <- ncol(lv$Z); m <- npar_level(lv); th <- theta[k + seq_len(m)]; k <- k + m
    S <- switch(lv$struct,
      identity = diag(th^2, q),
      independent = diag(th^2, q),
      unstructured = {
        L <- matrix(0, q, q); L[lower.tri(L, diag = TRUE)] <- th; tcrossprod(L)
      })
    dimnames(S) <- list(colnames(lv$Z), colnames(lv$Z))
    out[[lv$name]] <- S
  }
  out
}

sigma_to_theta <- function(spec, sig) {
  th <- NULL
  for (lv in spec$levels) {
    S <- as.matrix(sig[[lv$name]])
    th <- c(th, switch(lv$struct,
      identity = sqrt(max(mean(diag(S)), 0)),
      independent = sqrt(pmax(diag(S), 0)),
      unstructured = {
        ev <- eigen(S, symmetric = TRUE)
        floor <- 1e-12 * max(abs(ev$values), 1e-12)
        S2 <- ev$vectors %*% diag(pmax(ev$values, floor), nrow(S)) %*% t(ev$vectors)
        L <- t(chol((S2 + t(S2)) / 2)); L[lower.tri(L, diag = TRUE)]
      }))
  }
  th
}

build_V <- function(spec, sig) {
  V <- diag(spec$v, length(spec$y))
  for (lv in spec$levels) {
    S <- sig[[lv$name]]
    for (idx in split(seq_along(lv$gid), lv$gid)) {
      Zg <- lv$Z[idx, , drop = FALSE]
      V[idx, idx] <- V[idx, idx] + Zg %*% S %*% t(Zg)
    }
  }
  V
}

dense_eval <- function(spec, sig, gradient = FALSE, theta = NULL) {
  n <- length(spec$y); X <- spec$X; p <- ncol(X)
  V <- build_V(spec, sig)
  R <- chol(V)
  Vi <- chol2inv(R)
  ldV <- 2 * sum(log(diag(R)))
  XtViX <- crossprod(X, Vi %*% X)
  RX <- chol(XtViX)
  covb <- chol2inv(RX)
  beta <- drop(covb %*% crossprod(X, Vi %*% spec$y))
  r <- drop(spec$y - X %*% beta)
  a <- drop(Vi %*% r)
  quad <- sum(r * a)
  if (spec$method == "ml") {
    ll <- -0.5 * (n * log(2 * pi) + ldV + quad)
  } else {
    ll <- -0.5 * ((n - p) * log(2 * pi) + ldV + quad + 2 * sum(log(diag(RX))) -
                    as.numeric(determinant(crossprod(X))$modulus))
  }
  names(beta) <- colnames(X)
  out <- list(llf = ll, beta = beta, bse = setNames(sqrt(diag(covb)), colnames(X)))
  if (gradient) {
    ## d ll = -1/2 tr(M dV),  M = P - a a'  (P = V^-1 for ML, the REML projection otherwise)
    ViX <- Vi %*% X
    Pt <- if (spec$method == "ml") Vi else Vi - ViX %*% covb %*% t(ViX)
    M <- Pt - tcrossprod(a)
    g <- NULL; k <- 0L
    for (lv in spec$levels) {
      q <- ncol(lv$Z); m <- npar_level(lv); th <- theta[k + seq_len(m)]; k <- k + m
      S <- matrix(0, q, q)
      for (idx in split(seq_along(lv$gid), lv$gid)) {
        Zg <- lv$Z[idx, , drop = FALSE]
        S <- S + t(Zg) %*% M[idx, idx, drop = FALSE] %*% Zg
      }
      S <- -0.5 * S                                   # d ll = tr(S dSigma)
      g <- c(g, switch(lv$struct,
        identity = 2 * th * sum(diag(S)),
        independent = 2 * th * diag(S),
        unstructured = {
          L <- matrix(0, q, q); L[lower.tri(L, diag = TRUE)] <- th
          G <- 2 * S %*% L; G[lower.tri(G, diag = TRUE)]
        }))
    }
    out$grad <- unname(g)
  }
  out
}

dense_ll <- function(spec, theta) dense_eval(spec, theta_to_sigma(spec, theta))$llf
dense_grad <- function(spec, theta) dense_eval(spec, theta_to_sigma(spec, theta), TRUE, theta)$grad

num_hess <- function(spec, theta, h = 1e-5) {
  m <- length(theta); H <- matrix(0, m, m)
  for (j in seq_len(m)) {
    e <- rep(0, m); e[j] <- h
    H[, j] <- (dense_grad(spec, theta + e) - dense_grad(spec, theta - e)) / (2 * h)
  }
  (H + t(H)) / 2
}

## Maximise the dense likelihood from one start: BFGS with the analytic
## gradient, then safeguarded Newton steps (finite-difference Hessian of the
## analytic gradient) until the gradient is ~1e-11.
dense_max <- function(spec, theta0) {
  f <- function(th) -tryCatch(dense_ll(spec, th), error = function(e) -1e100)
  gr <- function(th) -tryCatch(dense_grad(spec, th), error = function(e) rep(0, length(th)))
  o <- optim(theta0, f, gr, method = "BFGS", control = list(maxit = 5000, reltol = 1e-15))
  th <- o$par; ll <- -o$value
  for (it in 1:60) {
    g <- dense_grad(spec, th)
    if (max(abs(g)) < 1e-11) break
    H <- num_hess(spec, th)
    ev <- eigen(H, symmetric = TRUE)
    lam <- pmin(ev$values, -1e-8 * max(1, max(abs(ev$values))))
    step <- -drop(ev$vectors %*% ((t(ev$vectors) %*% g) / lam))
    t <- 1; improved <- FALSE
    while (t > 1e-12) {
      cand <- th + t * step
      llc <- tryCatch(dense_ll(spec, cand), error = function(e) -Inf)
      if (llc >= ll - 1e-13) { th <- cand; ll <- llc; improved <- TRUE; break }
      t <- t / 2
    }
    if (!improved) break
  }
  list(theta = th, llf = dense_ll(spec, th), grad = dense_grad(spec, th))
}

random_start <- function(spec) {
  th <- NULL
  for (lv in spec$levels) {
    q <- ncol(lv$Z)
    th <- c(th, switch(lv$struct,
      identity = exp(runif(1, log(0.01), log(1))),
      independent = exp(runif(q, log(0.01), log(1))),
      unstructured = {
        L <- matrix(0, q, q)
        diag(L) <- exp(runif(q, log(0.01), log(1)))
        L[lower.tri(L)] <- runif(q * (q - 1) / 2, -0.3, 0.3)
        L[lower.tri(L, diag = TRUE)]
      }))
  }
  th
}

## ---- case specification -------------------------------------------------------

datasets <- c(list(pupiliq = pupiliq, schoolcal = schoolcal), synth)
data_label <- function(key) if (key %in% c("pupiliq", "schoolcal")) key else
  file.path("tests/reference/data", paste0(key, ".csv"))

## level(name, id columns, slopes, struct); `name` is the mlmeta grouping term.
level <- function(name, cols, slopes = character(0), struct = NULL) {
  if (is.null(struct)) struct <- if (length(slopes)) "unstructured" else "identity"
  list(name = name, cols = cols, slopes = slopes, struct = struct)
}

make_spec <- function(cs) {
  df <- datasets[[cs$data]]
  n <- nrow(df)
  X <- cbind(as.matrix(df[, cs$mods, drop = FALSE]), `_cons` = 1)
  colnames(X) <- c(cs$mods, "_cons")
  levels <- lapply(cs$levels, function(lv) {
    key <- do.call(paste, c(df[, lv$cols, drop = FALSE], sep = ":"))
    Z <- cbind(as.matrix(df[, lv$slopes, drop = FALSE]), `_cons` = 1)
    colnames(Z) <- c(lv$slopes, "_cons")
    list(name = lv$name, gid = as.integer(factor(key, levels = unique(key))), Z = Z,
         struct = lv$struct)
  })
  list(y = df[[cs$y]], X = X, v = df[[cs$variance]], method = cs$method, levels = levels)
}

## ---- reference programs -------------------------------------------------------

RMA_CONTROLS <- c(
  "list(optimizer = \"nlminb\", rel.tol = 1e-12, iter.max = 10000, eval.max = 10000)",
  "list(optimizer = \"nlminb\", rel.tol = 1e-10, iter.max = 10000, eval.max = 10000)",
  "list(optimizer = \"optim\", optmethod = \"BFGS\", reltol = 1e-14, maxit = 10000)",
  "list(optimizer = \"optim\", optmethod = \"Nelder-Mead\", reltol = 1e-14, maxit = 100000)")

NLME_CONTROL <- paste0("lmeControl(sigma = 1, maxIter = 1000, msMaxIter = 1000, msMaxEval = 10000, ",
                       "niterEM = 100, tolerance = 1e-12, msTol = 1e-14, returnObject = TRUE)")

rename_fixed <- function(b) {
  nm <- names(b)
  nm[nm %in% c("intrcpt", "(Intercept)")] <- "_cons"
  names(b) <- nm
  b[c(setdiff(nm, "_cons"), "_cons")]
}

## Re-order a covariance matrix with an intercept named `int_name` into mlmeta
## order (slopes first, "_cons" last).
mlmeta_order <- function(S, int_name) {
  S <- as.matrix(S)
  nm <- rownames(S); nm[nm == int_name] <- "_cons"
  dimnames(S) <- list(nm, nm)
  ord <- c(setdiff(nm, "_cons"), "_cons")
  S[ord, ord, drop = FALSE]
}

## Run a metafor call given as text with "%CONTROL%" in it; the first control
## that converges wins. Returns the fit and the call as run.
run_rma <- function(template, dat) {
  last_err <- NULL
  for (ctl in RMA_CONTROLS) {
    call_txt <- gsub("%CONTROL%", ctl, template, fixed = TRUE)
    fit <- tryCatch(eval(parse(text = call_txt), list(dat = dat)), error = function(e) e)
    if (!inherits(fit, "error")) return(list(fit = fit, call = call_txt))
    last_err <- conditionMessage(fit)
  }
  stop("metafor failed: ", last_err)
}

## Random-intercept levels only: sigma2 in level order.
extract_rma_intercepts <- function(fit, cs) {
  sig <- lapply(seq_along(cs$levels), function(i) matrix(fit$sigma2[i], 1, 1, dimnames = list("_cons", "_cons")))
  names(sig) <- vapply(cs$levels, `[[`, "", "name")
  list(beta = rename_fixed(setNames(drop(fit$b), rownames(fit$b))), sig = sig,
       llf = as.numeric(logLik(fit)))
}

## struct = "GEN": first level from fit$G (intercept + slopes), second from sigma2.
extract_rma_gen <- function(fit, cs) {
  sig <- list()
  sig[[cs$levels[[1]]$name]] <- mlmeta_order(fit$G, "intrcpt")
  sig[[cs$levels[[2]]$name]] <- matrix(fit$sigma2[1], 1, 1, dimnames = list("_cons", "_cons"))
  list(beta = rename_fixed(setNames(drop(fit$b), rownames(fit$b))), sig = sig,
       llf = as.numeric(logLik(fit)))
}

## nlme: reStruct matrices are relative to sigma^2 (= 1 here).
extract_lme <- function(fit, cs) {
  mats <- as.matrix(fit$modelStruct$reStruct)
  sig <- list()
  for (i in seq_along(cs$levels)) {
    key <- cs$levels[[i]]$cols[length(cs$levels[[i]]$cols)]
    sig[[cs$levels[[i]]$name]] <- mlmeta_order(mats[[key]] * fit$sigma^2, "(Intercept)")
  }
  list(beta = rename_fixed(fixef(fit)), sig = sig, llf = as.numeric(logLik(fit)))
}

run_lme <- function(call_txt, dat) {
  fit <- tryCatch(eval(parse(text = call_txt), list(dat = dat)), error = function(e) e)
  if (inherits(fit, "error")) return(list(error = conditionMessage(fit), call = call_txt))
  list(fit = fit, call = call_txt)
}

## ---- fitting one case -----------------------------------------------------------

sig_to_json <- function(sig) lapply(sig, function(S) unname(as.matrix(S)))
corr_of <- function(S) {
  d <- sqrt(diag(S))
  R <- S / outer(d, d)
  R[!is.finite(R)] <- NA
  diag(R) <- 1
  R
}

max_abs_diff <- function(a, b) {
  x <- c(unlist(a$beta) - unlist(b$beta))
  for (nm in names(a$sig)) x <- c(x, as.vector(a$sig[[nm]] - b$sig[[nm]]))
  max(abs(x))
}

boundary_notes <- function(spec, sig) {
  notes <- character(0)
  for (lv in spec$levels) {
    S <- sig[[lv$name]]
    sds <- sqrt(pmax(diag(S), 0))
    for (j in seq_along(sds)) if (sds[j] < 1e-5)
      notes <- c(notes, sprintf("sd(%s) at %s is 0 (boundary)", colnames(S)[j], lv$name))
    if (lv$struct == "unstructured" && all(sds >= 1e-5)) {
      R <- corr_of(S)
      ev <- eigen(R, symmetric = TRUE, only.values = TRUE)$values
      if (min(ev) < 1e-7)
        notes <- c(notes, sprintf("random-effects correlation matrix at %s is singular (|corr| = 1, boundary)", lv$name))
    }
  }
  notes
}

## cs: name, data, formula, y, variance, mods, levels, method, covariance,
## source (list(kind, call)), extras.
fit_case <- function(cs, n_random_starts = 8, start_sig = NULL, seed = 1) {
  cat(sprintf("%-45s", cs$name)); flush.console()
  spec <- make_spec(cs)
  dat <- datasets[[cs$data]]
  src <- NULL
  if (!is.null(cs$rma)) {
    run <- run_rma(cs$rma, dat)
    src <- c(run, list(est = if (cs$rma_kind == "gen") extract_rma_gen(run$fit, cs) else extract_rma_intercepts(run$fit, cs)))
  } else if (!is.null(cs$lme)) {
    run <- run_lme(cs$lme, dat)
    if (is.null(run$error)) src <- c(run, list(est = extract_lme(run$fit, cs)))
  }
  ## Dense check at the reference program's estimates, then refine from there.
  if (!is.null(src)) {
    ev_src <- dense_eval(spec, src$est$sig)
    th0 <- sigma_to_theta(spec, src$est$sig)
  } else {
    th0 <- sigma_to_theta(spec, start_sig)
  }
  if (!is.null(start_sig)) th0 <- sigma_to_theta(spec, start_sig)
  best <- dense_max(spec, th0)
  refined <- best
  ## Multi-start search on the dense likelihood.
  set.seed(seed)
  found <- best$llf
  if (is.null(cs$keep_local) || !cs$keep_local) {
    for (s in seq_len(n_random_starts)) {
      o <- tryCatch(dense_max(spec, random_start(spec)), error = function(e) NULL)
      if (is.null(o)) next
      found <- c(found, o$llf)
      if (o$llf > best$llf + 1e-9) best <- o
    }
  } else {
    for (s in seq_len(n_random_starts)) {
      o <- tryCatch(dense_max(spec, random_start(spec)), error = function(e) NULL)
      if (!is.null(o)) found <- c(found, o$llf)
    }
  }
  ## Distinct maxima (to 1e-6).
  maxima <- sort(unique(round(found, 6)), decreasing = TRUE)
  final <- if (isTRUE(cs$keep_local)) refined else best
  ## Snap numerically-zero SDs / Cholesky entries to exact zeros when that does
  ## not lower the likelihood (boundary estimates become exact 0 or |corr| = 1).
  th_snap <- final$theta; th_snap[abs(th_snap) < 1e-9] <- 0
  if (any(th_snap != final$theta) && dense_ll(spec, th_snap) >= final$llf - 1e-12)
    final <- list(theta = th_snap, llf = dense_ll(spec, th_snap), grad = dense_grad(spec, th_snap))
  sig <- theta_to_sigma(spec, final$theta)
  ## Tidy exact zeros / symmetric rounding.
  sig <- lapply(sig, function(S) (S + t(S)) / 2)
  ev <- dense_eval(spec, sig)
  est <- list(beta = ev$beta, sig = sig)

  case <- list(
    name = cs$name, data = data_label(cs$data), formula = cs$formula,
    variance = cs$variance, method = cs$method)
  if (!is.null(cs$covariance)) case$covariance <- cs$covariance
  case$source <- if (!is.null(src)) src$call else cs$source_text
  case$nobs <- length(spec$y)
  case$groups <- setNames(lapply(spec$levels, function(lv) length(unique(lv$gid))),
                          vapply(spec$levels, `[[`, "", "name"))
  case$llf <- ev$llf
  case$params <- as.list(ev$beta)
  case$bse <- as.list(ev$bse)
  case$re_cov <- sig_to_json(sig)
  case$re_names <- lapply(sig, function(S) I(colnames(S)))
  unstr <- vapply(cs$levels, function(lv) lv$struct == "unstructured", TRUE)
  if (any(unstr)) {
    case$re_corr <- lapply(sig[unstr], function(S) unname(corr_of(S)))
  }
  notes <- boundary_notes(spec, sig)
  is_global <- abs(ev$llf - maxima[1]) < 1e-6
  opt <- if (isTRUE(cs$keep_local)) cs$optimum_text else if (length(notes)) paste(notes, collapse = "; ") else "interior maximum"
  if (!isTRUE(cs$keep_local)) {
    opt <- paste0(opt, if (length(maxima) > 1)
      sprintf("; multimodal: local maxima found at llf = %s; this is the best (global)", paste(fmt_num(maxima), collapse = ", "))
      else sprintf("; unique maximum in %d starts", length(found)))
    if (!is.null(cs$optimum_extra)) opt <- paste0(opt, "; ", cs$optimum_extra)
  }
  case$optimum <- opt
  case$max_abs_gradient <- max(abs(final$grad))
  if (!is.null(src)) {
    case$llf_source <- src$est$llf
    case$llf_dense <- ev_src$llf
    case$source_max_abs_diff <- max_abs_diff(src$est, est)
    if (ev$llf - ev_src$llf > 1e-8)
      case$optimum <- paste0(case$optimum, sprintf("; the reference program stopped short: llf %s at its estimates",
                                                   fmt_num(ev_src$llf)))
  }
  if (!is.null(cs$extras)) case <- c(case, cs$extras(case, spec))
  cat(sprintf(" llf = %.10f  (source %s, dense@source %s, max|diff| %s, |grad| %.1e)\n",
              ev$llf, if (is.null(src)) "-" else sprintf("%.10f", src$est$llf),
              if (is.null(src)) "-" else sprintf("%.10f", ev_src$llf),
              if (is.null(src)) "-" else format(case$source_max_abs_diff, digits = 3),
              case$max_abs_gradient))
  case
}

## ---- cases -------------------------------------------------------------------------

cases <- list()
add <- function(x) cases[[length(cases) + 1L]] <<- x

## nlme's REML fit (fixed sigma) recorded for comparison in REML slope cases.
nlme_reml_extra <- function(call_txt, cs) function(case, spec) {
  run <- run_lme(call_txt, datasets[[cs$data]])
  if (!is.null(run$error)) return(list(nlme_reml = list(source = call_txt, error = run$error)))
  est <- extract_lme(run$fit, cs)
  list(nlme_reml = list(
    source = call_txt,
    llf_reported = est$llf,
    llf_dense_at_nlme_estimates = dense_eval(spec, est$sig)$llf,
    params = as.list(est$beta),
    re_cov = sig_to_json(est$sig),
    note = "nlme REML with fixed sigma does not maximise the restricted likelihood; for comparison only"))
}

## nlme's ML fit recorded as a cross-check for metafor-sourced ML cases and vice versa.
crosscheck_extra <- function(kind, call_txt, cs) function(case, spec) {
  dat <- datasets[[cs$data]]
  if (kind == "lme") {
    run <- run_lme(call_txt, dat)
    if (!is.null(run$error)) return(list(crosscheck = list(source = call_txt, error = run$error)))
    est <- extract_lme(run$fit, cs)
    src <- call_txt
  } else {
    run <- tryCatch(run_rma(call_txt, dat), error = function(e) e)
    if (inherits(run, "error")) return(list(crosscheck = list(source = call_txt, error = conditionMessage(run))))
    est <- extract_rma_gen(run$fit, cs)
    src <- run$call
  }
  list(crosscheck = list(source = src, llf_reported = est$llf,
                         llf_dense_at_estimates = dense_eval(spec, est$sig)$llf,
                         max_abs_diff = max_abs_diff(est, list(beta = unlist(case$params),
                           sig = lapply(case$re_cov, function(m) m)))))
}

for (meth in c("reml", "ml")) {
  M <- toupper(meth)
  ## a. pupiliq
  add(list(name = paste0("pupiliq_re_", meth), data = "pupiliq",
           formula = "stdmdiff ~ 1 + (1 | study)", y = "stdmdiff", variance = "var",
           mods = character(0), levels = list(level("study", "study")), method = meth,
           covariance = list(study = "identity"),
           rma = sprintf("rma.mv(stdmdiff, var, random = ~ 1 | study, data = dat, method = \"%s\", control = %%CONTROL%%)", M),
           rma_kind = "int"))
  add(list(name = paste0("pupiliq_weeks_", meth), data = "pupiliq",
           formula = "stdmdiff ~ weeks + (1 | study)", y = "stdmdiff", variance = "var",
           mods = "weeks", levels = list(level("study", "study")), method = meth,
           covariance = list(study = "identity"),
           rma = sprintf("rma.mv(stdmdiff, var, mods = ~ weeks, random = ~ 1 | study, data = dat, method = \"%s\", control = %%CONTROL%%)", M),
           rma_kind = "int"))
  ## b. schoolcal three-level
  lv3 <- list(level("district", "district"), level("district:school", c("district", "school")))
  add(list(name = paste0("schoolcal_3level_", meth), data = "schoolcal",
           formula = "stdmdiff ~ 1 + (1 | district) + (1 | district:school)", y = "stdmdiff",
           variance = "var", mods = character(0), levels = lv3, method = meth,
           covariance = list(district = "identity", `district:school` = "identity"),
           rma = sprintf("rma.mv(stdmdiff, var, random = ~ 1 | district/school, data = dat, method = \"%s\", control = %%CONTROL%%)", M),
           rma_kind = "int"))
  add(list(name = paste0("schoolcal_3level_year_c_", meth), data = "schoolcal",
           formula = "stdmdiff ~ year_c + (1 | district) + (1 | district:school)", y = "stdmdiff",
           variance = "var", mods = "year_c", levels = lv3, method = meth,
           covariance = list(district = "identity", `district:school` = "identity"),
           rma = sprintf("rma.mv(stdmdiff, var, mods = ~ year_c, random = ~ 1 | district/school, data = dat, method = \"%s\", control = %%CONTROL%%)", M),
           rma_kind = "int"))
}
add(list(name = "schoolcal_district_reml", data = "schoolcal",
         formula = "stdmdiff ~ 1 + (1 | district)", y = "stdmdiff", variance = "var",
         mods = character(0), levels = list(level("district", "district")), method = "reml",
         covariance = list(district = "identity"),
         rma = "rma.mv(stdmdiff, var, random = ~ 1 | district, data = dat, method = \"REML\", control = %CONTROL%)",
         rma_kind = "int"))
add(list(name = "schoolcal_study_reml", data = "schoolcal",
         formula = "stdmdiff ~ 1 + (1 | study)", y = "stdmdiff", variance = "var",
         mods = character(0), levels = list(level("study", "study")), method = "reml",
         covariance = list(study = "identity"),
         rma = "rma.mv(stdmdiff, var, random = ~ 1 | study, data = dat, method = \"REML\", control = %CONTROL%)",
         rma_kind = "int"))

## c. synthetic four- and five-level random intercepts
for (meth in c("reml", "ml")) {
  M <- toupper(meth)
  add(list(name = paste0("synthetic_4level_", meth), data = "synthetic_4level",
           formula = "y ~ x1 + x2 + (1 | a) + (1 | a:b) + (1 | a:b:c)", y = "y", variance = "v",
           mods = c("x1", "x2"),
           levels = list(level("a", "a"), level("a:b", c("a", "b")), level("a:b:c", c("a", "b", "c"))),
           method = meth,
           covariance = list(a = "identity", `a:b` = "identity", `a:b:c` = "identity"),
           rma = sprintf("rma.mv(y, v, mods = ~ x1 + x2, random = ~ 1 | a/b/c, data = dat, method = \"%s\", control = %%CONTROL%%)", M),
           rma_kind = "int", n_starts = 4))
  add(list(name = paste0("synthetic_5level_", meth), data = "synthetic_5level",
           formula = "y ~ x1 + (1 | a) + (1 | a:b) + (1 | a:b:c) + (1 | a:b:c:d)", y = "y", variance = "v",
           mods = "x1",
           levels = list(level("a", "a"), level("a:b", c("a", "b")), level("a:b:c", c("a", "b", "c")),
                         level("a:b:c:d", c("a", "b", "c", "d"))),
           method = meth,
           covariance = list(a = "identity", `a:b` = "identity", `a:b:c` = "identity", `a:b:c:d` = "identity"),
           rma = sprintf("rma.mv(y, v, mods = ~ x1, random = ~ 1 | a/b/c/d, data = dat, method = \"%s\", control = %%CONTROL%%)", M),
           rma_kind = "int", n_starts = 4))
}

## d. random slopes
slope_lv <- function(struct) list(level("district", "district", "year_c", struct),
                                  level("district:school", c("district", "school")))
lme_school <- function(pd, meth) sprintf(
  "lme(stdmdiff ~ year_c, random = list(district = %s(~ year_c), school = ~ 1), weights = varFixed(~ var), data = dat, method = \"%s\", control = %s)",
  pd, meth, NLME_CONTROL)
gen_school <- function(rho, meth) sprintf(
  "rma.mv(stdmdiff, var, mods = ~ year_c, random = list(~ year_c | district, ~ 1 | study), struct = \"GEN\"%s, data = dat, method = \"%s\", control = %%CONTROL%%)",
  rho, meth)

## schoolcal, independent slope (Stata manual example 5)
cs <- list(name = "schoolcal_slope_indep_reml", data = "schoolcal",
           formula = "stdmdiff ~ year_c + (1 + year_c || district) + (1 | district:school)",
           y = "stdmdiff", variance = "var", mods = "year_c", levels = slope_lv("independent"),
           method = "reml", covariance = list(district = "independent", `district:school` = "identity"),
           rma = gen_school(", rho = 0", "REML"), rma_kind = "gen", n_starts = 40,
           optimum_extra = "global: Stata manual example 5 prints the local maximum -7.2095301 (see schoolcal_slope_indep_reml_local_stata)")
cs$extras <- nlme_reml_extra(lme_school("pdDiag", "REML"), cs)
add(cs)
add(list(name = "schoolcal_slope_indep_reml_local_stata", data = "schoolcal",
         formula = "stdmdiff ~ year_c + (1 + year_c || district) + (1 | district:school)",
         y = "stdmdiff", variance = "var", mods = "year_c", levels = slope_lv("independent"),
         method = "reml", covariance = list(district = "independent", `district:school` = "identity"),
         source_text = "dense restricted likelihood maximised from Stata manual example 5's printed estimates (sd(year_c) .0335302, sd(_cons) .06437, sd(school) .1808125)",
         start_sig = list(district = diag(c(.0335302, .06437)^2), `district:school` = matrix(.1808125^2)),
         keep_local = TRUE, n_starts = 0,
         optimum_text = "local maximum (Stata manual example 5, ll -7.2095301); NOT the global maximum, see schoolcal_slope_indep_reml"))
cs <- list(name = "schoolcal_slope_indep_ml", data = "schoolcal",
           formula = "stdmdiff ~ year_c + (1 + year_c || district) + (1 | district:school)",
           y = "stdmdiff", variance = "var", mods = "year_c", levels = slope_lv("independent"),
           method = "ml", covariance = list(district = "independent", `district:school` = "identity"),
           lme = lme_school("pdDiag", "ML"), n_starts = 40)
cs$extras <- crosscheck_extra("rma", gen_school(", rho = 0", "ML"), cs)
add(cs)
## schoolcal, unstructured (Stata manual example 6)
cs <- list(name = "schoolcal_slope_unstr_reml", data = "schoolcal",
           formula = "stdmdiff ~ year_c + (1 + year_c | district) + (1 | district:school)",
           y = "stdmdiff", variance = "var", mods = "year_c", levels = slope_lv("unstructured"),
           method = "reml", covariance = list(district = "unstructured", `district:school` = "identity"),
           rma = gen_school("", "REML"), rma_kind = "gen", n_starts = 20)
cs$extras <- nlme_reml_extra(lme_school("pdSymm", "REML"), cs)
add(cs)
cs <- list(name = "schoolcal_slope_unstr_ml", data = "schoolcal",
           formula = "stdmdiff ~ year_c + (1 + year_c | district) + (1 | district:school)",
           y = "stdmdiff", variance = "var", mods = "year_c", levels = slope_lv("unstructured"),
           method = "ml", covariance = list(district = "unstructured", `district:school` = "identity"),
           lme = lme_school("pdSymm", "ML"), n_starts = 20)
cs$extras <- crosscheck_extra("rma", gen_school("", "ML"), cs)
add(cs)

## synthetic slopes
synth_slopes <- datasets$synthetic_slopes
datasets$synthetic_slopes$g_h <- paste(synth_slopes$g, synth_slopes$h, sep = ":")
lme_syn <- function(pd, form, meth) sprintf(
  "lme(y ~ x1 + x2, random = list(g = %s(%s), h = ~ 1), weights = varFixed(~ v), data = dat, method = \"%s\", control = %s)",
  pd, form, meth, NLME_CONTROL)
gen_syn <- function(inner, rho, meth) sprintf(
  "rma.mv(y, v, mods = ~ x1 + x2, random = list(%s | g, ~ 1 | g_h), struct = \"GEN\"%s, data = dat, method = \"%s\", control = %%CONTROL%%)",
  inner, rho, meth)
for (meth in c("reml", "ml")) {
  M <- toupper(meth)
  lvu <- list(level("g", "g", "x1", "unstructured"), level("g:h", c("g", "h")))
  cs <- list(name = paste0("synthetic_slope_unstr_", meth), data = "synthetic_slopes",
             formula = "y ~ x1 + x2 + (1 + x1 | g) + (1 | g:h)", y = "y", variance = "v",
             mods = c("x1", "x2"), levels = lvu, method = meth,
             covariance = list(g = "unstructured", `g:h` = "identity"), n_starts = 6)
  if (meth == "reml") {
    cs$rma <- gen_syn("~ x1", "", M); cs$rma_kind <- "gen"
    cs$extras <- nlme_reml_extra(lme_syn("pdSymm", "~ x1", M), cs)
  } else {
    cs$lme <- lme_syn("pdSymm", "~ x1", M)
    cs$extras <- crosscheck_extra("rma", gen_syn("~ x1", "", M), cs)
  }
  add(cs)
  lvi <- list(level("g", "g", c("x1", "x2"), "independent"), level("g:h", c("g", "h")))
  cs <- list(name = paste0("synthetic_slope_indep_", meth), data = "synthetic_slopes",
             formula = "y ~ x1 + x2 + (1 + x1 + x2 || g) + (1 | g:h)", y = "y", variance = "v",
             mods = c("x1", "x2"), levels = lvi, method = meth,
             covariance = list(g = "independent", `g:h` = "identity"), n_starts = 6)
  if (meth == "reml") {
    cs$rma <- gen_syn("~ x1 + x2", ", rho = 0", M); cs$rma_kind <- "gen"
    cs$extras <- nlme_reml_extra(lme_syn("pdDiag", "~ x1 + x2", M), cs)
  } else {
    cs$lme <- lme_syn("pdDiag", "~ x1 + x2", M)
    cs$extras <- crosscheck_extra("rma", gen_syn("~ x1 + x2", ", rho = 0", M), cs)
  }
  add(cs)
}

## ---- run ----------------------------------------------------------------------------

results <- list()
for (i in seq_along(cases)) {
  cs <- cases[[i]]
  ns <- if (is.null(cs$n_starts)) 10 else cs$n_starts
  results[[i]] <- fit_case(cs, n_random_starts = ns, start_sig = cs$start_sig, seed = 1000 + i)
}

## ---- nlme versus metafor log-likelihood (random intercepts, schoolcal) -------------

conv <- local({
  dat <- schoolcal
  out <- list()
  for (meth in c("ML", "REML")) {
    rm <- run_rma(sprintf("rma.mv(stdmdiff, var, random = ~ 1 | district/school, data = dat, method = \"%s\", control = %%CONTROL%%)", meth), dat)$fit
    lm_call <- sprintf("lme(stdmdiff ~ 1, random = ~ 1 | district/school, weights = varFixed(~ var), data = dat, method = \"%s\", control = %s)", meth, NLME_CONTROL)
    lf <- eval(parse(text = lm_call))
    cs <- list(levels = list(level("district", "district"), level("district:school", c("district", "school"))))
    spec <- make_spec(c(cs, list(data = "schoolcal", y = "stdmdiff", variance = "var",
                                 mods = character(0), method = tolower(meth))))
    e_n <- extract_lme(lf, list(levels = cs$levels))
    out[[tolower(meth)]] <- list(
      metafor_llf = as.numeric(logLik(rm)),
      metafor_sigma2 = I(as.numeric(rm$sigma2)),
      nlme_llf = as.numeric(logLik(lf)),
      nlme_sigma2 = I(vapply(e_n$sig, function(S) S[1, 1], 0, USE.NAMES = FALSE)),
      dense_llf_at_nlme_estimates = dense_eval(spec, e_n$sig)$llf,
      nlme_minus_dense_at_nlme_estimates = as.numeric(logLik(lf)) - dense_eval(spec, e_n$sig)$llf,
      half_logdet_XtX = 0.5 * as.numeric(determinant(crossprod(spec$X))$modulus),
      nlme_source = lm_call)
  }
  out$note <- paste(
    "ML: nlme (sigma fixed at 1, varFixed sampling variances) reports the same log-likelihood and estimates as metafor/Stata; no conversion.",
    "REML: nlme with fixed sigma converges to different variance components and its reported value is not the restricted log-likelihood",
    "(the difference to the dense REML criterion varies with the parameters, so neither +-1/2 log|X'X| nor any constant reconciles them).",
    "REML slope references therefore come from metafor::rma.mv(struct = 'GEN') and the dense likelihood.")
  out
})
cat(sprintf("conventions: ML nlme - metafor = %.3e; REML nlme - dense(at nlme est) = %.6f, metafor REML = %.10f, nlme REML = %.10f\n",
            conv$ml$nlme_llf - conv$ml$metafor_llf, conv$reml$nlme_minus_dense_at_nlme_estimates,
            conv$reml$metafor_llf, conv$reml$nlme_llf))

## ---- write ------------------------------------------------------------------------------

out <- list(
  generated_by = "tests/reference/make_references.R",
  r_version = R.version.string,
  metafor_version = as.character(packageVersion("metafor")),
  nlme_version = as.character(packageVersion("nlme")),
  convention = paste(
    "llf: ML = -1/2 [n log 2pi + log|V| + r'V^-1 r]; REML = -1/2 [(n-p) log 2pi + log|V| + r'V^-1 r + log|X'V^-1X| - log|X'X|]",
    "(Stata meta meregress / metafor). params and bse: fixed effects, intercept '_cons' last; bse = sqrt(diag((X'V^-1X)^-1)).",
    "re_cov: covariance matrix of the random effects per grouping term, rows/cols in re_names order (slopes first, '_cons' last).",
    "Stored values are the reference program's estimates refined on the dense likelihood; llf_source = the program's reported value,",
    "llf_dense = dense likelihood at the program's own estimates, source_max_abs_diff = max |program - stored| over params and re_cov."),
  conventions = conv,
  cases = results)
json <- to_json(out)
if (has_jsonlite) invisible(jsonlite::fromJSON(json, simplifyVector = FALSE))   # validate syntax
writeLines(json, file.path(REF_DIR, "meregress_reference.json"))
cat("wrote", file.path(REF_DIR, "meregress_reference.json"), "with", length(results), "cases\n")
