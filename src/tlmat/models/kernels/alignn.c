/* Fused CPU float32 kernels for the edge side of ALIGNN's edge-gated graph convolution.

   Called through ctypes by tlmat.models.alignn._EdgeGateFunction, which is the only user;
   tlmat.models.native compiles this file with the system C compiler on first use and caches
   the library under a key of this text. No torch or Python headers, so the build takes about
   a second. Each function works on rows [t0, t1) so Python threads can run chunks in
   parallel (ctypes releases the GIL); per-chunk sums go to private buffers, summed in Python.
   The argument kinds must match _SIGNATURES in alignn.py (i = int64, p = pointer). The
   PyTorch path (EdgeGatedGraphConv._edge_side) is the reference; tests/test_models.py checks
   that both agree, gradients included. */

#include <math.h>
#include <stdint.h>
#define R __restrict
typedef const float cf;
typedef const int64_t ci;

static inline float sigm(float x) {
    x = fminf(fmaxf(x, -80.f), 80.f);
    return 1.f / (1.f + expf(-x));
}

/* Edges [t0, t1). m [T,H]: in y @ We^T, out the gate pre-activation (left as it was when
   keep_m is 0 and out is given: inference needs no m). p: node table with row stride ps,
   columns [0,H) src_gate, [H,2H) dst_gate, [2H,3H) dst_update. num/den [N,H] and stats [2,H]
   (double; sum and sum of squares of m, or NULL) are this chunk's private sums.
   out [T,H] (or NULL) = y + silu(m * scale + shift): BatchNorm with known statistics. */
void egc_forward(int64_t t0, int64_t t1, int64_t H, float* m, cf* R p, int64_t ps,
                 cf* R be, ci* R src, ci* R dst, float* R num, float* R den, double* R stats,
                 cf* R y, cf* R scale, cf* R shift, float* out, int64_t keep_m) {
    for (int64_t t = t0; t < t1; t++) {
        const float* mt = m + t * H;
        /* where the pre-activation goes: m itself, or the output row as scratch */
        float* w = (keep_m || !out) ? m + t * H : out + t * H;
        cf* R a = p + src[t] * ps;
        cf* R b = p + dst[t] * ps + H;
        cf* R bh = p + src[t] * ps + 2 * H;
        float* R nu = num + dst[t] * H;
        float* R de = den + dst[t] * H;
        for (int64_t c = 0; c < H; c++) {
            float v = mt[c] + a[c] + b[c] + be[c];
            float s = sigm(v);
            w[c] = v;
            nu[c] += s * bh[c];
            de[c] += s;
        }
        if (stats) {
            double* R s1 = stats; double* R s2 = stats + H;
            for (int64_t c = 0; c < H; c++) { double v = w[c]; s1[c] += v; s2[c] += v * v; }
        }
        if (out) {
            cf* R yt = y + t * H; float* o = out + t * H;
            for (int64_t c = 0; c < H; c++) {
                float u = w[c] * scale[c] + shift[c];
                o[c] = yt[c] + u * sigm(u);
            }
        }
    }
}

/* out = y + silu(m * scale + shift) for rows [t0, t1). */
void egc_edge_out(int64_t t0, int64_t t1, int64_t H, cf* R m, cf* R y, cf* R scale,
                  cf* R shift, float* R out) {
    for (int64_t t = t0; t < t1; t++) {
        cf* R mt = m + t * H; cf* R yt = y + t * H; float* R o = out + t * H;
        for (int64_t c = 0; c < H; c++) {
            float u = mt[c] * scale[c] + shift[c];
            o[c] = yt[c] + u * sigm(u);
        }
    }
}

/* Backward through silu(BatchNorm(m)): gy = gout * silu'(u) with u = m * scale + shift, plus
   this chunk's sums of gy and gy * (m - mean) * invstd (stats [2,H] double). */
void egc_bn_grad(int64_t t0, int64_t t1, int64_t H, cf* R m, cf* R gout, cf* R scale,
                 cf* R shift, cf* R mean, cf* R invstd, float* R gy, double* R stats) {
    double* R s1 = stats; double* R s2 = stats + H;
    for (int64_t t = t0; t < t1; t++) {
        cf* R mt = m + t * H; cf* R go = gout + t * H; float* R g = gy + t * H;
        for (int64_t c = 0; c < H; c++) {
            float u = mt[c] * scale[c] + shift[c];
            float s = sigm(u);
            float v = go[c] * (s * (1.f + u * (1.f - s)));
            g[c] = v;
            s1[c] += v;
            s2[c] += (double)(v * ((mt[c] - mean[c]) * invstd[c]));
        }
    }
}

/* Gradient of the gate pre-activation, gm = dL/dm, for rows [t0, t1), and this chunk's
   private dL/dp (gp [N,3H]). If has_gy, gm holds on entry the gradient gy reaching the
   BatchNorm output, whose backward is ca * gy + cb + cd * m per channel. */
void egc_backward(int64_t t0, int64_t t1, int64_t H, cf* R m, cf* R p, int64_t ps,
                  ci* R src, ci* R dst, cf* R gnum, cf* R gden, float* R gm, int64_t has_gy,
                  cf* R ca, cf* R cb, cf* R cd, float* R gp) {
    for (int64_t t = t0; t < t1; t++) {
        cf* R mt = m + t * H;
        float* R gmt = gm + t * H;
        cf* R bh = p + src[t] * ps + 2 * H;
        cf* R gn = gnum + dst[t] * H;
        cf* R gd = gden + dst[t] * H;
        float* R ga = gp + src[t] * 3 * H;
        float* R gb = gp + dst[t] * 3 * H + H;
        float* R gh = gp + src[t] * 3 * H + 2 * H;
        if (has_gy) {
            for (int64_t c = 0; c < H; c++) {
                float v = mt[c]; float s = sigm(v);
                float g = (gn[c] * bh[c] + gd[c]) * s * (1.f - s)
                          + ca[c] * gmt[c] + cb[c] + cd[c] * v;
                gmt[c] = g; ga[c] += g; gb[c] += g; gh[c] += gn[c] * s;
            }
        } else {
            for (int64_t c = 0; c < H; c++) {
                float v = mt[c]; float s = sigm(v);
                float g = (gn[c] * bh[c] + gd[c]) * s * (1.f - s);
                gmt[c] = g; ga[c] += g; gb[c] += g; gh[c] += gn[c] * s;
            }
        }
    }
}
