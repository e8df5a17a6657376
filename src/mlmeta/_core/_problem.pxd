# The problem and workspace structs shared by the engine's modules: the fitting
# engine (_engine.pyx), the covariance structures' maps (_structures.pyx) and the
# objective (_objective.pyx). See _engine.pyx for what they hold.

from mlmeta._core._nested cimport Tree, SubBlocks

cdef enum:
    K_IDENTITY = 0
    K_INDEPENDENT = 1
    K_EXCHANGEABLE = 2
    K_UNSTRUCTURED = 3
    K_CUSTOM = 4
    K_SPATIAL = 5      # sigma^2 R(rho) across a crossed level's groups (see _structures.pyx)

# a scalar tree (one effect per node) with at least this many columns in [X, y] takes its
# per-node products S -= Y_a'Y_a and Phi W_a' as one BLAS call each over all nodes
cdef enum:
    WIDE_NC = 16

# status codes of an evaluation (> 0: 1 + the node whose block failed)
cdef enum:
    ST_OK = 0
    ST_H = -1          # X'V^-1X not positive definite
    ST_R = -2          # a custom level's correlation matrix not positive definite
    ST_SIGMA = -3      # profiled residual variance not positive
    ST_NONFINITE = -4  # theta not finite
    ST_BORDER = -5     # the crossed terms' block (after eliminating the tree) not positive definite
    ST_SPATIAL = -6    # a spatial correlation matrix R(rho) not positive semi-definite


cdef struct Prob:
    Tree tree
    SubBlocks sb
    Py_ssize_t n_clusters, n_nodes, n_levels, n_obs
    const Py_ssize_t* cluster_ptr
    const Py_ssize_t* q
    const Py_ssize_t* t_off
    const Py_ssize_t* kind
    const Py_ssize_t* th_off
    const Py_ssize_t* n_th
    const Py_ssize_t* n_sd       # custom levels: number of free SDs (the rest are correlations)
    const Py_ssize_t* c_off      # custom levels: offset into cmap / cfix (q + q*q entries)
    const Py_ssize_t* cmap       # sd_map (q) then corr_map (q x q): local theta index or -1
    const double* cfix           # the fixed values where the map is -1
    const double* clag           # custom levels: lags d (R_ij = rho^d_ij; 1 for a pattern), as cfix
    const double* n_groups
    const double* M              # t_len x n_theta, column-major: dT/dtheta of linear levels
    const double* lower
    const double* upper
    const double* ZA0
    const double* AA0
    const double* Zw
    const Py_ssize_t* zw_off
    const double* Xw
    const Py_ssize_t* node_r0
    const Py_ssize_t* node_r1
    Py_ssize_t zz_len, za_len, tn_len, t_len, maxq, scratch_len
    # crossed terms (the border; nb = 0 for a nested model): levels n_tree.. are crossed;
    # a crossed level l's effects are border rows b_off[l] + g q_l + i; top-level cluster j
    # sees the border effects bmap[cmap_ptr[j] : cmap_ptr[j + 1]] as its first local columns
    # (its nodes' ZA blocks are cw[j] = m_j + ncol wide); S0 is the Gram matrix of the
    # whitened [Z_cross, X, y] ((nb + ncol)^2, column-major)
    Py_ssize_t nb, n_tree, maxw
    # a crossed level with a known correlation R across its groups (q = 1): its block of
    # T_c is t L_R (L_R = chol(R), G x G at bL + b_lo[l]); b_lo[l] = -1 otherwise
    const Py_ssize_t* b_lo
    const double* bL
    # a crossed level with a spatial correlation R(rho) across its groups (sp_form[l] = 1..5:
    # SPEXP, SPGAU, SPLIN, SPRAT, SPSPH; 0 otherwise): its G x G distances at sp_D + b_lo[l],
    # its factor recomputed per theta into the workspace's bL (same layout as bL)
    const Py_ssize_t* sp_form
    const double* sp_D
    Py_ssize_t bl_len, sp_scratch
    bint has_spatial
    # wide clusters (each sees most of the border): the tree's Y rows and node solutions
    # go through one ny x bw matrix and two BLAS products instead of per-cluster blocks;
    # y_row[a] = the first of node a's rows (ny = total effects of the tree)
    bint wide
    Py_ssize_t ny
    const Py_ssize_t* y_row
    const Py_ssize_t* cw
    const Py_ssize_t* cmap_ptr
    const Py_ssize_t* bmap
    const Py_ssize_t* b_off
    const double* S0
    # a deepest level of one-row, one-effect groups folded into the diagonal (_fold.pyx):
    # its level index (-1: none); the tree then has no nodes at that level, and yw is the
    # design's own whitened outcome (rows of A are rebuilt from Xw and it)
    Py_ssize_t fold
    const double* yw
    # threads one evaluation may use (the two-level fold's halves, _fold.pyx): set per fit
    int eval_threads
    int n_theta, p, ncol, reml, profiled, has_custom
    double logdet_Lambda, logdet_XtX, scale


