/* Our matrix products (gptneo_cli/native.py): weights streamed at memory speed.
 *
 * Batch-1 decoding multiplies one activation row by every weight matrix: the time is the time
 * to read the weights. torch's CPU kernels for that shape (oneDNN, MKL, the int8 kernel)
 * reached 30-48 GB/s on an AMD EPYC whose memory streams 77 GB/s. Two kinds of loops here:
 *
 * - row kernels read the checkpoint's [m, n] rows in place, 8 rows at once with software
 *   prefetch (58-72 GB/s there), one activation row:
 *     y[o] = sum_i W[o, i] * x[i] (+ bias[o])      gemv_f32: W float32, gemv_bf16: W bf16
 * - panel kernels read a copy repacked into column panels, any number of activation rows,
 *   float32, bf16 or int8 weights (below, "panels").
 *
 * Both split the outputs between OpenMP threads (the same OpenMP runtime torch uses, which is
 * loaded first). x, scale, bias and y are float32; products and sums are float32 in every
 * case. Built by gptneo_cli/native.py with the system C compiler on first use, AVX-512 only.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#define ROWS 8          /* weight rows read together: 8 prefetch streams per thread */
#define AHEAD 1024      /* bytes prefetched ahead of each row's reads */

static inline __mmask16 tail_mask(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

static inline float finish(__m512 acc, const float *bias) {
    float v = _mm512_reduce_add_ps(acc);
    return bias ? v + *bias : v;
}

/* `rows` weight rows from r (a compile-time constant after inlining: the accumulators stay
 * in registers). */
static inline __attribute__((always_inline)) void f32_block(
    const float *r, const float *x, const float *bias, float *y, int64_t n, int rows) {
    __m512 acc[ROWS];
    for (int k = 0; k < ROWS; k++) acc[k] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        __m512 xv = _mm512_maskz_loadu_ps(m, x + i);
        for (int k = 0; k < rows; k++) {
            _mm_prefetch((const char *)(r + k * n + i) + AHEAD, _MM_HINT_T0);
            acc[k] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, r + k * n + i), xv, acc[k]);
        }
    }
    for (int k = 0; k < rows; k++) y[k] = finish(acc[k], bias ? bias + k : 0);
}

/* 16 int8 or bf16 weights as float32 (bf16 also masked, for a row's tail). bf16 is the top
 * half of a float32, so a shift is exact. */
static inline __m512 i8_to_f32(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

static inline __m512 bf16_to_f32(const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

static inline __m512 bf16_to_f32_masked(const uint16_t *p, __mmask16 m) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* bf16 rows: 64 weights per row per pass (4 unmasked loads, each 64-byte line of the row
 * prefetched AHEAD), float32 products and sums, a masked tail. bf16_rows runs whole blocks
 * of ROWS rows, then single rows. */
static inline __attribute__((always_inline)) void bf16_block(
    const uint16_t *r, const float *x, const float *bias, float *y, int64_t n, int rows) {
    __m512 acc[ROWS];
    for (int k = 0; k < ROWS; k++) acc[k] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        __m512 x0 = _mm512_loadu_ps(x + i), x1 = _mm512_loadu_ps(x + i + 16);
        __m512 x2 = _mm512_loadu_ps(x + i + 32), x3 = _mm512_loadu_ps(x + i + 48);
        for (int k = 0; k < rows; k++) {
            const uint16_t *p = r + k * n + i;
            for (int line = 0; line < 2; line++)
                _mm_prefetch((const char *)p + AHEAD + 64 * line, _MM_HINT_T0);
            __m512 a = acc[k];
            a = _mm512_fmadd_ps(bf16_to_f32(p), x0, a);
            a = _mm512_fmadd_ps(bf16_to_f32(p + 16), x1, a);
            a = _mm512_fmadd_ps(bf16_to_f32(p + 32), x2, a);
            a = _mm512_fmadd_ps(bf16_to_f32(p + 48), x3, a);
            acc[k] = a;
        }
    }
    for (; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        __m512 xv = _mm512_maskz_loadu_ps(m, x + i);
        for (int k = 0; k < rows; k++)
            acc[k] = _mm512_fmadd_ps(bf16_to_f32_masked(r + k * n + i, m), xv, acc[k]);
    }
    for (int k = 0; k < rows; k++)
        y[k] = finish(acc[k], bias ? bias + k : 0);
}

/* Weight rows [start, end) of a float32 or bf16 matrix: whole blocks of ROWS, then single
 * rows. */
#define ROWS_OF(NAME, T)                                                                     \
    static void NAME##_rows(const T *w, const float *x, const float *bias, float *y,        \
                            int64_t start, int64_t end, int64_t n) {                         \
        int64_t o = start;                                                                   \
        for (; o + ROWS <= end; o += ROWS)                                                   \
            NAME##_block(w + o * n, x, bias ? bias + o : 0, y + o, n, ROWS);                 \
        for (; o < end; o++) NAME##_block(w + o * n, x, bias ? bias + o : 0, y + o, n, 1);   \
    }

