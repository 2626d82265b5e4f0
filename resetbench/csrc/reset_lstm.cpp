// resetbench's ``cpp`` kernel: one LSTM layer over a window with per-row, per-step resets, forward
// and backward, on a CPU in float32 (resetbench/torch_cpp.py builds and calls it). The time loop
// runs here: per step one matmul and the elementwise gate math below, vectorized 16 wide with GCC
// vector extensions (a scalar tail for H not a multiple of 16) and split by rows over the threads
// (ATen's parallel_for; built with OpenMP). The matmul multiplies by the same
// recurrent weights at every step, so where the BLAS that torch links offers MKL's packed GEMM
// (cblas_sgemm_pack / cblas_sgemm_compute, found at run time) the weights are packed once per
// window and every step reuses them; elsewhere each step calls ATen's matmul. The reset is inside
// the step: the rows that reset read the zero state (a copy that writes zeros, so NaN and inf are
// cleared too and no gradient crosses), at no cost where no row resets.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstring>
#include <dlfcn.h>
#include <vector>

typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
static constexpr int W = 16;

static inline vf splat(float x) { return vf{} + x; }
static inline vf sel(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); }
static inline vf rb_exp(vf x) {
    x = sel(x < splat(-87.0f), splat(-87.0f), x);
    x = sel(x > splat(88.0f), splat(88.0f), x);
    vf t = x * 1.44269504088896341f + 0.5f;
    vi n = __builtin_convertvector(t, vi);
    vf nf = __builtin_convertvector(n, vf);
    n = n + (vi)(nf > t);
    nf = __builtin_convertvector(n, vf);
    vf r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    vf e = p * r * r + r + 1.0f;
    return e * (vf)((n + 127) << 23);
}
static inline vf sigm(vf x) { return 1.0f / (1.0f + rb_exp(-x)); }
// one lane of the vector math, for the tail of a row
static inline float exp1(float x) { vf v = splat(x); return rb_exp(v)[0]; }
static inline float sigm1(float x) { return 1.0f / (1.0f + exp1(-x)); }
static inline float tanh1(float x) { return 1.0f - 2.0f / (exp1(2.0f * x) + 1.0f); }
static inline vf tanhv(vf x) { return 1.0f - 2.0f / (rb_exp(2.0f * x) + 1.0f); }
static inline vf ld(const float *p) { vf v; std::memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, vf v) { std::memcpy(p, &v, sizeof v); }

// one step forward, rows b0..b1: z [B, 4H] the recurrent product (h w_h) in, the gates' activations
// (i, f, g, o) out; xp [B, 4H] the input projection (x w_x) and bias [4H] added to it; cin [B, H]
// the cell state entering the step; writes c, tanh(c), h [B, H]
static void step_forward(int64_t b0, int64_t b1, int64_t H, float *z, const float *xp, const float *bias,
                         const float *cin, float *c, float *tc, float *h) {
    const float *bi = bias, *bf = bi + H, *bg = bf + H, *bo = bg + H;
    for (int64_t b = b0; b < b1; b++) {
        float *zi = z + b * 4 * H, *zf = zi + H, *zg = zf + H, *zo = zg + H;
        const float *xi = xp + b * 4 * H, *xf = xi + H, *xg = xf + H, *xo = xg + H;
        const float *cp = cin + b * H;
        float *cb = c + b * H, *tb = tc + b * H, *hb = h + b * H;
        int64_t j = 0;
        for (; j + W <= H; j += W) {
            vf i = sigm(ld(zi + j) + ld(xi + j) + ld(bi + j)), f = sigm(ld(zf + j) + ld(xf + j) + ld(bf + j)),
               g = tanhv(ld(zg + j) + ld(xg + j) + ld(bg + j)), o = sigm(ld(zo + j) + ld(xo + j) + ld(bo + j));
            st(zi + j, i); st(zf + j, f); st(zg + j, g); st(zo + j, o);
            vf cc = f * ld(cp + j) + i * g;
            vf t = tanhv(cc);
            st(cb + j, cc); st(tb + j, t); st(hb + j, o * t);
        }
        for (; j < H; j++) {
            float i = sigm1(zi[j] + xi[j] + bi[j]), f = sigm1(zf[j] + xf[j] + bf[j]),
                  g = tanh1(zg[j] + xg[j] + bg[j]), o = sigm1(zo[j] + xo[j] + bo[j]);
            zi[j] = i; zf[j] = f; zg[j] = g; zo[j] = o;
            float cc = f * cp[j] + i * g, t = tanh1(cc);
            cb[j] = cc; tb[j] = t; hb[j] = o * t;
        }
    }
}

