/* The AV blend on CPU, one call per layer, float32:
 *
 *   y[t, slice s] += sum_m scale[t,m] * B[index[t,m], s] (A[index[t,m], s] x[t])
 *
 * Work grows with the entries the batch uses (index = -1 or scale = 0: none), not with the
 * library size. Entries are grouped by AV (a counting sort of the [T, M] table), then each AV's
 * rows are taken two at a time so every A and B row loaded serves two token rows, and ranks four
 * at a time (eight independent dot products in the shrink, one pass over y per four ranks in the
 * expand). Built and loaded at run time by vllm_av/kernels/cpu.py (cc -O3 -march=native -fopenmp),
 * called through ctypes.
 * GCC vector extensions keep it portable: 16 float lanes on AVX-512 machines, else 8.
 * bfloat16 layers go through av_blend_bf16: x widened once, the blend summed in float32, y rounded once.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef LANES /* tests build the other width with -DLANES=N */
#if defined(__AVX512F__)
#define LANES 16 /* one AVX-512 register */
#else
#define LANES 8  /* one AVX register, two SSE / NEON ones */
#endif
#endif
typedef float vec __attribute__((vector_size(LANES * 4), aligned(4)));

static inline vec load(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }
static inline float sum(vec v) {
    float s = 0.f;
    for (int l = 0; l < LANES; l++) s += v[l];
    return s;
}

typedef float vec4 __attribute__((vector_size(16), aligned(4)));

#if defined(__has_builtin) && !defined(AV_NO_SHUFFLE) /* tests build the fallback with -DAV_NO_SHUFFLE */
#if __has_builtin(__builtin_shufflevector)
#define HAVE_SHUFFLE 1
#endif
#endif

#if defined(HAVE_SHUFFLE) && (LANES == 16 || LANES == 8 || LANES == 4)
static inline vec4 fold4(vec v) { /* v's LANES/4 quarters, added */
#if LANES == 16
    typedef float vec8 __attribute__((vector_size(32), aligned(4)));
    vec8 h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    return __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
#elif LANES == 8
    return __builtin_shufflevector(v, v, 0, 1, 2, 3) + __builtin_shufflevector(v, v, 4, 5, 6, 7);
#else
    return v;
#endif
}

/* The lane-sums of a, b, c and d, as one 4-float vector: each folded to 4 lanes, then transposed
 * and added (a few shuffles instead of 4 x LANES scalar adds). */
static inline vec4 sum4(vec a, vec b, vec c, vec d) {
    vec4 p = fold4(a), q = fold4(b), r = fold4(c), s = fold4(d);
    vec4 pq = __builtin_shufflevector(p, q, 0, 4, 1, 5) + __builtin_shufflevector(p, q, 2, 6, 3, 7);
    vec4 rs = __builtin_shufflevector(r, s, 0, 4, 1, 5) + __builtin_shufflevector(r, s, 2, 6, 3, 7);
    return __builtin_shufflevector(pq, rs, 0, 1, 4, 5) + __builtin_shufflevector(pq, rs, 2, 3, 6, 7);
}
#else /* compilers without __builtin_shufflevector (GCC < 12) */
static inline vec4 sum4(vec a, vec b, vec c, vec d) {
    vec4 s = {sum(a), sum(b), sum(c), sum(d)};
    return s;
}
#endif

/* One layer's AV weights, laid out once at load. */
typedef struct {
    const float *a;          /* [N, S, R, in] */
    const float *b;          /* per slice s: [N, R, out_size[s]], slices back to back */
    const int32_t *rank_of;  /* [N]: rows of A / B that hold the AV (<= R; 0 = not on this layer) */
    const int64_t *out_size; /* [S] */
    int64_t num_slices, num_avs, max_rank, in;
} av_weights;

