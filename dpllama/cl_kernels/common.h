// Helpers that several programs share: token pasting (CAT) and the work-group barrier and reductions, which
// compile away in work-groups of one work-item (-DSOLO).

#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)

// -DSOLO: built for work-groups of one work-item (CPU configs), where there is nothing to share or wait
// for, so the group reductions and barriers compile away. PoCL's compiler splits a kernel at every
// barrier, and on qkv_attention, with barriers inside loops, it ran for minutes.
#if defined(SOLO)
#define group_barrier(flags)
#else
#define group_barrier(flags) barrier(flags)
#endif

// Sum of `v` over the work-group; `scratch` holds get_local_size(0) floats. Every work-item
// gets the total. Ends with a barrier so `scratch` may be reused at once.
inline float group_sum(float v, __local float *scratch) {
#if defined(SOLO)
    return v;
#else
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
#endif
}

inline float group_max(float v, __local float *scratch) {
#if defined(SOLO)
    return v;
#else
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
#endif
}