// one step backward: dh [B, H] the gradient into h (plus dout if given), dc [B, H] into c (in), into
// the state entering the step (out: times f); writes dpre [B, 4H], the pre-activations' gradient
static void step_backward(int64_t b0, int64_t b1, int64_t H, const float *dh, const float *dout, float *dc,
                          const float *gates, const float *tc, const float *cin, float *dpre) {
    for (int64_t b = b0; b < b1; b++) {
        const float *gi = gates + b * 4 * H, *gf = gi + H, *gg = gf + H, *go = gg + H;
        float *di = dpre + b * 4 * H, *df = di + H, *dg = df + H, *dO = dg + H;
        const float *dhb = dh + b * H, *dob = dout ? dout + b * H : nullptr;
        const float *tb = tc + b * H, *cp = cin + b * H;
        float *dcb = dc + b * H;
        int64_t j = 0;
        for (; j + W <= H; j += W) {
            vf i = ld(gi + j), f = ld(gf + j), g = ld(gg + j), o = ld(go + j), t = ld(tb + j);
            vf d_h = ld(dhb + j);
            if (dob) d_h += ld(dob + j);
            vf d_c = ld(dcb + j) + d_h * o * (1.0f - t * t);
            st(di + j, d_c * g * i * (1.0f - i));
            st(df + j, d_c * ld(cp + j) * f * (1.0f - f));
            st(dg + j, d_c * i * (1.0f - g * g));
            st(dO + j, d_h * t * o * (1.0f - o));
            st(dcb + j, d_c * f);
        }
        for (; j < H; j++) {
            float i = gi[j], f = gf[j], g = gg[j], o = go[j], t = tb[j];
            float d_h = dhb[j] + (dob ? dob[j] : 0.0f);
            float d_c = dcb[j] + d_h * o * (1.0f - t * t);
            di[j] = d_c * g * i * (1.0f - i);
            df[j] = d_c * cp[j] * f * (1.0f - f);
            dg[j] = d_c * i * (1.0f - g * g);
            dO[j] = d_h * t * o * (1.0f - o);
            dcb[j] = d_c * f;
        }
    }
}

// rows per thread for the gate math: split a step across the threads only when each gets some
// thousands of elements (a parallel region costs microseconds)
static inline int64_t grain(int64_t H) { return std::max<int64_t>(1, 2048 / H); }

// dst [B, H] = src with the rows of reset[t] zeroed
static void enter_into(const float *src, float *dst, const bool *rt, int64_t B, int64_t H) {
    for (int64_t b = 0; b < B; b++) {
        if (rt[b]) std::memset(dst + b * H, 0, H * sizeof(float));
        else std::memcpy(dst + b * H, src + b * H, H * sizeof(float));
    }
}

// the state entering step t: src [B,H] itself where no row resets, else a copy in buf with the rows
// of reset[t] zeroed
static const float *entering(const float *src, float *buf, const bool *rt, int64_t B, int64_t H) {
    if (std::none_of(rt, rt + B, [](bool r) { return r; })) return src;
    enter_into(src, buf, rt, B, H);
    return buf;
}

