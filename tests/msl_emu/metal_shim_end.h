// Undoes the address-space and attribute macros of metal_shim.h after the kernel sources are included.
#undef device
#undef constant
#undef thread
#undef threadgroup
#undef kernel
#undef host_name
#undef buffer
#undef threadgroup_position_in_grid
#undef threadgroups_per_grid
#undef thread_index_in_threadgroup
#undef threads_per_threadgroup
#undef thread_index_in_simdgroup
#undef simdgroup_index_in_threadgroup
#undef simdgroups_per_threadgroup
