// resetbench's ``cpp`` kernel: one LSTM layer over a window with per-row, per-step resets, forward
// and backward, on a CPU in float32 (resetbench/torch_cpp.py builds and calls it). The time loop
// runs here: per step one ATen matmul (MKL) and the elementwise gate math below, vectorized 8 wide
// with GCC vector extensions (a scalar tail for H not a multiple of 8). The reset is inside the
// step: the rows that reset read the zero state (a copy that writes zeros, so NaN and inf are
// cleared too and no gradient crosses), at no cost where no row resets.
#include <torch/extension.h>
#include <cstring>
#include <vector>

typedef float vf __attribute__((vector_size(32)));
typedef int32_t vi __attribute__((vector_size(32)));
static constexpr int W = 8;

static inline vf splat(float x) { return vf{x, x, x, x, x, x, x, x}; }
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

// one step forward: z [B, 4H] gate pre-activations (i, f, g, o) in, activations out; cin [B, H]
// the cell state entering the step; writes c, tanh(c), h [B, H]
static void step_forward(int64_t B, int64_t H, float *z, const float *cin, float *c, float *tc, float *h) {
    for (int64_t b = 0; b < B; b++) {
        float *zi = z + b * 4 * H, *zf = zi + H, *zg = zf + H, *zo = zg + H;
        const float *cp = cin + b * H;
        float *cb = c + b * H, *tb = tc + b * H, *hb = h + b * H;
        int64_t j = 0;
        for (; j + W <= H; j += W) {
            vf i = sigm(ld(zi + j)), f = sigm(ld(zf + j)), g = tanhv(ld(zg + j)), o = sigm(ld(zo + j));
            st(zi + j, i); st(zf + j, f); st(zg + j, g); st(zo + j, o);
            vf cc = f * ld(cp + j) + i * g;
            vf t = tanhv(cc);
            st(cb + j, cc); st(tb + j, t); st(hb + j, o * t);
        }
        for (; j < H; j++) {
            float i = sigm1(zi[j]), f = sigm1(zf[j]), g = tanh1(zg[j]), o = sigm1(zo[j]);
            zi[j] = i; zf[j] = f; zg[j] = g; zo[j] = o;
            float cc = f * cp[j] + i * g, t = tanh1(cc);
            cb[j] = cc; tb[j] = t; hb[j] = o * t;
        }
    }
}

// one step backward: dh [B, H] the gradient into h (plus dout if given), dc [B, H] into c (in), into
// the state entering the step (out: times f); writes dpre [B, 4H], the pre-activations' gradient
static void step_backward(int64_t B, int64_t H, const float *dh, const float *dout, float *dc, const float *gates,
                          const float *tc, const float *cin, float *dpre) {
    for (int64_t b = 0; b < B; b++) {
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

// the state entering step t: src [B,H] with the rows of reset[t] zeroed (into buf if any)
static const float *entering(const float *src, float *buf, const bool *rt, int64_t B, int64_t H) {
    bool any = false;
    for (int64_t b = 0; b < B; b++) any |= rt[b];
    if (!any) return src;
    for (int64_t b = 0; b < B; b++) {
        if (rt[b]) std::memset(buf + b * H, 0, H * sizeof(float));
        else std::memcpy(buf + b * H, src + b * H, H * sizeof(float));
    }
    return buf;
}

// xp [T, B, 4H] (x w_x + b), h0 and c0 [B, H], w_h [H, 4H], reset [T, B] bool -> the outputs, the
// cell states, tanh of them and the gates' activations, each [T, B, ...]
std::vector<at::Tensor> lstm_forward(at::Tensor xp, at::Tensor h0, at::Tensor c0, at::Tensor w_h, at::Tensor reset) {
    const int64_t T = xp.size(0), B = xp.size(1), G = xp.size(2), H = G / 4;
    TORCH_CHECK(xp.scalar_type() == at::kFloat && xp.device().is_cpu(), "lstm_forward: float32 CPU tensors only");
    xp = xp.contiguous(); h0 = h0.contiguous(); c0 = c0.contiguous(); reset = reset.contiguous();
    auto gates = at::empty({T, B, G}, xp.options());
    auto cout = at::empty({T, B, H}, xp.options()), tcs = at::empty({T, B, H}, xp.options()),
         hout = at::empty({T, B, H}, xp.options());
    auto hbuf = at::empty({B, H}, xp.options()), cbuf = at::empty({B, H}, xp.options());
    const bool *rs = reset.data_ptr<bool>();
    float *hb = hbuf.data_ptr<float>(), *cb = cbuf.data_ptr<float>();
    for (int64_t t = 0; t < T; t++) {
        const float *hsrc = t ? hout[t - 1].data_ptr<float>() : h0.data_ptr<float>();
        const float *csrc = t ? cout[t - 1].data_ptr<float>() : c0.data_ptr<float>();
        const float *hin = entering(hsrc, hb, rs + t * B, B, H);
        const float *cin = entering(csrc, cb, rs + t * B, B, H);
        auto hin_t = at::from_blob(const_cast<float *>(hin), {B, H}, xp.options());
        auto g = gates[t];
        at::addmm_out(g, xp[t], hin_t, w_h);
        step_forward(B, H, g.data_ptr<float>(), cin, cout[t].data_ptr<float>(), tcs[t].data_ptr<float>(),
                     hout[t].data_ptr<float>());
    }
    return {hout, cout, tcs, gates};
}

// the gradients arriving at the outputs (dout [T, B, H], or empty) and the final state -> the
// gradient of xp, h0 and c0 (the weights' gradient is one matmul, in Python)
std::vector<at::Tensor> lstm_backward(at::Tensor dout, at::Tensor dh_final, at::Tensor dc_final, at::Tensor gates,
                                      at::Tensor tcs, at::Tensor cout, at::Tensor c0, at::Tensor w_h, at::Tensor reset) {
    const int64_t T = gates.size(0), B = gates.size(1), H = gates.size(2) / 4;
    auto w_t = w_h.t().contiguous();
    c0 = c0.contiguous(); cout = cout.contiguous(); gates = gates.contiguous(); tcs = tcs.contiguous();
    reset = reset.contiguous();
    auto dh = dh_final.contiguous().clone(), dc = dc_final.contiguous().clone();
    auto dpre = at::empty_like(gates);
    auto cbuf = at::empty({B, H}, gates.options());
    const bool *rs = reset.data_ptr<bool>();
    const bool has_out = dout.defined() && dout.numel() > 0;
    if (has_out) dout = dout.contiguous();
    float *dhp = dh.data_ptr<float>(), *dcp = dc.data_ptr<float>();
    for (int64_t t = T - 1; t >= 0; t--) {
        const float *csrc = t ? cout[t - 1].data_ptr<float>() : c0.data_ptr<float>();
        const float *cin = entering(csrc, cbuf.data_ptr<float>(), rs + t * B, B, H);
        auto d = dpre[t];
        step_backward(B, H, dhp, has_out ? dout[t].data_ptr<float>() : nullptr, dcp, gates[t].data_ptr<float>(),
                      tcs[t].data_ptr<float>(), cin, d.data_ptr<float>());
        at::mm_out(dh, d, w_t);
        const bool *rt = rs + t * B;
        for (int64_t b = 0; b < B; b++)
            if (rt[b]) { std::memset(dhp + b * H, 0, H * sizeof(float)); std::memset(dcp + b * H, 0, H * sizeof(float)); }
    }
    return {dpre, dh, dc};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("lstm_forward", &lstm_forward);
    m.def("lstm_backward", &lstm_backward);
}