// MKL's packed GEMM, looked up in the running process (torch's CPU builds for x86 link MKL and
// export it); absent, the steps call ATen's matmul instead
enum { RowMajor = 101, NoTrans = 111, Trans = 112, Packed = 151, BMatrix = 162 };
typedef size_t (*pack_size_fn)(int, int, int, int);
typedef void (*pack_fn)(int, int, int, int, int, int, float, const float *, int, float *);
typedef void (*compute_fn)(int, int, int, int, int, int, const float *, int, const float *, int, float, float *, int);
struct PackedGemm {
    pack_size_fn size = nullptr;
    pack_fn pack = nullptr;
    compute_fn compute = nullptr;
    PackedGemm() {
        size = (pack_size_fn)dlsym(RTLD_DEFAULT, "cblas_sgemm_pack_get_size");
        pack = (pack_fn)dlsym(RTLD_DEFAULT, "cblas_sgemm_pack");
        compute = (compute_fn)dlsym(RTLD_DEFAULT, "cblas_sgemm_compute");
        if (!size || !pack || !compute) size = nullptr;
    }
    bool ok() const { return size != nullptr; }
};
static const PackedGemm &packed_gemm() { static PackedGemm g; return g; }
bool has_packed_gemm() { return packed_gemm().ok(); }

// y [B, n] = x [B, k] @ op(w), op(w) = w [k, n] or, with trans, w^T where w is
// [n, k]: through MKL's packed GEMM (``pack`` the packed op(w), built by pack_weights) or ATen
struct StepGemm {
    int64_t B, k, n;
    bool trans;
    at::Tensor w;            // the weights as given (ATen path)
    // packed op(w) (MKL path; undefined on the ATen path), in uninitialized memory from ATen's
    // allocator: MKL asks for ~10x the matrix's bytes (10.5 MB at 256 x 1024) and writes only what
    // it uses; zero-filling that buffer measured ~0.4 ms per window, the packing itself ~30 us
    at::Tensor pack;
    StepGemm(int64_t B_, at::Tensor w_, bool trans_, bool use_packed) : B(B_), trans(trans_), w(w_.contiguous()) {
        k = trans ? w.size(1) : w.size(0);
        n = trans ? w.size(0) : w.size(1);
        const auto &g = packed_gemm();
        if (use_packed && g.ok()) {
            const int64_t floats = (int64_t)(g.size(BMatrix, (int)B, (int)n, (int)k) / sizeof(float)) + 1;
            pack = at::empty({floats}, w.options());
            g.pack(RowMajor, BMatrix, trans ? Trans : NoTrans, (int)B, (int)n, (int)k, 1.0f, w.data_ptr<float>(),
                   (int)w.size(1), pack.data_ptr<float>());
        } else if (trans) {
            w = w.t().contiguous();
        }
    }
    void operator()(const float *x, float *y) {
        if (pack.defined()) {
            packed_gemm().compute(RowMajor, NoTrans, Packed, (int)B, (int)n, (int)k, x, (int)k, pack.data_ptr<float>(),
                                  (int)n, 0.0f, y, (int)n);
            return;
        }
        auto opts = at::TensorOptions().dtype(at::kFloat);
        auto xt = at::from_blob(const_cast<float *>(x), {B, k}, opts), yt = at::from_blob(y, {B, n}, opts);
        at::mm_out(yt, xt, w);
    }
};

