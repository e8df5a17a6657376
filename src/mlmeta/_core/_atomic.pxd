"""An atomic fetch-and-add for the counters that threads share (C, inlined where
cimported)."""

cdef extern from *:
    """
    /* The row counter of a batch shared by its threads: fetch and add, atomically. */
    #if defined(_MSC_VER)
    #include <intrin.h>
    #if defined(_WIN64)
    static Py_ssize_t mlmeta_fetch_add(Py_ssize_t* p, Py_ssize_t v) {
        return (Py_ssize_t)_InterlockedExchangeAdd64((volatile __int64*)p, (__int64)v); }
    #else
    static Py_ssize_t mlmeta_fetch_add(Py_ssize_t* p, Py_ssize_t v) {
        return (Py_ssize_t)_InterlockedExchangeAdd((volatile long*)p, (long)v); }
    #endif
    #else
    static Py_ssize_t mlmeta_fetch_add(Py_ssize_t* p, Py_ssize_t v) {
        return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
    #endif
    """
    Py_ssize_t mlmeta_fetch_add(Py_ssize_t* p, Py_ssize_t v) nogil