ROWS_OF(f32, float)
ROWS_OF(bf16, uint16_t)

/* Rows [start, end) of thread t of T: whole blocks of ROWS, the last thread takes the rest. */
static void share(int64_t m, int t, int T, int64_t *start, int64_t *end) {
    int64_t per = (m + T - 1) / T;
    per = (per + ROWS - 1) / ROWS * ROWS;
    *start = t * per < m ? t * per : m;
    *end = *start + per < m ? *start + per : m;
}

void gemv_f32(const float *w, const float *x, const float *bias, float *y, int64_t m, int64_t n,
              int threads) {
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t start, end;
        share(m, omp_get_thread_num(), omp_get_num_threads(), &start, &end);
        f32_rows(w, x, bias, y, start, end, n);
    }
}

void gemv_bf16(const uint16_t *w, const float *x, const float *bias, float *y, int64_t m,
               int64_t n, int threads) {
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t start, end;
        share(m, omp_get_thread_num(), omp_get_num_threads(), &start, &end);
        bf16_rows(w, x, bias, y, start, end, n);
    }
}

/* ---- panels: any number of activation rows, float32, bf16 or int8 weights ------------------
 * The matrix repacked (gptneo_cli/native.py, `pack_panels`) as column panels: panel b holds
 * outputs [b*PANEL, (b+1)*PANEL) as P[b][i][j] = W[b*PANEL + j, i], zero-padded past m. A
 * panel is one contiguous stream; each input i loads PANEL weights (3 vectors) once and
 * multiplies them by up to 8 broadcast activations, so the sums stay in 8 x 3 registers
 * with no horizontal reductions. One row streams the weights faster than the row kernels
 * above (45-50 against 38 GB/s, float32); 8 rows cost about what one row costs (the weights
 * are read once); more rows run 8 at a time from cache near the FMA units' peak, ahead of
 * oneDNN's float32 GEMM at every row count measured (docs/PERFORMANCE.md).
 *
 *   y[r, o] = scale[o] * sum_i P(W)[o, i] * x[r, i] (+ bias[o]),  scale NULL for float weights
 */
#define PANEL 48
#define VECS (PANEL / 16)
#define PANEL_AHEAD 8192 /* bytes prefetched ahead in the panel's stream */

int panel_width(void) { return PANEL; }

static inline __m512 f32_to_f32(const float *p) { return _mm512_loadu_ps(p); }

