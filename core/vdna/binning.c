/* Per-neuron histogram binning of float32 activations: one pass, bins equal to vdna's float64 rule.
 *
 * Compiled on first use by core/vdna/native.py and called through ctypes (which releases the GIL, so
 * several Python threads bin disjoint row ranges at once). No Python or torch headers: any C99 compiler.
 *
 * The rule (HistogramAccumulator's docstring): in float64,
 *     u = ((x - mean) / std + 1) * N/2,  clamped to [0, N - 1],  bin = floor(u);  NaN is not counted.
 * `exact_bin` computes exactly that. The fast path computes u' = x * A + B (A = (N/2) / std,
 * B = N/2 - mean * A) in float64. Against the rule's own float64 value E, for every u' the fast path
 * accepts (inside [eps, N - 1 - eps], so E is within the unclamped range):
 *     |u' - E| <= 2^-53 * (8 N + 3 |B| + 2 |mean * A| + 3)  <  eps = 2^-40 * (N + |B| + |mean * A| + 1),
 * (unit roundoff 2^-53; the rounding of A, mean * A, B and of the product and sum for u', and of the four
 * operations for E, with |x A| <= N + |B| in that range). So where frac(u') lies in (eps, 1 - eps), no
 * bin edge lies between u' and E, and floor(u') is E's bin. Everything else (values within eps of an
 * edge, clamped or non-finite values) takes `exact_bin`. Zeros, often half of a post-ReLU layer, go to
 * the bin `exact_bin` gives 0, through 8 spare columns in turn (a run of increments of one counter would
 * wait on itself), which are folded into that bin at the end of each call.
 *
 * -ffp-contract=off keeps each operation rounded as written (the bound also holds for a fused
 * multiply-add, but E must be computed exactly as torch computes it).
 */
#include <math.h>
#include <stdint.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
/* One copy per instruction set, picked at load time: the vectorised compute loop is 2-4x faster with
 * AVX-512 than with the baseline SSE2, and a build on one node still runs on an older one. */
#define MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MULTIVERSION
#endif

/* Number of columns a count row needs beyond the N bins: 1 for NaN (never read) and 8 for zeros. */
#define VDNA_SPARE_COLUMNS 9
#define BLOCK 512

int vdna_spare_columns(void) { return VDNA_SPARE_COLUMNS; }

static int32_t exact_bin(double v, double mean, double std, double half, double top) {
    double u = ((v - mean) / std + 1.0) * half;
    u = u < 0.0 ? 0.0 : u;
    u = u > top ? top : u;
    return (int32_t)u; /* non-negative, so truncation is floor */
}

/* Add the histograms of rows c0 .. c1-1 of x [B, C, L] (contiguous) to counts (int32, row c at
 * counts + c * stride, stride >= n + VDNA_SPARE_COLUMNS). mean, std: float64 [C]. The caller keeps every
 * count below 2^31 (B * L per row and call, plus what the row already holds). */
MULTIVERSION
void vdna_bin_f32(const float *x, int64_t B, int64_t C, int64_t L, int64_t c0, int64_t c1,
                  const double *mean, const double *std, int64_t n, int32_t *counts, int64_t stride) {
    const double half = (double)n / 2.0, top = (double)(n - 1);
    const int32_t nan_column = (int32_t)n, zero_columns = (int32_t)n + 1;
    int32_t idx[BLOCK];
    for (int64_t c = c0; c < c1; c++) {
        const double m = mean[c], s = std[c];
        const double a = half / s, b = half - m * a;
        const double eps = 0x1p-40 * ((double)n + fabs(b) + fabs(m * a) + 1.0);
        const double lo = eps, hi = top - eps, frac_hi = 1.0 - eps;
        int32_t *row = counts + c * stride;
        for (int64_t image = 0; image < B; image++) {
            const float *p = x + (image * C + c) * L;
            for (int64_t start = 0; start < L; start += BLOCK) {
                const int64_t len = L - start < BLOCK ? L - start : BLOCK;
                const float *q = p + start;
                int32_t slow = 0;
                for (int64_t i = 0; i < len; i++) { /* vectorised: no branches */
                    const double u = (double)q[i] * a + b;
                    double uc = u >= lo ? u : lo; /* NaN -> lo, and u != uc */
                    uc = uc <= hi ? uc : hi;
                    const int32_t k = (int32_t)uc;
                    const double r = uc - (double)k;
                    const int32_t zero = q[i] == 0.0f;
                    const int32_t ok = ((r > eps) & (r < frac_hi) & (u == uc)) | zero;
                    idx[i] = zero ? zero_columns + (int32_t)(i & 7) : (ok ? k : -1);
                    slow |= !ok;
                }
                if (slow) {
                    for (int64_t i = 0; i < len; i++) {
                        if (idx[i] >= 0) continue;
                        const double v = (double)q[i];
                        idx[i] = v != v ? nan_column : exact_bin(v, m, s, half, top);
                    }
                }
                for (int64_t i = 0; i < len; i++) row[idx[i]]++;
            }
        }
        int32_t zeros = 0;
        for (int j = 0; j < 8; j++) {
            zeros += row[zero_columns + j];
            row[zero_columns + j] = 0;
        }
        row[exact_bin(0.0, m, s, half, top)] += zeros;
    }
}
