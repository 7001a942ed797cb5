/* One-row matrix-vector products that stream the weights at memory speed (gptneo_cli/native.py).
 *
 * Batch-1 decoding multiplies one activation row by every weight matrix: the time is the time
 * to read the weights. torch's CPU kernels for that shape (oneDNN, MKL, the int8 kernel)
 * reached 30-48 GB/s on an AMD EPYC whose memory streams 77 GB/s; these loops read 8 weight
 * rows at once with software prefetch, split the rows between OpenMP threads (the same OpenMP
 * runtime torch uses, which is loaded first) and reach 58-72 GB/s there. Built by
 * gptneo_cli/native.py with the system C compiler on first use, AVX-512 only.
 *
 *   y[o] = sum_i W[o, i] * x[i] (+ bias[o])              gemv_f32: W float32 [m, n]
 *   y[o] = scale[o] * sum_i Q[o, i] * x[i] (+ bias[o])   gemv_i8:  Q int8 [m, n]
 *   y[o] = sum_i B[o, i] * x[i] (+ bias[o])              gemv_bf16: B bfloat16 [m, n]
 *
 * x, scale, bias and y are float32; products and sums are float32 in every case.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#define ROWS 8          /* weight rows read together: 8 prefetch streams per thread */
#define AHEAD 1024      /* bytes prefetched ahead of each row's reads */

static inline __mmask16 tail_mask(int64_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

static inline float finish(__m512 acc, const float *scale, const float *bias, int64_t o) {
    float v = _mm512_reduce_add_ps(acc);
    if (scale) v *= scale[o];
    return bias ? v + bias[o] : v;
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
    for (int k = 0; k < rows; k++) y[k] = finish(acc[k], 0, bias ? bias + k : 0, 0);
}

static void f32_rows(const float *w, const float *x, const float *bias, float *y,
                     int64_t start, int64_t end, int64_t n) {
    int64_t o = start;
    for (; o + ROWS <= end; o += ROWS)
        f32_block(w + o * n, x, bias ? bias + o : 0, y + o, n, ROWS);
    for (; o < end; o++) f32_block(w + o * n, x, bias ? bias + o : 0, y + o, n, 1);
}

/* 16 int8 or bf16 weights as float32, and the same for the masked tail. bf16 is the top
 * half of a float32, so a shift is exact. */
static inline __m512 i8_to_f32(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

static inline __m512 i8_to_f32_masked(const int8_t *p, __mmask16 m) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, p)));
}

static inline __m512 bf16_to_f32(const uint16_t *p) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

static inline __m512 bf16_to_f32_masked(const uint16_t *p, __mmask16 m) {
    __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

/* int8 and bf16 rows: 64 weights per row per pass (4 unmasked loads, each 64-byte line of
 * the row prefetched AHEAD), float32 products and sums, a masked tail; `scale` (int8) or
 * NULL (bf16). NAME_rows runs whole blocks of ROWS rows, then single rows. */
#define NARROW(NAME, T)                                                                        \
    static inline __attribute__((always_inline)) void NAME##_block(                           \
        const T *r, const float *scale, const float *x, const float *bias, float *y,          \
        int64_t n, int rows) {                                                                 \
        __m512 acc[ROWS];                                                                      \
        for (int k = 0; k < ROWS; k++) acc[k] = _mm512_setzero_ps();                           \
        int64_t i = 0;                                                                         \
        for (; i + 64 <= n; i += 64) {                                                         \
            __m512 x0 = _mm512_loadu_ps(x + i), x1 = _mm512_loadu_ps(x + i + 16);              \
            __m512 x2 = _mm512_loadu_ps(x + i + 32), x3 = _mm512_loadu_ps(x + i + 48);         \
            for (int k = 0; k < rows; k++) {                                                   \
                const T *p = r + k * n + i;                                                    \
                for (int line = 0; line < (int)sizeof(T); line++)                              \
                    _mm_prefetch((const char *)p + AHEAD + 64 * line, _MM_HINT_T0);            \
                __m512 a = acc[k];                                                             \
                a = _mm512_fmadd_ps(NAME##_to_f32(p), x0, a);                                  \
                a = _mm512_fmadd_ps(NAME##_to_f32(p + 16), x1, a);                             \
                a = _mm512_fmadd_ps(NAME##_to_f32(p + 32), x2, a);                             \
                a = _mm512_fmadd_ps(NAME##_to_f32(p + 48), x3, a);                             \
                acc[k] = a;                                                                    \
            }                                                                                  \
        }                                                                                      \
        for (; i < n; i += 16) {                                                               \
            __mmask16 m = tail_mask(n - i);                                                    \
            __m512 xv = _mm512_maskz_loadu_ps(m, x + i);                                       \
            for (int k = 0; k < rows; k++)                                                     \
                acc[k] = _mm512_fmadd_ps(NAME##_to_f32_masked(r + k * n + i, m), xv, acc[k]);  \
        }                                                                                      \
        for (int k = 0; k < rows; k++)                                                         \
            y[k] = finish(acc[k], scale ? scale + k : 0, bias ? bias + k : 0, 0);              \
    }                                                                                          \
                                                                                               \
    static void NAME##_rows(const T *w, const float *scale, const float *x, const float *bias, \
                            float *y, int64_t start, int64_t end, int64_t n) {                 \
        int64_t o = start;                                                                     \
        for (; o + ROWS <= end; o += ROWS)                                                     \
            NAME##_block(w + o * n, scale ? scale + o : 0, x, bias ? bias + o : 0, y + o, n,   \
                         ROWS);                                                                \
        for (; o < end; o++)                                                                   \
            NAME##_block(w + o * n, scale ? scale + o : 0, x, bias ? bias + o : 0, y + o, n,   \
                         1);                                                                   \
    }

NARROW(i8, int8_t)
NARROW(bf16, uint16_t)

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

void gemv_i8(const int8_t *q, const float *scale, const float *x, const float *bias, float *y,
             int64_t m, int64_t n, int threads) {
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t start, end;
        share(m, omp_get_thread_num(), omp_get_num_threads(), &start, &end);
        i8_rows(q, scale, x, bias, y, start, end, n);
    }
}

void gemv_bf16(const uint16_t *w, const float *x, const float *bias, float *y, int64_t m,
               int64_t n, int threads) {
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int64_t start, end;
        share(m, omp_get_thread_num(), omp_get_num_threads(), &start, &end);
        bf16_rows(w, 0, x, bias, y, start, end, n);
    }
}