#define PANELS(NAME, T)                                                                       \
    static inline __attribute__((always_inline)) void NAME##_panel(                          \
        const T *p, const float *x, int64_t n, int rows, const float *scale,                  \
        const float *bias, float *y, int64_t m, int cols) {                                   \
        __m512 acc[8][VECS];                                                                  \
        for (int r = 0; r < 8; r++)                                                           \
            for (int v = 0; v < VECS; v++) acc[r][v] = _mm512_setzero_ps();                   \
        for (int64_t i = 0; i < n; i++) {                                                     \
            const T *w = p + i * PANEL;                                                       \
            for (int line = 0; line < PANEL * (int)sizeof(T); line += 64)                     \
                _mm_prefetch((const char *)w + PANEL_AHEAD + line, _MM_HINT_T0);              \
            __m512 wv[VECS];                                                                  \
            for (int v = 0; v < VECS; v++) wv[v] = NAME##_to_f32(w + 16 * v);                 \
            for (int r = 0; r < rows; r++) {                                                  \
                __m512 xr = _mm512_set1_ps(x[r * n + i]);                                     \
                for (int v = 0; v < VECS; v++) acc[r][v] = _mm512_fmadd_ps(wv[v], xr, acc[r][v]); \
            }                                                                                 \
        }                                                                                     \
        for (int v = 0; v < VECS && 16 * v < cols; v++) {                                     \
            __mmask16 msk = tail_mask(cols - 16 * v);                                         \
            __m512 s = scale ? _mm512_maskz_loadu_ps(msk, scale + 16 * v) : _mm512_set1_ps(1); \
            __m512 b = bias ? _mm512_maskz_loadu_ps(msk, bias + 16 * v) : _mm512_setzero_ps(); \
            for (int r = 0; r < rows; r++)                                                    \
                _mm512_mask_storeu_ps(y + r * m + 16 * v, msk, _mm512_fmadd_ps(acc[r][v], s, b)); \
        }                                                                                     \
    }                                                                                         \
                                                                                              \
    void panels_##NAME(const T *p, const float *x, const float *scale, const float *bias,    \
                       float *y, int64_t m, int64_t n, int64_t rows, int threads) {           \
        int64_t count = (m + PANEL - 1) / PANEL;                                              \
        _Pragma("omp parallel for num_threads(threads) schedule(static) if (threads > 1)")    \
        for (int64_t b = 0; b < count; b++) {                                                 \
            int64_t o = b * PANEL;                                                            \
            int cols = m - o < PANEL ? (int)(m - o) : PANEL;                                  \
            const float *s = scale ? scale + o : 0, *bb = bias ? bias + o : 0;                \
            for (int64_t r = 0; r < rows; r += 8) {                                           \
                const T *pb = p + b * n * PANEL;                                              \
                const float *xs = x + r * n;                                                  \
                float *ys = y + r * m + o;                                                    \
                switch (rows - r < 8 ? rows - r : 8) { /* literal row counts: registers */    \
                case 1: NAME##_panel(pb, xs, n, 1, s, bb, ys, m, cols); break;                \
                case 2: NAME##_panel(pb, xs, n, 2, s, bb, ys, m, cols); break;                \
                case 3: NAME##_panel(pb, xs, n, 3, s, bb, ys, m, cols); break;                \
                case 4: NAME##_panel(pb, xs, n, 4, s, bb, ys, m, cols); break;                \
                case 5: NAME##_panel(pb, xs, n, 5, s, bb, ys, m, cols); break;                \
                case 6: NAME##_panel(pb, xs, n, 6, s, bb, ys, m, cols); break;                \
                case 7: NAME##_panel(pb, xs, n, 7, s, bb, ys, m, cols); break;                \
                default: NAME##_panel(pb, xs, n, 8, s, bb, ys, m, cols);                      \
                }                                                                             \
            }                                                                                 \
        }                                                                                     \
    }

PANELS(f32, float)
PANELS(i8, int8_t)
PANELS(bf16, uint16_t)

/* ---- bf16 pairs: panels of bf16 weight pairs, AVX512-BF16 dot products --------------------
 * The same panels over a bf16 matrix viewed as pairs of adjacent inputs (one 32-bit word per
 * weight pair, the width padded to even): vdpbf16ps multiplies 16 pairs by a broadcast pair
 * of activations (rounded to bf16, as a bf16 model's are) and adds both products to float32
 * sums, twice the float32 FMA rate, so prompts keep up with oneDNN's bf16 GEMM. Only called
 * where the CPU has avx512_bf16 (gptneo_cli/native.py); n is the number of pairs. */
#define DOT __attribute__((target("avx512bf16")))

static inline __attribute__((always_inline)) DOT void dot_panel(
    const uint32_t *p, const uint32_t *x, int64_t n, int rows, const float *scale,
    const float *bias, float *y, int64_t m, int cols) {
    __m512 acc[8][VECS];
    for (int r = 0; r < 8; r++)
        for (int v = 0; v < VECS; v++) acc[r][v] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i++) {
        const uint32_t *w = p + i * PANEL;
        for (int line = 0; line < PANEL * 4; line += 64)
            _mm_prefetch((const char *)w + PANEL_AHEAD + line, _MM_HINT_T0);
        __m512bh wv[VECS];
        for (int v = 0; v < VECS; v++) wv[v] = (__m512bh)_mm512_loadu_si512(w + 16 * v);
        for (int r = 0; r < rows; r++) {
            __m512bh xr = (__m512bh)_mm512_set1_epi32((int)x[r * n + i]);
            for (int v = 0; v < VECS; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], wv[v], xr);
        }
    }
    for (int v = 0; v < VECS && 16 * v < cols; v++) {
        __mmask16 msk = tail_mask(cols - 16 * v);
        __m512 s = scale ? _mm512_maskz_loadu_ps(msk, scale + 16 * v) : _mm512_set1_ps(1);
        __m512 b = bias ? _mm512_maskz_loadu_ps(msk, bias + 16 * v) : _mm512_setzero_ps();
        for (int r = 0; r < rows; r++)
            _mm512_mask_storeu_ps(y + r * m + 16 * v, msk, _mm512_fmadd_ps(acc[r][v], s, b));
    }
}

