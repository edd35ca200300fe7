// CUDA kernels of the GPU path (`layers::gpu`): batch norm fused with its ReLU, and the
// im2col/col2im halves of convolution gradients (the GEMMs are cuBLAS, through Candle's
// matmul). Compiled to PTX by build.rs with the `cuda` feature; float32, contiguous NCHW.
// Every kernel has a CPU twin in Rust with the same arithmetic: the default tests check the
// path on the CPU, `trainer check-ops --device cuda` checks these against Candle on the GPU.

#define BLOCK 512

// Block-wide sum of one float per thread (BLOCK threads); every thread gets the result.
__device__ float block_sum(float v, float* shared) {
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffff, v, offset);
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
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

// One block per channel: out[ch] = mean, out[c + ch] = biased variance (two passes over the
// channel, which stays in L2 between them).
extern "C" __global__ void bn_stats(const float* x, float* out, int n, int c, int plane) {
    __shared__ float shared[BLOCK / 32];
    int ch = blockIdx.x;
    long count = (long)n * plane;
    float s = 0.0f;
    for (long i = threadIdx.x; i < count; i += BLOCK) {
        long sample = i / plane, p = i - sample * plane;
        s += x[(sample * c + ch) * plane + p];
    }
    float mean = block_sum(s, shared) / (float)count;
    float q = 0.0f;
    for (long i = threadIdx.x; i < count; i += BLOCK) {
        long sample = i / plane, p = i - sample * plane;
        float d = x[(sample * c + ch) * plane + p] - mean;
        q += d * d;
    }
    float var = block_sum(q, shared) / (float)count;
    if (threadIdx.x == 0) {
        out[ch] = mean;
        out[c + ch] = var;
    }
}

// y = relu(x * scale[ch] + shift[ch]).
extern "C" __global__ void scale_shift_relu(const float* x, const float* scale, const float* shift,
                                            float* y, long elements, int c, int plane) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < elements;
         i += (long)gridDim.x * blockDim.x) {
        int ch = (int)((i / plane) % c);
        y[i] = fmaxf(x[i] * scale[ch] + shift[ch], 0.0f);
    }
}

// Backward, first pass, one block per channel: with g = dy where y > 0 (else 0) and
// x̂ = (x - mean) * inv_std, out[elements + ch] = Σ g·x̂ (dgamma), out[elements + c + ch] = Σ g
// (dbeta).
extern "C" __global__ void bn_backward_sums(const float* x, const float* y, const float* dy,
                                            const float* mean, const float* inv_std, float* out,
                                            int n, int c, int plane) {
    __shared__ float shared[BLOCK / 32];
    int ch = blockIdx.x;
    long count = (long)n * plane;
    float m = mean[ch];
    float sg = 0.0f, sgx = 0.0f;
    for (long i = threadIdx.x; i < count; i += BLOCK) {
        long sample = i / plane, p = i - sample * plane;
        long at = (sample * c + ch) * plane + p;
        float g = y[at] > 0.0f ? dy[at] : 0.0f;
        sg += g;
        sgx += g * (x[at] - m);
    }
    float sum_g = block_sum(sg, shared);
    float sum_gx = block_sum(sgx, shared) * inv_std[ch];
    if (threadIdx.x == 0) {
        long elements = count * c;
        out[elements + ch] = sum_gx;
        out[elements + c + ch] = sum_g;
    }
}

// Backward, second pass: dx = gamma·inv_std/N · (N·g − Σg − x̂·Σg·x̂), reading the sums the
// first pass left after the dx block.
extern "C" __global__ void bn_backward_dx(const float* x, const float* y, const float* dy,
                                          const float* mean, const float* inv_std,
                                          const float* gamma, float* out, int n, int c, int plane) {
    long count = (long)n * plane;
    long elements = count * c;
    float fcount = (float)count;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < elements;
         i += (long)gridDim.x * blockDim.x) {
        int ch = (int)((i / plane) % c);
        float s = inv_std[ch];
        float sum_gx = out[elements + ch], sum_g = out[elements + c + ch];
        float g = y[i] > 0.0f ? dy[i] : 0.0f;
        float k = gamma[ch] * s / fcount;
        out[i] = k * (fcount * g - sum_g - (x[i] - mean[ch]) * s * sum_gx);
    }
}

