// CUDA kernels of the CUDA path (`layers::cuda`): batch norm fused with its ReLU, the
// im2col/col2im halves of convolution (the GEMMs are cuBLAS, through Candle's matmul), the
// bias after a cuDNN convolution, and the fused SGD update of `optim.rs`.
// Compiled to PTX by build.rs with the `cuda` feature; float32, contiguous NCHW. Index
// arithmetic is 32-bit (the host refuses tensors of 2^32 elements or more): 64-bit division
// costs several times more instructions, and these kernels are all index arithmetic and
// memory traffic.
//
// Every layer kernel has a CPU twin in Rust with the same arithmetic: the default tests check the
// path on the CPU, `trainer check-ops --device cuda` checks these against Candle on the GPU.

typedef unsigned int u32;

#define BLOCK 512

// Block-wide sum of one float per thread (BLOCK threads); every thread gets the result.
__device__ float block_sum(float v, float* shared) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffff, v, offset);
    u32 lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    __syncthreads();
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < BLOCK / 32 ? shared[lane] : 0.0f;
        for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffff, v, offset);
        if (lane == 0) shared[0] = v;
    }
    __syncthreads();
    float total = shared[0];
    __syncthreads();
    return total;
}

// The per-channel reductions split each channel's n·plane elements into `parts` chunks, one
// block per (channel, chunk): with few channels (64 at the first layers) one block per
// channel would leave most of an H100's 132 SMs idle.
__device__ void chunk(u32 count, u32 parts, u32 part, u32* begin, u32* end) {
    u32 size = (count + parts - 1) / parts;
    *begin = min(count, part * size);
    *end = min(count, *begin + size);
}

// Element `i` of channel `ch`'s n·plane elements.
__device__ __forceinline__ u32 at(u32 i, u32 ch, u32 c, u32 plane) {
    u32 sample = i / plane;
    return (sample * c + ch) * plane + (i - sample * plane);
}

// Pass 1 of the statistics, block (ch, part): the chunk's element count, mean and sum of
// squared deviations (two passes over a chunk that stays in cache), into partial[ch][part].
extern "C" __global__ void bn_stats_partial(const float* x, float* partial, u32 n, u32 c,
                                            u32 plane, u32 parts) {
    __shared__ float shared[BLOCK / 32];
    u32 ch = blockIdx.x, part = blockIdx.y, begin, end;
    chunk(n * plane, parts, part, &begin, &end);
    float s = 0.0f;
    for (u32 i = begin + threadIdx.x; i < end; i += BLOCK) s += x[at(i, ch, c, plane)];
    float count = (float)(end - begin);
    float mean = count > 0.0f ? block_sum(s, shared) / count : 0.0f;
    float q = 0.0f;
    for (u32 i = begin + threadIdx.x; i < end; i += BLOCK) {
        float d = x[at(i, ch, c, plane)] - mean;
        q += d * d;
    }
    float m2 = block_sum(q, shared);
    if (threadIdx.x == 0) {
        float* p = partial + 3 * (ch * parts + part);
        p[0] = count;
        p[1] = mean;
        p[2] = m2;
    }
}

// Pass 2, one thread per channel: the chunks combined (Chan et al.'s parallel variance),
// out[ch] = mean, out[c + ch] = biased variance.
extern "C" __global__ void bn_stats_combine(const float* partial, float* out, u32 c, u32 parts) {
    u32 ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    float count = 0.0f, mean = 0.0f, m2 = 0.0f;
    for (u32 part = 0; part < parts; ++part) {
        const float* p = partial + 3 * (ch * parts + part);
        float nb = p[0];
        if (nb == 0.0f) continue;
        float total = count + nb, delta = p[1] - mean;
        mean += delta * nb / total;
        m2 += p[2] + delta * delta * count * nb / total;
        count = total;
    }
    out[ch] = mean;
    out[c + ch] = count > 0.0f ? m2 / count : 0.0f;
}

