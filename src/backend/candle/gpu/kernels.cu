// The Candle backend's own CUDA kernels (the `cuda` feature): what candle's CUDA ops do
// slowly or in many launches for these models. Compiled to PTX by build.rs with nvcc; loaded
// once per device by `gpu/mod.rs`. Each is the same arithmetic as its CPU reference in
// `device_ops.rs`, one thread per output element. f32, contiguous NCHW.

// Act codes: the order of `cpu::Act` as `gpu::act_code` numbers it.
__device__ __forceinline__ float aei_act(float v, int act) {
    switch (act) {
    case 1: return fmaxf(v, 0.0f);                       // relu
    case 2: return fminf(fmaxf(v, 0.0f), 6.0f);          // relu6
    case 3: return v / (1.0f + __expf(-v));              // silu
    case 4: return 1.0f / (1.0f + __expf(-v));           // sigmoid
    case 5: return __expf(v);                            // exp
    default: return v;                                   // none
    }
}

// y[i] = act(x[i] + bias[channel of i]) over [n, c, hw]; bias may be null.
extern "C" __global__ void aei_bias_act(float* y, const float* x, const float* bias,
                                        unsigned long long len, unsigned c, unsigned hw, int act) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= len) return;
    float v = x[i];
    if (bias != nullptr) v += bias[(i / hw) % c];
    y[i] = aei_act(v, act);
}

// Depthwise k x k convolution, stride s, zero padding (top, left), bias, activation.
// x: [n*c, h, w]; w: [c, k, k]; y: [n*c, ho, wo].
extern "C" __global__ void aei_depthwise(float* y, const float* x, const float* w, const float* bias,
                                         unsigned nc, unsigned c, unsigned h, unsigned wd,
                                         unsigned ho, unsigned wo, unsigned k, unsigned s,
                                         unsigned pad_t, unsigned pad_l, int act) {
    unsigned long long i = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned long long len = (unsigned long long)nc * ho * wo;
    if (i >= len) return;
    unsigned ox = i % wo;
    unsigned oy = (i / wo) % ho;
    unsigned plane = i / ((unsigned long long)wo * ho);
    unsigned ch = plane % c;
    const float* xp = x + (unsigned long long)plane * h * wd;
    const float* wp = w + (unsigned long long)ch * k * k;
    float acc = bias != nullptr ? bias[ch] : 0.0f;
    int y0 = (int)(oy * s) - (int)pad_t;
    int x0 = (int)(ox * s) - (int)pad_l;
    for (unsigned ky = 0; ky < k; ++ky) {
        int iy = y0 + (int)ky;
        if (iy < 0 || iy >= (int)h) continue;
        for (unsigned kx = 0; kx < k; ++kx) {
            int ix = x0 + (int)kx;
            if (ix < 0 || ix >= (int)wd) continue;
            acc += xp[(unsigned)iy * wd + (unsigned)ix] * wp[ky * k + kx];
        }
    }
    y[i] = aei_act(acc, act);
}
