// Helpers shared by every program (prepended by dpllama.runtime.program).

// Sum of `v` over the work-group; `scratch` holds get_local_size(0) floats. Every work-item
// gets the total. Ends with a barrier so `scratch` may be reused at once.
inline float group_sum(float v, __local float *scratch) {
    const int lid = get_local_id(0), n = get_local_size(0);
    scratch[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = n / 2; s > 0; s >>= 1) {   // local sizes are powers of two
        if (lid < s) scratch[lid] += scratch[lid + s];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float total = scratch[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return total;
}

inline float group_max(float v, __local float *scratch) {
    const int lid = get_local_id(0), n = get_local_size(0);
    scratch[lid] = v;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int s = n / 2; s > 0; s >>= 1) {
        if (lid < s) scratch[lid] = fmax(scratch[lid], scratch[lid + s]);
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const float m = scratch[0];
    barrier(CLK_LOCAL_MEM_FENCE);
    return m;
}