// y = relu(x * scale[ch] + shift[ch]).
extern "C" __global__ void scale_shift_relu(const float* x, const float* scale, const float* shift,
                                            float* y, u32 elements, u32 c, u32 plane) {
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < elements; i += gridDim.x * blockDim.x) {
        u32 ch = (i / plane) % c;
        y[i] = fmaxf(x[i] * scale[ch] + shift[ch], 0.0f);
    }
}

// Backward, pass 1, block (ch, part): with g = dy where y > 0 (else 0), the chunk's Σ g and
// Σ g·(x − mean) into partial[ch][part].
extern "C" __global__ void bn_backward_partial(const float* x, const float* y, const float* dy,
                                               const float* mean, float* partial, u32 n, u32 c,
                                               u32 plane, u32 parts) {
    __shared__ float shared[BLOCK / 32];
    u32 ch = blockIdx.x, part = blockIdx.y, begin, end;
    chunk(n * plane, parts, part, &begin, &end);
    float m = mean[ch];
    float sg = 0.0f, sgx = 0.0f;
    for (u32 i = begin + threadIdx.x; i < end; i += BLOCK) {
        u32 a = at(i, ch, c, plane);
        float g = y[a] > 0.0f ? dy[a] : 0.0f;
        sg += g;
        sgx += g * (x[a] - m);
    }
    float sum_g = block_sum(sg, shared);
    float sum_gx = block_sum(sgx, shared);
    if (threadIdx.x == 0) {
        partial[2 * (ch * parts + part)] = sum_g;
        partial[2 * (ch * parts + part) + 1] = sum_gx;
    }
}

// Backward, pass 2, one thread per channel: out[elements + ch] = Σ g·x̂ (dgamma) and
// out[elements + c + ch] = Σ g (dbeta), after the dx block.
extern "C" __global__ void bn_backward_combine(const float* partial, const float* inv_std,
                                               float* out, u32 elements, u32 c, u32 parts) {
    u32 ch = blockIdx.x * blockDim.x + threadIdx.x;
    if (ch >= c) return;
    float sg = 0.0f, sgx = 0.0f;
    for (u32 part = 0; part < parts; ++part) {
        sg += partial[2 * (ch * parts + part)];
        sgx += partial[2 * (ch * parts + part) + 1];
    }
    out[elements + ch] = sgx * inv_std[ch];
    out[elements + c + ch] = sg;
}

// Backward, pass 3: dx = gamma·inv_std/N · (N·g − Σg − x̂·Σg·x̂), reading the sums pass 2
// left after the dx block.
extern "C" __global__ void bn_backward_dx(const float* x, const float* y, const float* dy,
                                          const float* mean, const float* inv_std,
                                          const float* gamma, float* out, u32 n, u32 c, u32 plane) {
    u32 elements = n * c * plane;
    float count = (float)(n * plane);
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < elements; i += gridDim.x * blockDim.x) {
        u32 ch = (i / plane) % c;
        float s = inv_std[ch];
        float sum_gx = out[elements + ch], sum_g = out[elements + c + ch];
        float g = y[i] > 0.0f ? dy[i] : 0.0f;
        float k = gamma[ch] * s / count;
        out[i] = k * (count * g - sum_g - (x[i] - mean[ch]) * s * sum_gx);
    }
}

// The column matrices of a convolution, in `groups` blocks of consecutive samples:
// cols[group][(ci, ky, kx)][(sample in group, oy, ox)], row-major [groups, ci·kh·kw,
// (n / groups)·oh·ow]. Grouping turns each gradient GEMM into a batch of `groups` GEMMs, which
// keeps the GPU busy where a single weight-gradient GEMM (a small output, a huge inner
// dimension) would run on a handful of SMs.
struct Conv {
    u32 n, ci, h, w, kh, kw, oh, ow, stride, pad_h, pad_w, groups;
};

