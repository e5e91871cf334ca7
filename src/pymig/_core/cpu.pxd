from pymig._core.kernels cimport pymig_ops

# The kernel table of the variant in use; other _core modules call it for every kernel call,
# so switching variants (tests) takes effect everywhere at once.
cdef const pymig_ops *current_ops() noexcept nogil
