// Kernels for `dpllama devices --check` and the runtime tests: tiny, each with an obvious answer.

#include "common.h"

// y[i] = a * x[i] + y[i]
__kernel void axpy(__global const float *x, __global float *y, const float a, const int n) {
    const int i = get_global_id(0);
    if (i < n) y[i] = a * x[i] + y[i];
}

// y[i] = x[i] + c, after a busy delay so a missing dependency edge shows up as a wrong answer
__kernel void slow_add(__global const float *x, __global float *y, const float c, const int n, const int spin) {
    const int i = get_global_id(0);
    if (i >= n) return;
    float v = x[i];
    for (int k = 0; k < spin; k++) v = v * 1.0000001f - v * 0.0000001f;   // ~v, keeps the loop alive
    y[i] = v + c;
}

// out[group] = sum of x over the group, through the shared work-group reduction
__kernel void group_sums(__global const float *x, __global float *out, __local float *scratch) {
    const float s = group_sum(x[get_global_id(0)], scratch);
    if (get_local_id(0) == 0) out[get_group_id(0)] = s;
}

// out[i] = sum of x's i-th contiguous slice of n floats: a kernel that only streams memory, to
// measure the device's read bandwidth (`dpllama devices --check`, benchmarks/compare.py)
__kernel void read_sum(__global const float16 *x, __global float *out, const int n16) {
    __global const float16 *p = x + (size_t)get_global_id(0) * n16;
    float16 acc = 0.0f;
    for (int i = 0; i < n16; i++) acc += p[i];
    out[get_global_id(0)] = acc.s0 + acc.s1 + acc.s2 + acc.s3 + acc.s4 + acc.s5 + acc.s6 + acc.s7
                          + acc.s8 + acc.s9 + acc.sa + acc.sb + acc.sc + acc.sd + acc.se + acc.sf;
}