/* h0[r] = c0 * a_r . x0 and h1[r] = c1 * a_r . x1 for r < rank (rows of a are n apart). */
static void shrink2(float *h0, float *h1, const float *a, const float *x0, const float *x1,
                    int64_t n, int rank, float c0, float c1) {
    int r = 0;
    for (; r + 4 <= rank; r += 4) { /* four A rows against two x rows: eight independent sums */
        const float *a0 = a + r * n, *a1 = a0 + n, *a2 = a1 + n, *a3 = a2 + n;
        vec s00 = {0}, s01 = {0}, s02 = {0}, s03 = {0}, s10 = {0}, s11 = {0}, s12 = {0}, s13 = {0};
        int64_t k = 0;
        for (; k + LANES <= n; k += LANES) {
            vec u = load(x0 + k), w = load(x1 + k), p = load(a0 + k), q = load(a1 + k), v = load(a2 + k), z = load(a3 + k);
            s00 += p * u; s01 += q * u; s02 += v * u; s03 += z * u;
            s10 += p * w; s11 += q * w; s12 += v * w; s13 += z * w;
        }
        vec4 t0 = sum4(s00, s01, s02, s03), t1 = sum4(s10, s11, s12, s13);
        for (; k < n; k++) {
            t0[0] += a0[k] * x0[k]; t0[1] += a1[k] * x0[k]; t0[2] += a2[k] * x0[k]; t0[3] += a3[k] * x0[k];
            t1[0] += a0[k] * x1[k]; t1[1] += a1[k] * x1[k]; t1[2] += a2[k] * x1[k]; t1[3] += a3[k] * x1[k];
        }
        for (int j = 0; j < 4; j++) { h0[r + j] = c0 * t0[j]; h1[r + j] = c1 * t1[j]; }
    }
    for (; r + 2 <= rank; r += 2) {
        const float *a0 = a + r * n, *a1 = a0 + n;
        vec s00 = {0}, s01 = {0}, s10 = {0}, s11 = {0};
        int64_t k = 0;
        for (; k + LANES <= n; k += LANES) {
            vec u = load(x0 + k), w = load(x1 + k), p = load(a0 + k), q = load(a1 + k);
            s00 += p * u; s01 += q * u; s10 += p * w; s11 += q * w;
        }
        vec4 t = sum4(s00, s01, s10, s11);
        float t00 = t[0], t01 = t[1], t10 = t[2], t11 = t[3];
        for (; k < n; k++) {
            t00 += a0[k] * x0[k]; t01 += a1[k] * x0[k]; t10 += a0[k] * x1[k]; t11 += a1[k] * x1[k];
        }
        h0[r] = c0 * t00; h0[r + 1] = c0 * t01; h1[r] = c1 * t10; h1[r + 1] = c1 * t11;
    }
    for (; r < rank; r++) {
        const float *a0 = a + r * n;
        vec s0 = {0}, s1 = {0};
        int64_t k = 0;
        for (; k + LANES <= n; k += LANES) {
            vec p = load(a0 + k);
            s0 += p * load(x0 + k); s1 += p * load(x1 + k);
        }
        float t0 = sum(s0), t1 = sum(s1);
        for (; k < n; k++) { t0 += a0[k] * x0[k]; t1 += a0[k] * x1[k]; }
        h0[r] = c0 * t0; h1[r] = c1 * t1;
    }
}

/* y0[o] += sum_r h0[r] b_r[o] and y1[o] += sum_r h1[r] b_r[o] (rows of b are n apart; y1 may be y0). */
static void expand2(float *y0, float *y1, const float *b, const float *h0, const float *h1, int64_t n, int rank) {
    int r = 0;
    for (; r + 4 <= rank; r += 4) {
        const float *b0 = b + r * n, *b1 = b0 + n, *b2 = b1 + n, *b3 = b2 + n;
        float p0 = h0[r], p1 = h0[r + 1], p2 = h0[r + 2], p3 = h0[r + 3];
        float q0 = h1[r], q1 = h1[r + 1], q2 = h1[r + 2], q3 = h1[r + 3];
        int64_t o = 0;
        for (; o + LANES <= n; o += LANES) {
            vec u = load(b0 + o), w = load(b1 + o), v = load(b2 + o), z = load(b3 + o);
            store(y0 + o, load(y0 + o) + u * p0 + w * p1 + v * p2 + z * p3);
            store(y1 + o, load(y1 + o) + u * q0 + w * q1 + v * q2 + z * q3);
        }
        for (; o < n; o++) {
            y0[o] += b0[o] * p0 + b1[o] * p1 + b2[o] * p2 + b3[o] * p3;
            y1[o] += b0[o] * q0 + b1[o] * q1 + b2[o] * q2 + b3[o] * q3;
        }
    }
    for (; r + 2 <= rank; r += 2) {
        const float *b0 = b + r * n, *b1 = b0 + n;
        float p0 = h0[r], p1 = h0[r + 1], q0 = h1[r], q1 = h1[r + 1];
        int64_t o = 0;
        for (; o + LANES <= n; o += LANES) {
            vec u = load(b0 + o), w = load(b1 + o);
            store(y0 + o, load(y0 + o) + u * p0 + w * p1);
            store(y1 + o, load(y1 + o) + u * q0 + w * q1);
        }
        for (; o < n; o++) {
            y0[o] += b0[o] * p0 + b1[o] * p1;
            y1[o] += b0[o] * q0 + b1[o] * q1;
        }
    }
    for (; r < rank; r++) {
        const float *b0 = b + r * n;
        float p0 = h0[r], q0 = h1[r];
        int64_t o = 0;
        for (; o + LANES <= n; o += LANES) {
            vec u = load(b0 + o);
            store(y0 + o, load(y0 + o) + u * p0);
            store(y1 + o, load(y1 + o) + u * q0);
        }
        for (; o < n; o++) { y0[o] += b0[o] * p0; y1[o] += b0[o] * q0; }
    }
}

