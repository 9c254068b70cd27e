// The small kernels that move the forward pass's state between launches: the last token's residual row
// (move_row) and the position counter (advance).
// `state` is the model's small int buffer {pos, n_prompt}: kernels read the position from it, so a
// recorded token step can be replayed without re-binding arguments.

// x[0 .. n) = x[row * n .. row * n + n): after a prefill chunk only the last token's residual row goes on to the
// LM head. A kernel, not clEnqueueCopyBuffer: after a buffer copy Oclgrind 21.10 takes parts of the buffer the
// copy did not touch for uninitialized, which made every later check of x report (tests/test_oclgrind.py).
__kernel void move_row(__global float *x, const int row, const int n) {
    for (int i = get_global_id(0); i < n; i += get_global_size(0))
        x[i] = x[(size_t)row * n + i];
}

// Advance past n tokens whose successors are already known (prompt tokens, host-sampled tokens).
__kernel void advance(__global int *state, const int n) {
    state[0] += n;
}