// cols[(ci, ky, kx), (sample, oy, ox)] = x[sample, ci, oy·stride − pad_h + ky, ox·stride − pad_w + kx]
// (0 outside the image): row-major [ci·kh·kw, n·oh·ow], so that neighbouring threads write
// neighbouring outputs and read neighbouring pixels. The weight gradient is then one GEMM,
// dW[co, ci·kh·kw] = dY'[co, n·oh·ow] · colsᵀ.
extern "C" __global__ void im2col(const float* x, float* cols, int n, int ci, int h, int w,
                                  int kh, int kw, int oh, int ow, int stride, int pad_h,
                                  int pad_w) {
    long row_len = (long)n * oh * ow;
    long total = (long)ci * kh * kw * row_len;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total;
         i += (long)gridDim.x * blockDim.x) {
        long tap = i / row_len, col = i - tap * row_len;
        int kx = (int)(tap % kw), ky = (int)((tap / kw) % kh), channel = (int)(tap / (kh * kw));
        int ox = (int)(col % ow), oy = (int)((col / ow) % oh);
        long sample = col / ((long)ow * oh);
        int iy = oy * stride - pad_h + ky, ix = ox * stride - pad_w + kx;
        float v = 0.0f;
        if (iy >= 0 && iy < h && ix >= 0 && ix < w) v = x[((sample * ci + channel) * h + iy) * w + ix];
        cols[i] = v;
    }
}

// The adjoint of im2col: dx[sample, ci, iy, ix] = Σ over the taps that read it of
// dcols[(ci, ky, kx), (sample, oy, ox)], where dcols = Wᵀ · dY' is the input gradient GEMM's
// product. A gather (one thread per input element), so no atomics.
extern "C" __global__ void col2im(const float* dcols, float* dx, int n, int ci, int h, int w,
                                  int kh, int kw, int oh, int ow, int stride, int pad_h,
                                  int pad_w) {
    long total = (long)n * ci * h * w;
    long row_len = (long)n * oh * ow;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total;
         i += (long)gridDim.x * blockDim.x) {
        int ix = (int)(i % w), iy = (int)((i / w) % h), channel = (int)((i / ((long)w * h)) % ci);
        long sample = i / ((long)w * h * ci);
        float acc = 0.0f;
        for (int ky = 0; ky < kh; ++ky) {
            int ty = iy + pad_h - ky;
            if (ty < 0 || ty % stride != 0) continue;
            int oy = ty / stride;
            if (oy >= oh) continue;
            for (int kx = 0; kx < kw; ++kx) {
                int tx = ix + pad_w - kx;
                if (tx < 0 || tx % stride != 0) continue;
                int ox = tx / stride;
                if (ox >= ow) continue;
                long tap = ((long)channel * kh + ky) * kw + kx;
                acc += dcols[tap * row_len + (sample * oh + oy) * ow + ox];
            }
        }
        dx[i] = acc;
    }
}

// The forward GEMM's product Y' [co, n·plane] (all samples' outputs of one channel in a row)
// into NCHW, adding the bias: y[s, c, p] = Y'[c, s, p] + bias[c].
extern "C" __global__ void rows_to_nchw(const float* yt, const float* bias, float* y, int n,
                                        int co, int plane) {
    long total = (long)n * co * plane;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total;
         i += (long)gridDim.x * blockDim.x) {
        long p = i % plane;
        int c = (int)((i / plane) % co);
        long s = i / ((long)plane * co);
        y[i] = yt[((long)c * n + s) * plane + p] + bias[c];
    }
}