// xp [T, B, 4H] (x w_x), bias [4H], h0 and c0 [B, H], w_h [H, 4H], reset [T, B] bool -> the
// outputs, the cell states, tanh of them, the gates' activations and the h entering each step
// (reset rows zeroed: what the weights' gradient multiplies), each [T, B, ...]
std::vector<at::Tensor> lstm_forward(at::Tensor xp, at::Tensor bias, at::Tensor h0, at::Tensor c0, at::Tensor w_h,
                                     at::Tensor reset, bool use_packed) {
    const int64_t T = xp.size(0), B = xp.size(1), G = xp.size(2), H = G / 4;
    TORCH_CHECK(xp.scalar_type() == at::kFloat && xp.device().is_cpu(), "lstm_forward: float32 CPU tensors only");
    h0 = h0.contiguous(); c0 = c0.contiguous(); reset = reset.contiguous();
    xp = xp.contiguous(); bias = bias.contiguous();
    auto gates = at::empty({T, B, G}, xp.options());
    auto cout = at::empty({T, B, H}, xp.options()), tcs = at::empty({T, B, H}, xp.options()),
         hout = at::empty({T, B, H}, xp.options()), hins = at::empty({T, B, H}, xp.options());
    auto cbuf = at::empty({B, H}, xp.options());
    const bool *rs = reset.data_ptr<bool>();
    float *cb = cbuf.data_ptr<float>();
    float *gp = gates.data_ptr<float>(), *cp = cout.data_ptr<float>(), *tp = tcs.data_ptr<float>(),
          *hp = hout.data_ptr<float>(), *ip = hins.data_ptr<float>();
    const float *xpp = xp.data_ptr<float>(), *bp = bias.data_ptr<float>();
    StepGemm gemm(B, w_h, false, use_packed);
    for (int64_t t = 0; t < T; t++) {
        const float *hsrc = t ? hp + (t - 1) * B * H : h0.data_ptr<float>();
        const float *csrc = t ? cp + (t - 1) * B * H : c0.data_ptr<float>();
        float *hin = ip + t * B * H;
        enter_into(hsrc, hin, rs + t * B, B, H);
        const float *cin = entering(csrc, cb, rs + t * B, B, H);
        float *g = gp + t * B * G;
        gemm(hin, g);
        at::parallel_for(0, B, grain(H), [&](int64_t b0, int64_t b1) {
            step_forward(b0, b1, H, g, xpp + t * B * G, bp, cin, cp + t * B * H, tp + t * B * H, hp + t * B * H);
        });
    }
    return {hout, cout, tcs, gates, hins};
}

// the gradients arriving at the outputs (dout [T, B, H], or empty) and the final state -> the
// gradient of xp, h0 and c0 (the weights' gradient is one matmul, in Python)
std::vector<at::Tensor> lstm_backward(at::Tensor dout, at::Tensor dh_final, at::Tensor dc_final, at::Tensor gates,
                                      at::Tensor tcs, at::Tensor cout, at::Tensor c0, at::Tensor w_h, at::Tensor reset,
                                      bool use_packed) {
    const int64_t T = gates.size(0), B = gates.size(1), H = gates.size(2) / 4, G = 4 * H;
    c0 = c0.contiguous(); cout = cout.contiguous(); gates = gates.contiguous(); tcs = tcs.contiguous();
    reset = reset.contiguous();
    auto dh = dh_final.contiguous().clone(), dc = dc_final.contiguous().clone();
    auto dpre = at::empty_like(gates);
    auto cbuf = at::empty({B, H}, gates.options());
    const bool *rs = reset.data_ptr<bool>();
    const bool has_out = dout.defined() && dout.numel() > 0;
    if (has_out) dout = dout.contiguous();
    float *dhp = dh.data_ptr<float>(), *dcp = dc.data_ptr<float>(), *dp = dpre.data_ptr<float>();
    const float *cp = cout.data_ptr<float>(), *gp = gates.data_ptr<float>(), *tp = tcs.data_ptr<float>(),
                *op = has_out ? dout.data_ptr<float>() : nullptr;
    StepGemm gemm(B, w_h, true, use_packed);   // dh = dpre w_h^T
    for (int64_t t = T - 1; t >= 0; t--) {
        const float *csrc = t ? cp + (t - 1) * B * H : c0.data_ptr<float>();
        const float *cin = entering(csrc, cbuf.data_ptr<float>(), rs + t * B, B, H);
        float *d = dp + t * B * G;
        at::parallel_for(0, B, grain(H), [&](int64_t b0, int64_t b1) {
            step_backward(b0, b1, H, dhp, op ? op + t * B * H : nullptr, dcp, gp + t * B * G, tp + t * B * H, cin, d);
        });
        gemm(d, dhp);
        const bool *rt = rs + t * B;
        for (int64_t b = 0; b < B; b++)
            if (rt[b]) { std::memset(dhp + b * H, 0, H * sizeof(float)); std::memset(dcp + b * H, 0, H * sizeof(float)); }
    }
    return {dpre, dh, dc};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("lstm_forward", &lstm_forward);
    m.def("lstm_backward", &lstm_backward);
    m.def("has_packed_gemm", &has_packed_gemm);
}
