// The small kernels that move the forward pass's state between launches: the residual rows that go on to the
// LM head (gather_rows) and the position counter (advance).
// `state` is the model's small int buffer {pos, n_prompt}: kernels read the position from it, so a
// recorded token step can be replayed without re-binding arguments.

// Row i of x = row rows[first + i], i < count (rows of n floats): only the rows whose logits are wanted go on to
// the LM head (a prefill chunk's last token; in a batch, each sequence's last). The rows are in increasing order
// and rows[first + i] >= i, so a row is read before any write lands on it. A kernel, not clEnqueueCopyBuffer:
// after a buffer copy Oclgrind 21.10 takes parts of the buffer the copy did not touch for uninitialized, which
// made every later check of x report (tests/test_oclgrind.py).
__kernel void gather_rows(__global float *x, __global const int *rows, const int first, const int count,
                          const int n) {
    for (int c = get_global_id(0); c < n; c += get_global_size(0))
        for (int i = 0; i < count; i++)
            x[(size_t)i * n + c] = x[(size_t)rows[first + i] * n + c];
}

// Advance past n tokens whose successors are already known (prompt tokens, host-sampled tokens).
__kernel void advance(__global int *state, const int n) {
    state[0] += n;
}
