# Declarations shared by the kernels that reuse the nested-tree factorisation
# (see _nested.pyx for the layout and the identities they compute).

cdef enum:
    MAXLEV = 64


cdef struct Tree:
    Py_ssize_t n_levels
    int ncol
    const Py_ssize_t* nq        # effects per node (q_l, or the merged size of a dense cluster)
    const Py_ssize_t* level
    const Py_ssize_t* parent
    const Py_ssize_t* zz_ptr
    const Py_ssize_t* za_ptr
    const Py_ssize_t* tn_ptr    # offset of each node's (nq x nq) factor in Tn
    const double* ZZ
    const double* ZA
    const double* T             # per-node factors Tn (assembled from the level factors)
    bint scalar                 # every node carries one effect (nq == 1): scalar loops
    bint no_S                   # factor without accumulating S -= Y'Y (the caller uses Y)
    const double* PW            # NULL, or per node W_a Phi (za_ptr layout) given by the caller


cdef Py_ssize_t factor_cluster(const Tree* t, Py_ssize_t a0, Py_ssize_t a1,
                               double* WB, double* WR, double* S, double* logdet,
                               double* scratch) noexcept nogil

cdef void invert_cluster(const Tree* t, Py_ssize_t a0, Py_ssize_t a1, const double* WB,
                         const double* WR, double* SB, double* WW) noexcept nogil

cdef void accumulate_cluster(const Tree* t, Py_ssize_t a0, Py_ssize_t a1, const double* SB,
                             const double* WW, double* KK, const double* Phi, double* GN,
                             double* EN, double* scratch, Py_ssize_t maxq) noexcept nogil


cdef struct SubBlocks:
    Py_ssize_t n_sub
    const Py_ssize_t* sub_node     # node holding each (group's) level factor
    const Py_ssize_t* sub_level
    const Py_ssize_t* sub_off      # where it starts inside the node's factor
    const Py_ssize_t* nq
    const Py_ssize_t* tn_ptr
    const Py_ssize_t* q
    const Py_ssize_t* t_off

cdef void assemble_factors(const SubBlocks* sb, const double* T, double* Tn) noexcept nogil

cdef void reduce_factors(const SubBlocks* sb, const double* N, double* out) noexcept nogil


cdef class NestedKernel:
    cdef readonly Py_ssize_t n_levels, n_nodes, n_clusters, ncol, maxq
    cdef public bint force_general     # use the blocked kernels even for scalar trees (tests)
    cdef readonly object q, nq, level, parent, zz_ptr, za_ptr, tn_ptr, t_off, cluster_ptr
    cdef readonly object sub_node, sub_level, sub_off
    cdef readonly object ZZ, ZA, AA
    cdef Py_ssize_t[::1] _q, _nq, _level, _parent, _zz_ptr, _za_ptr, _tn_ptr, _t_off, _cluster_ptr
    cdef Py_ssize_t[::1] _sub_node, _sub_level, _sub_off
    cdef double[::1] _ZZ, _ZA

    cdef Tree _tree(self)
    cdef SubBlocks _subblocks(self) noexcept nogil