// For element i of the column matrix: the input element it reads, or -1 for padding.
__device__ __forceinline__ int conv_source(const Conv& d, u32 i) {
    u32 taps = d.ci * d.kh * d.kw;
    u32 columns = (d.n / d.groups) * d.oh * d.ow;
    u32 group = i / (taps * columns), rest = i - group * taps * columns;
    u32 tap = rest / columns, column = group * columns + (rest - tap * columns);
    u32 kx = tap % d.kw, ky = (tap / d.kw) % d.kh, channel = tap / (d.kh * d.kw);
    u32 ox = column % d.ow, oy = (column / d.ow) % d.oh, sample = column / (d.ow * d.oh);
    int iy = (int)(oy * d.stride + ky) - (int)d.pad_h, ix = (int)(ox * d.stride + kx) - (int)d.pad_w;
    if (iy < 0 || iy >= (int)d.h || ix < 0 || ix >= (int)d.w) return -1;
    return (int)(((sample * d.ci + channel) * d.h + iy) * d.w + ix);
}

extern "C" __global__ void im2col(const float* x, float* cols, Conv d) {
    u32 total = d.ci * d.kh * d.kw * d.n * d.oh * d.ow;
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        int source = conv_source(d, i);
        cols[i] = source < 0 ? 0.0f : x[source];
    }
}

// The adjoint of im2col: dx[sample, ci, iy, ix] = Σ over the taps that read it of the column
// gradient. A gather (one thread per input element), so no atomics.
extern "C" __global__ void col2im(const float* dcols, float* dx, Conv d) {
    u32 total = d.n * d.ci * d.h * d.w;
    u32 per_group = d.n / d.groups;
    u32 columns = per_group * d.oh * d.ow;
    u32 taps = d.ci * d.kh * d.kw;
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        u32 ix = i % d.w, iy = (i / d.w) % d.h, channel = (i / (d.w * d.h)) % d.ci;
        u32 sample = i / (d.w * d.h * d.ci);
        u32 group = sample / per_group, local = sample - group * per_group;
        const float* block = dcols + (size_t)group * taps * columns;
        float acc = 0.0f;
        for (u32 ky = 0; ky < d.kh; ++ky) {
            int ty = (int)(iy + d.pad_h) - (int)ky;
            if (ty < 0 || ty % d.stride != 0) continue;
            u32 oy = ty / d.stride;
            if (oy >= d.oh) continue;
            for (u32 kx = 0; kx < d.kw; ++kx) {
                int tx = (int)(ix + d.pad_w) - (int)kx;
                if (tx < 0 || tx % d.stride != 0) continue;
                u32 ox = tx / d.stride;
                if (ox >= d.ow) continue;
                u32 tap = (channel * d.kh + ky) * d.kw + kx;
                acc += block[tap * columns + (local * d.oh + oy) * d.ow + ox];
            }
        }
        dx[i] = acc;
    }
}

// The forward GEMMs' product Y' [groups, co, (n / groups)·plane] into NCHW, adding the bias:
// y[s, c, p] = Y'[s / per_group, c, (s % per_group)·plane + p] + bias[c].
extern "C" __global__ void rows_to_nchw(const float* yt, const float* bias, float* y, u32 n,
                                        u32 co, u32 plane, u32 groups) {
    u32 total = n * co * plane;
    u32 per_group = n / groups;
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < total; i += gridDim.x * blockDim.x) {
        u32 p = i % plane, c = (i / plane) % co, s = i / (plane * co);
        u32 group = s / per_group, local = s - group * per_group;
        y[i] = yt[(group * co + c) * (per_group * plane) + local * plane + p] + bias[c];
    }
}

// SGD with momentum and weight decay (optim.rs), in place, one launch per pass:
// v = momentum·v + (g + weight_decay·w), then w = w − lr·v.
extern "C" __global__ void sgd_velocity(float* v, const float* g, const float* w, u32 n,
                                        float momentum, float weight_decay) {
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        v[i] = momentum * v[i] + (g[i] + weight_decay * w[i]);
}

extern "C" __global__ void sgd_descent(float* w, const float* v, u32 n, float lr) {
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x)
        w[i] = w[i] - lr * v[i];
}

// y[s, c, p] += bias[c], in place (after cuDNN's convolution).
extern "C" __global__ void add_channel_bias(float* y, const float* bias, u32 elements, u32 c,
                                            u32 plane) {
    for (u32 i = blockIdx.x * blockDim.x + threadIdx.x; i < elements; i += gridDim.x * blockDim.x)
        y[i] += bias[(i / plane) % c];
}