/* ---- a few activation rows (a speculative verify, a small batch), float32 ------------------
 * The same blocks of 8 weight rows as one row, each read from memory once (prefetched on the
 * first pass) and again from cache for every further pair of activation rows. `wr` and `xr`
 * are literal constants at every call, so the 8 x 2 accumulators stay in registers. y is
 * [rows, m]. Passes after the first prefetch the next block, so memory stays busy while
 * they compute from cache. gptneo_cli measures it against oneDNN per shape (6 rows): it
 * beat oneDNN at 2-8 rows on the demo model's matrices (1.2-3x) and on most of
 * gpt-neo-125M's (0.97-1.7x). */
static inline __m512 f32_load(const float *p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }


#define PAIRS(NAME, T)                                                                        \
    static inline __attribute__((always_inline)) void NAME##_tile(                           \
        const T *w, const float *x, const float *scale, const float *bias, float *y,         \
        int64_t m, int64_t n, int wr, int xr, const char *pf) {                               \
        __m512 acc[ROWS][2];                                                                  \
        for (int a = 0; a < ROWS; a++) acc[a][0] = acc[a][1] = _mm512_setzero_ps();          \
        for (int64_t i = 0; i < n; i += 16) {                                                 \
            __mmask16 msk = tail_mask(n - i);                                                 \
            __m512 x0 = _mm512_maskz_loadu_ps(msk, x + i);                                    \
            __m512 x1 = xr > 1 ? _mm512_maskz_loadu_ps(msk, x + n + i) : x0;                  \
            for (int a = 0; a < wr; a++) {                                                    \
                if (pf) _mm_prefetch(pf + (a * n + i) * (int64_t)sizeof(T), _MM_HINT_T0);     \
                __m512 wv = NAME##_load(w + a * n + i, msk);                                  \
                acc[a][0] = _mm512_fmadd_ps(wv, x0, acc[a][0]);                               \
                if (xr > 1) acc[a][1] = _mm512_fmadd_ps(wv, x1, acc[a][1]);                   \
            }                                                                                 \
        }                                                                                     \
        for (int a = 0; a < wr; a++)                                                          \
            for (int b = 0; b < xr; b++)                                                      \
                y[b * m + a] = finish(acc[a][b], scale ? scale + a : 0, bias ? bias + a : 0, 0); \
    }                                                                                         \
                                                                                              \
    static void NAME##_pairs(const T *w, const float *x, const float *scale,                 \
                             const float *bias, float *y, int64_t m, int64_t n, int64_t rows, \
                             int64_t start, int64_t end) {                                    \
        for (int64_t o = start; o < end; o += ROWS) {                                         \
            int wr = end - o < ROWS ? (int)(end - o) : ROWS;                                  \
            for (int64_t r = 0; r < rows; r += 2) {                                           \
                const float *xs = x + r * n;                                                  \
                float *ys = y + r * m;                                                        \
                int two = rows - r > 1;                                                       \
                const char *first = r == 0 ? (const char *)(w + o * n) + AHEAD : 0;           \
                const char *next = o + 2 * ROWS <= end ? (const char *)(w + (o + ROWS) * n) : 0; \
                const char *pf = r == 0 ? first : next;                                       \
                for (int a = 0; wr < ROWS && a < wr; a++) {                                   \
                    const T *wa = w + (o + a) * n;                                            \
                    const char *pa = first ? (const char *)wa + AHEAD : 0;                    \
                    const float *s = scale ? scale + o + a : 0, *b = bias ? bias + o + a : 0; \
                    if (two) NAME##_tile(wa, xs, s, b, ys + o + a, m, n, 1, 2, pa);        \
                    else NAME##_tile(wa, xs, s, b, ys + o + a, m, n, 1, 1, pa);            \
                }                                                                             \
                if (wr < ROWS) continue;                                                      \
                const float *s = scale ? scale + o : 0, *b = bias ? bias + o : 0;             \
                if (two) NAME##_tile(w + o * n, xs, s, b, ys + o, m, n, ROWS, 2, pf);      \
                else NAME##_tile(w + o * n, xs, s, b, ys + o, m, n, ROWS, 1, pf);          \
            }                                                                                 \
        }                                                                                     \
    }                                                                                         \
                                                                                              \
    void gemm_##NAME(const T *w, const float *x, const float *scale, const float *bias,      \
                     float *y, int64_t m, int64_t n, int64_t rows, int threads) {             \
        _Pragma("omp parallel num_threads(threads) if (threads > 1)") {                       \
            int64_t start, end;                                                               \
            share(m, omp_get_thread_num(), omp_get_num_threads(), &start, &end);              \
            NAME##_pairs(w, x, scale, bias, y, m, n, rows, start, end);                       \
        }                                                                                     \
    }

PAIRS(f32, float)