static int usable(const av_weights *w, int32_t i, float c) { return i >= 0 && i < w->num_avs && c != 0.f; }

/* Add the blend of rows [0, T) to y. index/scale: [T, M], row-major. Returns 0, or -1 when out of memory. */
/* First p in [lo, hi) with order[p] >= e (order is increasing within an AV's run). */
static int64_t first_at_or_after(const int64_t *order, int64_t lo, int64_t hi, int64_t e) {
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (order[mid] < e) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* The blend of the entries [e_lo, e_hi) (whole token rows), AV by AV; runs[i]..runs[i+1] is AV i's run. */
static void blend_entries(const av_weights *w, float *y, int64_t y_stride, const float *x, int64_t x_stride,
                          const float *scale, int64_t M, const int64_t *runs, const int64_t *order,
                          int64_t e_lo, int64_t e_hi, float *h) {
    const int64_t N = w->num_avs, R = w->max_rank, IN = w->in;
    const int64_t S = w->num_slices, SR = S * R;
    float *h0 = h, *h1 = h + SR, *no_row = h + 2 * SR;
    memset(no_row, 0, SR * sizeof *no_row);
    for (int64_t i = 0; i < N; i++) {
        const int rank = w->rank_of[i];
        if (rank <= 0) continue;
        const float *a = w->a + i * SR * IN;  /* [S, R, in]: with rank == R, all slices are one block */
        const int64_t end = first_at_or_after(order, runs[i], runs[i + 1], e_hi);
        for (int64_t p = first_at_or_after(order, runs[i], runs[i + 1], e_lo); p < end; p += 2) {
            const int two = p + 1 < end;
            const int64_t e0 = order[p], e1 = two ? order[p + 1] : e0;
            const int64_t t0 = e0 / M, t1 = e1 / M;
            const float c0 = scale[e0], c1 = two ? scale[e1] : 0.f;
            if (rank == R)
                shrink2(h0, h1, a, x + t0 * x_stride, x + t1 * x_stride, IN, (int)SR, c0, c1);
            else
                for (int64_t s = 0; s < S; s++)
                    shrink2(h0 + s * R, h1 + s * R, a + s * R * IN, x + t0 * x_stride, x + t1 * x_stride, IN, rank, c0, c1);
            int64_t off = 0;
            for (int64_t s = 0; s < S; s++) {
                const int64_t n_out = w->out_size[s];
                const float *b = w->b + N * R * off + i * R * n_out;
                expand2(y + t0 * y_stride + off, y + t1 * y_stride + off, b, h0 + s * R, two ? h1 + s * R : no_row, n_out, rank);
                off += n_out;
            }
        }
    }
}

/* Rows per thread below which a call stays on one thread (-D overrides it, to compare). In serving,
 * torch's threads are still spinning from the base GEMM just before, so a parallel region costs ~1 us:
 * splitting from 32 rows (decode batches included) made a layer's blend 1.3-2x faster than from 128
 * (benchmarks/cpu_thread_split_bench.py; benchmarks/RESULTS.md, "CPU blend per layer"). */
#ifndef MIN_ROWS_PER_THREAD
#define MIN_ROWS_PER_THREAD 16
#endif

/* Add the blend of rows [0, T) to y. index/scale: [T, M], row-major. Returns 0, or -1 when out of memory.
 * Built with OpenMP (the runtime torch already loaded), large calls split the rows over torch's threads:
 * each thread owns whole rows, so no two threads write one row. */
int av_blend_f32(const av_weights *w, float *y, int64_t y_stride, const float *x, int64_t x_stride,
                 const int32_t *index, const float *scale, int64_t M, int64_t T) {
    const int64_t N = w->num_avs, R = w->max_rank > 0 ? w->max_rank : 1, entries = T * M;
    int chunks = 1;
#ifdef _OPENMP
    chunks = omp_get_max_threads();
    if (chunks > T / MIN_ROWS_PER_THREAD) chunks = (int)(T / MIN_ROWS_PER_THREAD);
    if (chunks < 1) chunks = 1;
#endif
    int64_t *runs = calloc(N + 1, sizeof *runs);
    int64_t *order = malloc((entries > 0 ? entries : 1) * sizeof *order);
    float *h = malloc(chunks * 3 * w->num_slices * R * sizeof *h);
    if (!runs || !order || !h) { free(runs); free(order); free(h); return -1; }
    for (int64_t e = 0; e < entries; e++)  /* counting sort of the entries by AV (stable: e increases in a run) */
        if (usable(w, index[e], scale[e])) runs[index[e] + 1]++;
    for (int64_t i = 0; i < N; i++) runs[i + 1] += runs[i];
    int64_t *next = malloc((N > 0 ? N : 1) * sizeof *next);
    if (!next) { free(runs); free(order); free(h); return -1; }
    memcpy(next, runs, N * sizeof *next);
    for (int64_t e = 0; e < entries; e++)
        if (usable(w, index[e], scale[e])) order[next[index[e]]++] = e;
    free(next);
    if (chunks == 1)  /* no parallel region: entering one costs ~0.5 us even with one thread */
        blend_entries(w, y, y_stride, x, x_stride, scale, M, runs, order, 0, T * M, h);
    else
#ifdef _OPENMP
#pragma omp parallel for num_threads(chunks) schedule(static)
#endif
    for (int c = 0; c < chunks; c++) {
        const int64_t t_lo = T * c / chunks, t_hi = T * (c + 1) / chunks;
        blend_entries(w, y, y_stride, x, x_stride, scale, M, runs, order, t_lo * M, t_hi * M, h + (int64_t)c * 3 * w->num_slices * R);
    }
    free(runs); free(order); free(h);
    return 0;
}

/* bfloat16 <-> float32, as torch converts: widening is exact; narrowing rounds to nearest even, NaN -> 0x7fc0. */
static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint16_t rounded = (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    return (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0 : rounded;
}

/* av_blend_f32 for bfloat16 x and y (unit inner stride): x is widened once into float32 scratch, the
 * blend is summed in float32 from zero, and each row with an entry gets y = bf16(float(y) + blend):
 * the float32 kernel's sums, rounded once. Returns 0, or -1 when out of memory. */
int av_blend_bf16(const av_weights *w, uint16_t *y, int64_t y_stride, const uint16_t *x, int64_t x_stride,
                  const int32_t *index, const float *scale, int64_t M, int64_t T) {
    int64_t out = 0;
    for (int64_t s = 0; s < w->num_slices; s++) out += w->out_size[s];
    const int64_t in = w->in;
    float *xf = malloc((T * in > 0 ? T * in : 1) * sizeof *xf);
    float *acc = calloc(T * out > 0 ? T * out : 1, sizeof *acc);
    if (!xf || !acc) { free(xf); free(acc); return -1; }
    for (int64_t t = 0; t < T; t++)
        for (int64_t k = 0; k < in; k++) xf[t * in + k] = bf16_to_f32(x[t * x_stride + k]);
    int status = av_blend_f32(w, acc, out, xf, in, index, scale, M, T);
    for (int64_t t = 0; status == 0 && t < T; t++) {
        int used = 0;  /* rows without a usable entry keep their bits */
        for (int64_t m = 0; m < M; m++) used |= usable(w, index[t * M + m], scale[t * M + m]);
        if (!used) continue;
        uint16_t *yt = y + t * y_stride;
        const float *at = acc + t * out;
        for (int64_t o = 0; o < out; o++) yt[o] = f32_to_bf16(bf16_to_f32(yt[o]) + at[o]);
    }
    free(xf); free(acc);
    return status;
}