cdef struct Work:
    double* WB
    double* WR
    double* SB
    double* WW
    double* KK
    double* Tn
    double* GN
    double* EN
    double* ZA
    double* AA
    double* S
    double* scratch
    double* Tlev
    double* G
    double* E
    double* Hc
    double* Hinv
    double* beta
    double* Phi
    double* D        # dT/dtheta (t_len x n_theta): M, with custom levels' columns per evaluation
    double* cs       # custom-structure scratch
    double* tmp      # optimiser scratch: see fit_one
    # crossed terms (see _border.pyx): nb = border size, bw = nb + ncol
    double* Sb       # bw x bw: [Z_c, A]' V_tree^-1 [Z_c, A]
    double* Cb       # nb x nb: I + T_c' S_cc T_c, then its Cholesky factor
    double* Pb       # nb x nb: S_cc T_c
    double* Sg       # nb x nb: C_c^-1
    double* Wb       # nb x ncol: T_c' S_cA, then L^-1 of it, then C_c^-1 T_c' S_cA
    double* Kb       # nb x ncol: S_cA - S_cc T_c W
    double* PhiB     # bw x bw: d dev / d Sb (the tree's Phi)
    double* Sl       # maxw^2: a cluster's local S / Phi
    double* Ym       # wide: ny x bw, the tree's Y (then W) rows at their border columns
    double* Yp       # wide: ny x bw, W Phi_b
    double* PWn      # wide: za_len, W_a Phi_b per node in the local layout
    # known and spatial correlations across a crossed level's groups
    double* bL       # bl_len: the factors (P.bL, spatial levels' F(rho) per evaluation)
    double* dR       # bl_len: dR/drho of the spatial levels
    double* Gx       # n_theta: gradient terms outside dT/dtheta (the spatial levels' rho)
    double* sp       # sp_scratch: the spatial levels' factorisation and gradient scratch
    # the folded level (P.fold >= 0): rows of A = [X, y] (n x ncol, row-major), the row
    # weights 1 / (1 + t^2 z^2), the tree's reweighted ZZ (zz_len) and a row's chain
    # ((t_len + 1) (ncol + 1))
    double* Ar
    double* wr
    double* ZZf
    double* fu
    double sigma2, rss, logdet_C, logdet_H
    int n_evals, status
    bint own         # ZA and AA hold the design's own outcome (set_response(NULL))
    # the fields above are written at every evaluation; the workspaces of a batch's threads
    # lie side by side in one array: two cache lines apart, no thread's writes land on the
    # line another thread reads its pointers from
    double pad[16]


cdef inline void bind_work(Work* W, double* buf, const Py_ssize_t* o) noexcept nogil:
    """Point a workspace's arrays into ``buf`` at the offsets ``o``, in the order of the
    sizes that ``Problem._ensure_slots`` lays out."""
    W.WB = buf + o[0]
    W.SB = buf + o[1]
    W.WR = buf + o[2]
    W.WW = buf + o[3]
    W.KK = buf + o[4]
    W.Tn = buf + o[5]
    W.GN = buf + o[6]
    W.EN = buf + o[7]
    W.ZA = buf + o[8]
    W.AA = buf + o[9]
    W.S = buf + o[10]
    W.scratch = buf + o[11]
    W.Tlev = buf + o[12]
    W.G = buf + o[13]
    W.E = buf + o[14]
    W.Hc = buf + o[15]
    W.Hinv = buf + o[16]
    W.beta = buf + o[17]
    W.Phi = buf + o[18]
    W.D = buf + o[19]
    W.cs = buf + o[20]
    W.tmp = buf + o[21]
    W.Sb = buf + o[22]
    W.Cb = buf + o[23]
    W.Pb = buf + o[24]
    W.Sg = buf + o[25]
    W.Wb = buf + o[26]
    W.Kb = buf + o[27]
    W.PhiB = buf + o[28]
    W.Sl = buf + o[29]
    W.Ym = buf + o[30]
    W.Yp = buf + o[31]
    W.PWn = buf + o[32]
    W.bL = buf + o[33]
    W.dR = buf + o[34]
    W.Gx = buf + o[35]
    W.sp = buf + o[36]
    W.Ar = buf + o[37]
    W.wr = buf + o[38]
    W.ZZf = buf + o[39]
    W.fu = buf + o[40]