/* Every row of x (8 at a time) times one panel `p` of pairs: outputs [o, o + cols). */
static DOT void dot_rows(const uint32_t *p, const uint32_t *x, int64_t n, int64_t rows,
                         const float *scale, const float *bias, float *y, int64_t m, int cols) {
    for (int64_t r = 0; r < rows; r += 8) {
        const uint32_t *xs = x + r * n;
        float *ys = y + r * m;
        switch (rows - r < 8 ? rows - r : 8) { /* literal row counts: registers */
        case 1: dot_panel(p, xs, n, 1, scale, bias, ys, m, cols); break;
        case 2: dot_panel(p, xs, n, 2, scale, bias, ys, m, cols); break;
        case 3: dot_panel(p, xs, n, 3, scale, bias, ys, m, cols); break;
        case 4: dot_panel(p, xs, n, 4, scale, bias, ys, m, cols); break;
        case 5: dot_panel(p, xs, n, 5, scale, bias, ys, m, cols); break;
        case 6: dot_panel(p, xs, n, 6, scale, bias, ys, m, cols); break;
        case 7: dot_panel(p, xs, n, 7, scale, bias, ys, m, cols); break;
        default: dot_panel(p, xs, n, 8, scale, bias, ys, m, cols);
        }
    }
}

DOT void panels_pairs(const uint32_t *p, const uint32_t *x, const float *scale, const float *bias,
                      float *y, int64_t m, int64_t n, int64_t rows, int threads) {
    (void)scale; /* the panels signature; bf16 weights have no scales */
    int64_t count = (m + PANEL - 1) / PANEL;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t b = 0; b < count; b++) {
        int64_t o = b * PANEL;
        int cols = m - o < PANEL ? (int)(m - o) : PANEL;
        dot_rows(p + b * n * PANEL, x, n, rows, 0, bias ? bias + o : 0, y + o, m, cols);
    }
}

/* int8 panels for a prompt: each panel is converted once into bf16 pairs (exact: |q| <= 127)
 * in a buffer of the thread's, then every row runs the dot-product loop on it, at twice the
 * rate of the float32 FMAs of panels_i8 (the activations are bf16 pairs: rounded, as the
 * bf16 GEMM that int8 prompts ran before rounded them). n counts inputs (the pairs of x:
 * (n + 1) / 2 per row). Returns 0, or -1 where a buffer could not be allocated. */
static DOT void i8_pairs(const int8_t *p, int64_t n, uint32_t *out) {
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int64_t i = 0; 2 * i < n; i++) {
        const int8_t *lo = p + 2 * i * PANEL;
        for (int v = 0; v < VECS; v++) {
            __m512i a = _mm512_castps_si512(i8_to_f32(lo + 16 * v));
            __m512i b = 2 * i + 1 < n ? _mm512_castps_si512(i8_to_f32(lo + PANEL + 16 * v))
                                      : _mm512_setzero_si512();
            __m512i pair = _mm512_or_si512(_mm512_srli_epi32(a, 16), _mm512_and_si512(b, high));
            _mm512_storeu_si512(out + i * PANEL + 16 * v, pair);
        }
    }
}

DOT int panels_i8_pairs(const int8_t *p, const uint32_t *x, const float *scale, const float *bias,
                        float *y, int64_t m, int64_t n, int64_t rows, int threads) {
    int64_t count = (m + PANEL - 1) / PANEL, pairs = (n + 1) / 2;
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : failed)
    {
        uint32_t *buffer = malloc((size_t)pairs * PANEL * sizeof(uint32_t));
        failed = buffer == 0;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < count; b++) {
            if (!buffer) continue;
            int64_t o = b * PANEL;
            int cols = m - o < PANEL ? (int)(m - o) : PANEL;
            i8_pairs(p + b * n * PANEL, n, buffer);
            dot_rows(buffer, x, pairs, rows, scale + o, bias ? bias + o : 0, y + o, m, cols);
        }
        free(buffer);
    }
    return failed ? -1 : 0;
}
