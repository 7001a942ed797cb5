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
 *   float32, bf16 or int8 weights (below, "panels");
 * - the decode step runs every block of a panel-held model for one new token per row
 *   (gptneo_cli/step.py): products, layer norms, attention and GELU in one OpenMP region.
 *
 * All of them split their work between OpenMP threads (the same OpenMP runtime torch uses, which is
 * loaded first). x, scale, bias and y are float32; products and sums are float32 in every
 * case. Built by gptneo_cli/native.py with the system C compiler on first use, AVX-512 only.
 */
#include <immintrin.h>
#include <omp.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <math.h>
#include <stdlib.h>

#define ROWS 8          /* weight rows read together: 8 prefetch streams per thread */
#define AHEAD 1024      /* bytes prefetched ahead of each row's reads */
#define KV_PREFETCH (256 << 10) /* bytes of KV cache a thread prefetches per attention phase */

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

/* 16 bf16 weights as float32 (also masked, for a row's tail). bf16 is the top half of a
 * float32, so a shift is exact. */
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
/* The layouts a Mat (the decode step) or a row lookup can hold. */
enum { KIND_F32 = 0, KIND_BF16 = 1, KIND_PAIRS = 2, KIND_I8 = 3 };
#define VECS (PANEL / 16)
/* Bytes prefetched ahead in a panel's stream, into L2 (T1): more lines in flight than L1's
 * miss buffers allow. Against the same prefetches into L1 (T0), in one process, alternating
 * (gpt-neo-125M, 2 threads, AMD EPYC Zen 4): decode 1.09x float32, 1.03x bf16, 1.12x int8;
 * 4 KiB ahead made no difference, 16 KiB was 2-5 % slower. */
#define PANEL_AHEAD 8192

int panel_width(void) { return PANEL; }

/* Outputs of panel b of a matrix with m outputs (the last panel may be partial). */
static inline int panel_cols(int64_t m, int64_t b) {
    return m - b * PANEL < PANEL ? (int)(m - b * PANEL) : PANEL;
}

static inline __m512 f32_to_f32(const float *p) { return _mm512_loadu_ps(p); }

/* What a panel kernel does with y[r, o] = scale * sum + bias: store it, add it to y (a
 * residual), or store its GELU (tanh form, the decode step's MLP). */
enum { STORE = 0, ADD = 1, GELU = 2 };

static inline __m512 exp512(__m512 x);

/* gelu_new: 0.5 x (1 + tanh(u)) = x / (1 + exp(-2u)), u = sqrt(2 / pi) (x + 0.044715 x^3). */
static inline __m512 gelu512(__m512 x) {
    __m512 u = _mm512_mul_ps(x, _mm512_mul_ps(x, x));
    u = _mm512_mul_ps(_mm512_fmadd_ps(u, _mm512_set1_ps(0.044715f), x),
                      _mm512_set1_ps(-1.5957691216057308f));
    return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(u)));
}

static inline void finish_panel(__m512 acc, __m512 s, __m512 b, float *y, __mmask16 msk, int mode) {
    __m512 out = _mm512_fmadd_ps(acc, s, b);
    if (mode == ADD) out = _mm512_add_ps(out, _mm512_maskz_loadu_ps(msk, y));
    else if (mode == GELU) out = gelu512(out);
    _mm512_mask_storeu_ps(y, msk, out);
}

/* The literal row counts 1..8 (so the sums stay in registers) for rows [0, rows) in blocks
 * of 8: CALL(count) runs one block at row r. */
#define EIGHT_AT_A_TIME(rows, CALL)                                                           \
    for (int64_t r = 0; r < (rows); r += 8) {                                                 \
        switch ((rows) - r < 8 ? (rows) - r : 8) {                                            \
        case 1: CALL(1); break;                                                               \
        case 2: CALL(2); break;                                                               \
        case 3: CALL(3); break;                                                               \
        case 4: CALL(4); break;                                                               \
        case 5: CALL(5); break;                                                               \
        case 6: CALL(6); break;                                                               \
        case 7: CALL(7); break;                                                               \
        default: CALL(8);                                                                     \
        }                                                                                     \
    }

#define PANELS(NAME, T)                                                                       \
    static inline __attribute__((always_inline)) void NAME##_panel(                          \
        const T *p, const float *x, int64_t n, int rows, const float *scale,                  \
        const float *bias, float *y, int64_t m, int cols, int mode) {                         \
        __m512 acc[8][VECS];                                                                  \
        for (int r = 0; r < 8; r++)                                                           \
            for (int v = 0; v < VECS; v++) acc[r][v] = _mm512_setzero_ps();                   \
        for (int64_t i = 0; i < n; i++) {                                                     \
            const T *w = p + i * PANEL;                                                       \
            for (int line = 0; line < PANEL * (int)sizeof(T); line += 64)                     \
                _mm_prefetch((const char *)w + PANEL_AHEAD + line, _MM_HINT_T1);              \
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
                finish_panel(acc[r][v], s, b, y + r * m + 16 * v, msk, mode);                 \
        }                                                                                     \
    }                                                                                         \
                                                                                              \
    /* Panel b (outputs [b * PANEL, ...)) for every row of x. */                              \
    static void NAME##_panel_b(const T *p, const float *x, const float *scale,                \
                               const float *bias, float *y, int64_t m, int64_t n, int64_t rows, \
                             int64_t b, int mode) {                                           \
        int64_t o = b * PANEL;                                                                \
        int cols = panel_cols(m, b);                                                          \
        const float *s = scale ? scale + o : 0, *bb = bias ? bias + o : 0;                    \
        const T *pb = p + b * n * PANEL;                                                      \
        EIGHT_AT_A_TIME(rows, NAME##_CALL)                                                    \
    }                                                                                         \
                                                                                              \
    void panels_##NAME(const T *p, const float *x, const float *scale, const float *bias,    \
                       float *y, int64_t m, int64_t n, int64_t rows, int threads) {           \
        int64_t count = (m + PANEL - 1) / PANEL;                                              \
        _Pragma("omp parallel for num_threads(threads) schedule(static) if (threads > 1)")    \
        for (int64_t b = 0; b < count; b++)                                                   \
            NAME##_panel_b(p, x, scale, bias, y, m, n, rows, b, STORE);                       \
    }

#define f32_CALL(k) f32_panel(pb, x + r * n, n, k, s, bb, y + r * m + o, m, cols, mode)
#define bf16_CALL(k) bf16_panel(pb, x + r * n, n, k, s, bb, y + r * m + o, m, cols, mode)

PANELS(f32, float)
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
    const float *bias, float *y, int64_t m, int cols, int mode) {
    __m512 acc[8][VECS];
    for (int r = 0; r < 8; r++)
        for (int v = 0; v < VECS; v++) acc[r][v] = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i++) {
        const uint32_t *w = p + i * PANEL;
        for (int line = 0; line < PANEL * 4; line += 64)
            _mm_prefetch((const char *)w + PANEL_AHEAD + line, _MM_HINT_T1);
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
            finish_panel(acc[r][v], s, b, y + r * m + 16 * v, msk, mode);
    }
}

/* Every row of x (8 at a time) times one panel `p` of pairs: outputs [o, o + cols). */
static DOT void dot_rows(const uint32_t *p, const uint32_t *x, int64_t n, int64_t rows,
                         const float *scale, const float *bias, float *y, int64_t m, int cols,
                         int mode) {
#define DOT_CALL(k) dot_panel(p, x + r * n, n, k, scale, bias, y + r * m, m, cols, mode)
    EIGHT_AT_A_TIME(rows, DOT_CALL)
}

/* Panel b of a pairs matrix for every row of x (pairs too). */
static DOT void pairs_panel_b(const uint32_t *p, const uint32_t *x, const float *bias, float *y,
                              int64_t m, int64_t n, int64_t rows, int64_t b, int mode) {
    int64_t o = b * PANEL;
    dot_rows(p + b * n * PANEL, x, n, rows, 0, bias ? bias + o : 0, y + o, m, panel_cols(m, b),
             mode);
}

DOT void panels_pairs(const uint32_t *p, const uint32_t *x, const float *scale, const float *bias,
                      float *y, int64_t m, int64_t n, int64_t rows, int threads) {
    (void)scale; /* the panels signature; bf16 weights have no scales */
    int64_t count = (m + PANEL - 1) / PANEL;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int64_t b = 0; b < count; b++) pairs_panel_b(p, x, bias, y, m, n, rows, b, STORE);
}

/* Rows of n float32 as bf16 pairs (round to nearest even; a zero pads an odd width). */
static DOT void to_pairs(const float *x, uint32_t *out, int64_t rows, int64_t n) {
    int64_t words = (n + 1) / 2;
    for (int64_t r = 0; r < rows; r++) {
        uint16_t *o = (uint16_t *)(out + r * words);
        for (int64_t i = 0; i < n; i += 16) {
            __mmask16 m = tail_mask(n - i);
            __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, x + r * n + i));
            _mm256_mask_storeu_epi16(o + i, m, (__m256i)h);
        }
        if (n % 2) o[n] = 0;
    }
}

/* ---- int8 quads: panels of 4 inputs x PANEL outputs, VNNI integer dot products ----------
 * int8 matrices are held as quads: P[b][q][j][t] = W[b*PANEL + j, 4q + t] (zero past m and
 * n), with colsum[o] = sum_i W[o, i]. The layout serves three loops:
 *
 * - one row (a decode step): the activations as 24-bit fixed point, x ~ step * (u - 2^23)
 *   with u in [0, 2^24) split into 3 bytes (`to_digits`); vpdpbusd multiplies 4 unsigned
 *   digit bytes by the 4 signed weights of a column and adds them to an int32 sum, 64
 *   weights an instruction with no conversion, so the weights stream ~1.4x as fast as the
 *   float32 FMAs on int8 converted to float (which ran out of cores before memory did).
 *   The sums are exact; sum_i W x = step * (S0 + 2^8 S1 + 2^16 S2 - 2^23 colsum) in int64,
 *   rounded once to float32: the activations' rounding (half a step, 2^-24 of the row's
 *   largest) is below float32's rounding of the same sum;
 * - more rows (batched steps, verifies): float32 FMAs, the weights sign-extended out of
 *   the quads once for every row (float32 sums, exact products);
 * - prompts (17+ tokens a sequence, gptneo_cli/fast.py Int8Linear.PANEL_BF16_ROWS): each
 *   panel converted once into bf16 pairs for the dot-product kernel (x rounded to bf16),
 *   as the bf16 GEMM that int8 prompts ran before rounded it.
 */
#define QV __attribute__((target("avx512vnni,avx512dq")))
#define QUAD (4 * PANEL) /* bytes of one quad row of a panel */

/* x (n floats) as digits: digits[d * n4 + q] holds byte d of u for inputs 4q..4q+3. Returns
 * the step, NaN where x holds a NaN or an infinity (so the output does too). */
static QV float to_digits(const float *x, int64_t n, uint32_t *digits) {
    int64_t n4 = (n + 3) / 4;
    __m512 top = _mm512_setzero_ps(), bad = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        top = _mm512_max_ps(top, _mm512_abs_ps(v));
        bad = _mm512_add_ps(bad, _mm512_sub_ps(v, v)); /* 0, or NaN for NaN and inf */
    }
    if (_mm512_reduce_add_ps(bad) != 0.0f) return NAN;
    float most = _mm512_reduce_max_ps(top), step = most > 0 ? most / 8388607.0f : 1.0f;
    __m512 inv = _mm512_set1_ps(1.0f / step);
    __m512i low = _mm512_setzero_si512(), high = _mm512_set1_epi32((1 << 24) - 1);
    for (int64_t i = 0; i < 4 * n4; i += 16) {
        __mmask16 m = tail_mask(n - i > 0 ? n - i : 0);
        __m512i u = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), inv));
        u = _mm512_min_epi32(_mm512_max_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(1 << 23)), low), high);
        for (int d = 0; d < 3; d++) {
            __m128i bytes = _mm512_cvtepi32_epi8(_mm512_srli_epi32(u, 8 * d));
            _mm_mask_storeu_epi8((char *)(digits + d * n4) + i, tail_mask(4 * n4 - i), bytes);
        }
    }
    return step;
}

/* 8 of the 16 int32 lanes (the low or the high half) as int64. */
static inline QV __m512i half64(__m512i z, int high) {
    return _mm512_cvtepi32_epi64(high ? _mm512_extracti64x4_epi64(z, 1) : _mm512_castsi512_si256(z));
}

/* One row times panel `p` (outputs [o, o + cols) of y, already offset). */
static QV void q8_panel(const int8_t *p, const uint32_t *digits, int64_t n4, const float *scale,
                        const float *bias, const int32_t *colsum, float step, float *y, int cols,
                        int mode) {
    __m512i acc[3][VECS];
    for (int d = 0; d < 3; d++)
        for (int v = 0; v < VECS; v++) acc[d][v] = _mm512_setzero_si512();
    for (int64_t q = 0; q < n4; q++) {
        const int8_t *w = p + q * QUAD;
        for (int line = 0; line < QUAD; line += 64)
            _mm_prefetch((const char *)w + PANEL_AHEAD + line, _MM_HINT_T1);
        __m512i wv[VECS];
        for (int v = 0; v < VECS; v++) wv[v] = _mm512_loadu_si512(w + 64 * v);
        for (int d = 0; d < 3; d++) {
            __m512i xd = _mm512_set1_epi32((int)digits[d * n4 + q]);
            for (int v = 0; v < VECS; v++) acc[d][v] = _mm512_dpbusd_epi32(acc[d][v], xd, wv[v]);
        }
    }
    for (int v = 0; v < VECS && 16 * v < cols; v++) {
        __mmask16 msk = tail_mask(cols - 16 * v);
        __m512i sums = _mm512_maskz_loadu_epi32(msk, colsum + 16 * v);
        __m256 halves[2];
        for (int h = 0; h < 2; h++) {
            __m512i t = half64(acc[0][v], h);
            t = _mm512_add_epi64(t, _mm512_slli_epi64(half64(acc[1][v], h), 8));
            t = _mm512_add_epi64(t, _mm512_slli_epi64(half64(acc[2][v], h), 16));
            t = _mm512_sub_epi64(t, _mm512_slli_epi64(half64(sums, h), 23));
            halves[h] = _mm512_cvtepi64_ps(t);
        }
        __m512 total = _mm512_insertf32x8(_mm512_castps256_ps512(halves[0]), halves[1], 1);
        __m512 s = _mm512_mul_ps(_mm512_maskz_loadu_ps(msk, scale + 16 * v), _mm512_set1_ps(step));
        __m512 b = bias ? _mm512_maskz_loadu_ps(msk, bias + 16 * v) : _mm512_setzero_ps();
        finish_panel(total, s, b, y + 16 * v, msk, mode);
    }
}

/* Input 4q + t of a quad row, 16 columns: byte t of each int32 lane, sign-extended. */
static inline __m512 quad_input(__m512i z, int t) {
    return _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(z, 24 - 8 * t), 24));
}

/* 1-8 rows times panel `p`, float32 FMAs (the quads' weights extracted once for all rows). */
static inline __attribute__((always_inline)) void q4_panel(
    const int8_t *p, const float *x, int64_t n, int rows, const float *scale, const float *bias,
    float *y, int64_t m, int cols, int mode) {
    __m512 acc[8][VECS];
    for (int r = 0; r < 8; r++)
        for (int v = 0; v < VECS; v++) acc[r][v] = _mm512_setzero_ps();
    for (int64_t q = 0; 4 * q < n; q++) {
        const int8_t *w = p + q * QUAD;
        for (int line = 0; line < QUAD; line += 64)
            _mm_prefetch((const char *)w + PANEL_AHEAD + line, _MM_HINT_T1);
        __m512i z[VECS];
        for (int v = 0; v < VECS; v++) z[v] = _mm512_loadu_si512(w + 64 * v);
        for (int t = 0; t < 4 && 4 * q + t < n; t++) {
            __m512 wv[VECS];
            for (int v = 0; v < VECS; v++) wv[v] = quad_input(z[v], t);
            for (int r = 0; r < rows; r++) {
                __m512 xr = _mm512_set1_ps(x[r * n + 4 * q + t]);
                for (int v = 0; v < VECS; v++) acc[r][v] = _mm512_fmadd_ps(wv[v], xr, acc[r][v]);
            }
        }
    }
    for (int v = 0; v < VECS && 16 * v < cols; v++) {
        __mmask16 msk = tail_mask(cols - 16 * v);
        __m512 s = _mm512_maskz_loadu_ps(msk, scale + 16 * v);
        __m512 b = bias ? _mm512_maskz_loadu_ps(msk, bias + 16 * v) : _mm512_setzero_ps();
        for (int r = 0; r < rows; r++)
            finish_panel(acc[r][v], s, b, y + r * m + 16 * v, msk, mode);
    }
}

/* A quads panel as bf16 pairs for dot_rows: pair 2q + h holds inputs 4q + 2h and 4q + 2h + 1
 * (exact: |W| <= 127 has 7 significant bits). `out`: (n4 * 2) * PANEL words. */
static void quads_to_pairs(const int8_t *p, int64_t n4, uint32_t *out) {
    const __m512i top = _mm512_set1_epi32((int)0xFFFF0000u);
    for (int64_t q = 0; q < n4; q++)
        for (int v = 0; v < VECS; v++) {
            __m512i z = _mm512_loadu_si512(p + q * QUAD + 64 * v);
            for (int h = 0; h < 2; h++) {
                __m512i a = _mm512_castps_si512(quad_input(z, 2 * h));
                __m512i b = _mm512_castps_si512(quad_input(z, 2 * h + 1));
                __m512i pair = _mm512_or_si512(_mm512_srli_epi32(a, 16), _mm512_and_si512(b, top));
                _mm512_storeu_si512(out + (2 * q + h) * PANEL + 16 * v, pair);
            }
        }
}

/* Panel b of a quads matrix for `rows` rows of float32 x: one row through the digits
 * (`digits`: to_digits of x, `step` its step), more rows through q4_panel. */
static QV void quads_panel_b(const int8_t *p, const float *x, const uint32_t *digits, float step,
                             const float *scale, const float *bias, const int32_t *colsum,
                             float *y, int64_t m, int64_t n, int64_t rows, int64_t b, int mode) {
    int64_t o = b * PANEL, n4 = (n + 3) / 4;
    int cols = panel_cols(m, b);
    const int8_t *pb = p + b * n4 * QUAD;
    const float *s = scale + o, *bb = bias ? bias + o : 0;
    if (rows == 1) {
        q8_panel(pb, digits, n4, s, bb, colsum + o, step, y + o, cols, mode);
        return;
    }
#define Q4_CALL(k) q4_panel(pb, x + r * n, n, k, s, bb, y + r * m + o, m, cols, mode)
    EIGHT_AT_A_TIME(rows, Q4_CALL)
}

/* y = x W^T * scale + bias for a quads matrix W [m, n]. Prompts (`pairs`, where the CPU has
 * AVX512-BF16) convert each panel into bf16 pairs in a buffer of the thread's and run the
 * dot-product kernel with x rounded to bf16. Returns 0, or -1 where a buffer could not be
 * allocated. */
QV int panels_quads(const int8_t *p, const float *x, const float *scale, const float *bias,
                    const int32_t *colsum, float *y, int64_t m, int64_t n, int64_t rows,
                    int pairs, int threads) {
    int64_t count = (m + PANEL - 1) / PANEL, n4 = (n + 3) / 4, words = (n + 1) / 2;
    uint32_t *xs = 0;
    float step = 0;
    if (pairs) {
        xs = malloc((size_t)rows * words * sizeof(uint32_t));
        if (!xs) return -1;
        to_pairs(x, xs, rows, n);
    } else if (rows == 1) {
        xs = malloc((size_t)3 * n4 * sizeof(uint32_t));
        if (!xs) return -1;
        step = to_digits(x, n, xs);
    }
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : failed)
    {
        uint32_t *buffer = pairs ? malloc((size_t)2 * n4 * PANEL * sizeof(uint32_t)) : 0;
        failed = pairs && !buffer;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < count; b++) {
            if (!pairs) {
                quads_panel_b(p, x, xs, step, scale, bias, colsum, y, m, n, rows, b, STORE);
            } else if (buffer) {
                int64_t o = b * PANEL;
                quads_to_pairs(p + b * n4 * QUAD, n4, buffer);
                dot_rows(buffer, xs, words, rows, scale + o, bias ? bias + o : 0, y + o, m,
                         panel_cols(m, b), STORE);
            }
        }
        free(buffer);
    }
    free(xs);
    return failed ? -1 : 0;
}

/* ---- rows read back out of panels ----------------------------------------------------
 * Rows index[k] of an [m, n] matrix held in panels of kind `kind`, as float32 [count, n]: a
 * tied embedding's lookup (the matrix is held once, in the head's layout). Element (r, i)
 * is column r % PANEL of panel r / PANEL, so a row touches one cache line per input (one
 * per quad for int8): a few hundred lines, long evicted by the head's stream. Every line is
 * prefetched before the first is read, so the misses overlap; one after another through
 * torch's indexing, a decode step's lookup cost ~0.45 ms (gpt-neo-125M, int8). */
static inline float bf16_bits(uint32_t bits) {
    union { uint32_t u; float f; } v = {bits << 16};
    return v.f;
}

void panel_rows_f32(const void *panels, int kind, int64_t n, const int64_t *index,
                    int64_t count, float *out) {
    int64_t height = kind == KIND_PAIRS ? (n + 1) / 2 : kind == KIND_I8 ? (n + 3) / 4 : n;
    int64_t size = kind == KIND_BF16 ? 2 : 4; /* bytes of one element (a quad: 4 bytes) */
    for (int64_t k = 0; k < count; k++, out += n) {
        int64_t b = index[k] / PANEL, j = index[k] % PANEL;
        const char *p = (const char *)panels + ((b * height) * PANEL + j) * size;
        int64_t stride = PANEL * size;
        for (int64_t h = 0; h < height; h++) _mm_prefetch(p + h * stride, _MM_HINT_T0);
        for (int64_t h = 0; h < height; h++) {
            const char *e = p + h * stride;
            switch (kind) {
            case KIND_F32: out[h] = *(const float *)e; break;
            case KIND_BF16: out[h] = bf16_bits(*(const uint16_t *)e); break;
            case KIND_PAIRS: {
                uint32_t word = *(const uint32_t *)e;
                out[2 * h] = bf16_bits(word & 0xFFFF);
                if (2 * h + 1 < n) out[2 * h + 1] = bf16_bits(word >> 16);
                break;
            }
            default:
                for (int t = 0; t < 4 && 4 * h + t < n; t++) out[4 * h + t] = (float)((const int8_t *)e)[t];
            }
        }
    }
}

/* ---- the decode step: every block of the model for the new tokens of each row ----------
 * Each decoded token runs ~50 products and ~150 small ops (layer norms, attention, GELU,
 * adds); through torch those cost ~1.3 ms of a 4-7 ms token (125M shape, 2 threads), which
 * kept bf16 and int8 decoding far from memory speed. Here they run in one OpenMP region:
 * the products are the panel kernels above (bias, residual add and GELU in their
 * epilogues), the rest is a few microseconds of vector code between barriers.
 *
 * Activations and the KV cache are float32 (a bf16 matrix as pairs gets its input rounded
 * to bf16, as a bf16 model's is); row r of the batch is at step pos[r] (the rows of one
 * batch that started together share it; the scheduler's rows each have their own), with no
 * padding.
 * Attention is GPT-Neo's: unscaled scores, causal; a local layer sees the last `window`
 * steps, held in a ring of `capacity` slots (step t in slot t % capacity).
 */

typedef struct {
    const void *panels;
    const float *scale, *bias; /* scale: int8 only; either may be NULL */
    const int32_t *colsum;     /* int8 (quads) only */
    int64_t m, n, inputs;      /* outputs, panel rows (pairs: words; quads: unused), inputs */
    int64_t kind;
} Mat;

typedef struct {
    const float *ln1_w, *ln1_b, *ln2_w, *ln2_b;
    Mat qkv, out, fc, proj;
    int64_t window; /* 0: global */
} Layer;

/* The token embedding, read out of the tied head's panels (a row times its scale where int8),
 * and the position embeddings as float32 [positions, width]. */
typedef struct {
    const void *panels;
    const float *scale; /* int8 only, else NULL */
    int64_t kind, vocab;
    const float *wpe;
    int64_t places; /* rows of wpe */
} Embed;

/* x[k] = wte[ids[k]] * scale + wpe[pos[k / new] + k % new] for the step's tokens: the product
 * and the sum each rounded, as torch's two operations round them. Returns -1 (nothing
 * written) where an id or a position is outside its table. */
__attribute__((optimize("fp-contract=off"))) static int embed_tokens(
    const Embed *e, const int64_t *ids, int64_t rows, int64_t new, const int64_t *pos,
    int64_t width, float *x) {
    int64_t tokens = rows * new;
    for (int64_t k = 0; k < tokens; k++)
        if (ids[k] < 0 || ids[k] >= e->vocab) return -1;
    for (int64_t r = 0; r < rows; r++)
        if (pos[r] < 0 || pos[r] + new > e->places) return -1;
    panel_rows_f32(e->panels, (int)e->kind, width, ids, tokens, x);
    for (int64_t k = 0; k < tokens; k++) {
        float *xk = x + k * width;
        const float *p = e->wpe + (pos[k / new] + k % new) * width;
        float s = e->scale ? e->scale[ids[k]] : 1.0f;
        for (int64_t i = 0; i < width; i++) {
            float v = e->scale ? xk[i] * s : xk[i];
            xk[i] = v + p[i];
        }
    }
    return 0;
}

/* exp for float32 lanes: 2^k * p(r), r = x - k ln 2 (Cephes' expf polynomial, ~1 ulp). */
static inline __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, k);
}

static float sum512(const float *x, int64_t n, float shift, int squares) {
    __m512 acc = _mm512_setzero_ps(), c = _mm512_set1_ps(shift);
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        __m512 v = _mm512_maskz_sub_ps(m, _mm512_maskz_loadu_ps(m, x + i), c);
        acc = squares ? _mm512_fmadd_ps(v, v, acc) : _mm512_add_ps(acc, v);
    }
    return _mm512_reduce_add_ps(acc);
}

/* y = LayerNorm(x) for `rows` rows of width n (two passes: mean, then variance). */
static void layer_norm(const float *x, const float *w, const float *b, float *y, int64_t rows,
                       int64_t n, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float mean = sum512(xr, n, 0.0f, 0) / (float)n;
        float var = sum512(xr, n, mean, 1) / (float)n + eps;
        float rstd = 1.0f / _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(var)));
        __m512 mv = _mm512_set1_ps(mean), sv = _mm512_set1_ps(rstd);
        for (int64_t i = 0; i < n; i += 16) {
            __mmask16 m = tail_mask(n - i);
            __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, xr + i), mv), sv);
            v = _mm512_fmadd_ps(v, _mm512_maskz_loadu_ps(m, w + i), _mm512_maskz_loadu_ps(m, b + i));
            _mm512_mask_storeu_ps(y + r * n + i, m, v);
        }
    }
}

/* The items [start, end) of `count` (panels, attention's (row, head) pairs) that this thread
 * takes: contiguous runs, so that each thread streams one stretch of memory. */
static void my_share(int64_t count, int64_t *start, int64_t *end) {
    int t = omp_get_thread_num(), T = omp_get_num_threads();
    *start = count * t / T;
    *end = count * (t + 1) / T;
}

/* decode_step's barrier. OpenMP's would do, except that libgomp sleeps in the kernel after
 * ~1000 spins once more OpenMP threads exist than CPUs (a second thread running the model,
 * as a server's scheduler does, next to the main thread's idle pool), and a token crosses
 * ~130 barriers: the step ran 3x slower on such a thread. This one spins with a pause and
 * yields the CPU now and then, so a preempted thread still gets to arrive. */
typedef struct {
    atomic_int arrived, phase;
} Team;

typedef struct {
    Team *team;
    int phase, threads; /* this thread's count of barriers passed; the team's size */
} Member;

static void team_wait(Member *me) {
    if (me->threads == 1) return;
    int next = ++me->phase;
    Team *team = me->team;
    if (atomic_fetch_add_explicit(&team->arrived, 1, memory_order_acq_rel) == me->threads - 1) {
        atomic_store_explicit(&team->arrived, 0, memory_order_relaxed);
        atomic_store_explicit(&team->phase, next, memory_order_release);
        return;
    }
    for (int spins = 1; atomic_load_explicit(&team->phase, memory_order_acquire) != next; spins++) {
        _mm_pause();
        if (spins % 4096 == 0) sched_yield();
    }
}

#define NEXT_AHEAD 16384 /* bytes of the next matrix prefetched before a barrier */

/* Into L2, the first NEXT_AHEAD bytes of this thread's stretch of `w`: a matrix's stream
 * starts with DRAM latency and a cold hardware prefetcher, which the barriers between
 * products would otherwise expose 48 times a token (125M shape). */
static void prefetch_next(const Mat *w) {
    if (!w) return;
    int64_t count = (w->m + PANEL - 1) / PANEL, start, end;
    my_share(count, &start, &end);
    if (start >= end) return;
    int64_t size = w->kind == KIND_F32 || w->kind == KIND_PAIRS ? 4 : w->kind == KIND_BF16 ? 2 : 1;
    int64_t height = w->kind == KIND_I8 ? (w->inputs + 3) / 4 * 4 : w->n;
    const char *p = (const char *)w->panels + start * height * PANEL * size;
    for (int64_t b = 0; b < NEXT_AHEAD; b += 64) _mm_prefetch(p + b, _MM_HINT_T1);
}

/* y (mode: STORE, ADD, GELU) = x times w, the panels shared between the team's threads;
 * then the start of `next` (the matrix after it, or NULL) is prefetched. `pairs`: room for
 * x as bf16 pairs or as digits; `step`: a variable shared by the team; `quads`: NULL, or
 * (a prompt's int8 products, as panels_quads runs them) this thread's room for one quads
 * panel as bf16 pairs, x then going in as pairs too. */
static void product(const Mat *w, const float *x, int64_t rows, float *y, int mode,
                    uint32_t *pairs, float *step, uint32_t *quads, const Mat *next, Member *me) {
    int64_t count = (w->m + PANEL - 1) / PANEL, start, end;
    int first = omp_get_thread_num() == 0;
    int dots = w->kind == KIND_PAIRS || (w->kind == KIND_I8 && quads);
    if (dots) {
        if (first) to_pairs(x, pairs, rows, w->inputs);
        team_wait(me);
    } else if (w->kind == KIND_I8 && rows == 1) {
        if (first) *step = to_digits(x, w->inputs, pairs);
        team_wait(me);
    }
    my_share(count, &start, &end);
    for (int64_t b = start; b < end; b++) {
        switch (w->kind) {
        case KIND_F32: f32_panel_b(w->panels, x, w->scale, w->bias, y, w->m, w->n, rows, b, mode); break;
        case KIND_BF16: bf16_panel_b(w->panels, x, w->scale, w->bias, y, w->m, w->n, rows, b, mode); break;
        case KIND_I8:
            if (quads) {
                int64_t o = b * PANEL, n4 = (w->inputs + 3) / 4;
                quads_to_pairs((const int8_t *)w->panels + b * n4 * QUAD, n4, quads);
                dot_rows(quads, pairs, (w->inputs + 1) / 2, rows, w->scale + o,
                         w->bias ? w->bias + o : 0, y + o, w->m, panel_cols(w->m, b), mode);
            } else {
                quads_panel_b(w->panels, x, pairs, *step, w->scale, w->bias, w->colsum, y, w->m,
                              w->inputs, rows, b, mode);
            }
            break;
        default: pairs_panel_b(w->panels, pairs, w->bias, y, w->m, w->n, rows, b, mode);
        }
    }
    prefetch_next(next);
    team_wait(me);
}

static inline float dot64(const float *a, const float *b, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = tail_mask(n - i);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* Into L2, every line of `count` ring slots of `dim` floats from slot `first` on (the slots
 * of the visible steps: at most two runs, split where the ring wraps). The cache is read
 * once per token and long evicted by the weights; prefetched at the start of the attention
 * phase, its lines arrive in parallel instead of one dependent miss after another. */
static void prefetch_slots(const float *base, int64_t first, int64_t count, int64_t capacity,
                           int64_t dim) {
    while (count > 0) {
        int64_t run = capacity - first < count ? capacity - first : count;
        const char *p = (const char *)(base + first * dim), *end = p + run * dim * 4;
        for (; p < end; p += 64) _mm_prefetch(p, _MM_HINT_T1);
        _mm_prefetch(end - 1, _MM_HINT_T1);
        count -= run;
        first = 0;
    }
}

/* The visible steps of a query at `pos`: [first, pos]. */
static inline int64_t first_visible(int64_t pos, int64_t window) {
    return window && pos - window + 1 > 0 ? pos - window + 1 : 0;
}

/* Store one step's key and value (this head's slices) in its slot of the ring. */
static void store_step(const float *k, const float *v, float *keys, float *values,
                       int64_t capacity, int64_t pos, int64_t dim) {
    int64_t slot = pos % capacity;
    for (int64_t d = 0; d < dim; d++) {
        keys[slot * dim + d] = k[d];
        values[slot * dim + d] = v[d];
    }
}

/* Sixteen vectors -> one vector of their sixteen sums (lane j: the sum of a[j]): an add
 * tree that transposes as it goes, 45 shuffles and adds instead of sixteen horizontal
 * reductions of ~8 dependent steps each. */
static inline __m512 sum16(const __m512 *a) {
    __m512 r[8], s[4];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] */
        r[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                             _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* per lane: the four keys 4i..4i+3, each summed in the lane */
        s[i] = _mm512_add_ps(_mm512_shuffle_ps(r[2 * i], r[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(r[2 * i], r[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    /* then across the four lanes: lane i of the result is s[i]'s lanes added */
    __m512 u0 = _mm512_add_ps(_mm512_shuffle_f32x4(s[0], s[1], _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm512_shuffle_f32x4(s[0], s[1], _MM_SHUFFLE(3, 2, 3, 2)));
    __m512 u1 = _mm512_add_ps(_mm512_shuffle_f32x4(s[2], s[3], _MM_SHUFFLE(1, 0, 1, 0)),
                              _mm512_shuffle_f32x4(s[2], s[3], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(u0, u1, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* exp(scores - their largest) in place; returns 1 / their sum. */
static inline float softmax_exp(float *scores, int64_t count, float best) {
    __m512 total = _mm512_setzero_ps(), top = _mm512_set1_ps(best);
    for (int64_t t = 0; t < count; t += 16) {
        __mmask16 m = tail_mask(count - t);
        __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + t), top));
        e = _mm512_maskz_mov_ps(m, e);
        _mm512_mask_storeu_ps(scores + t, m, e);
        total = _mm512_add_ps(total, e);
    }
    return 1.0f / _mm512_reduce_add_ps(total);
}

/* One query of one head at step `pos` over the visible steps of its ring (stored), for a
 * head of up to 16 * NV floats held in NV vectors (NV a constant: the loops unroll and
 * the query and the output stay in registers). Scores go 16 keys at a time through
 * sum16; the values are added into two sets of accumulators (even and odd steps), so
 * consecutive FMAs do not wait on each other. Slots advance with a wrap, no division. */
static inline __attribute__((always_inline)) void attend_regs(
    const float *q, const float *keys, const float *values, int64_t capacity, int64_t window,
    int64_t pos, int64_t dim, float *scores, float *out, const int NV) {
    int64_t first = first_visible(pos, window), count = pos - first + 1, start = first % capacity;
    __mmask16 m[8];
    __m512 qv[8];
    for (int v = 0; v < NV; v++) {
        m[v] = dim > 16 * v ? tail_mask(dim - 16 * v) : 0;
        qv[v] = _mm512_maskz_loadu_ps(m[v], q + 16 * v);
    }
    __m512 best = _mm512_set1_ps(-INFINITY);
    int64_t slot = start;
    for (int64_t t = 0; t < count; t += 16) {
        int64_t n = count - t < 16 ? count - t : 16;
        __m512 acc[16];
        for (int j = 0; j < 16; j++) {
            acc[j] = _mm512_setzero_ps();
            if (j >= n) continue;
            const float *k = keys + slot * dim;
            for (int v = 0; v < NV; v++)
                acc[j] = _mm512_fmadd_ps(qv[v], _mm512_maskz_loadu_ps(m[v], k + 16 * v), acc[j]);
            slot = slot + 1 == capacity ? 0 : slot + 1;
        }
        __mmask16 keep = tail_mask(n);
        __m512 sums = sum16(acc);
        _mm512_mask_storeu_ps(scores + t, keep, sums);
        best = _mm512_mask_max_ps(best, keep, best, sums);
    }
    float norm = softmax_exp(scores, count, _mm512_reduce_max_ps(best));
    __m512 even[8], odd[8];
    for (int v = 0; v < NV; v++) even[v] = odd[v] = _mm512_setzero_ps();
    slot = start;
    int64_t t = 0;
    for (; t + 1 < count; t += 2) {
        const float *a = values + slot * dim;
        slot = slot + 1 == capacity ? 0 : slot + 1;
        const float *b = values + slot * dim;
        slot = slot + 1 == capacity ? 0 : slot + 1;
        __m512 pa = _mm512_set1_ps(scores[t]), pb = _mm512_set1_ps(scores[t + 1]);
        for (int v = 0; v < NV; v++) {
            even[v] = _mm512_fmadd_ps(pa, _mm512_maskz_loadu_ps(m[v], a + 16 * v), even[v]);
            odd[v] = _mm512_fmadd_ps(pb, _mm512_maskz_loadu_ps(m[v], b + 16 * v), odd[v]);
        }
    }
    if (t < count) {
        const float *a = values + slot * dim;
        __m512 pa = _mm512_set1_ps(scores[t]);
        for (int v = 0; v < NV; v++)
            even[v] = _mm512_fmadd_ps(pa, _mm512_maskz_loadu_ps(m[v], a + 16 * v), even[v]);
    }
    __m512 scale = _mm512_set1_ps(norm);
    for (int v = 0; v < NV; v++) {
        __m512 sum = _mm512_add_ps(even[v], odd[v]);
        _mm512_mask_storeu_ps(out + 16 * v, m[v], _mm512_mul_ps(sum, scale));
    }
}

/* One query of one head at step `pos` over the visible steps of its ring (stored): heads of
 * up to 128 floats in registers (attend_regs), wider ones through memory. */
static void attend_one(const float *q, const float *keys, const float *values, int64_t capacity,
                       int64_t window, int64_t pos, int64_t dim, float *scores, float *out) {
    if (dim <= 128) {
        int64_t c = capacity, w = window;
        if (dim <= 16) attend_regs(q, keys, values, c, w, pos, dim, scores, out, 1);
        else if (dim <= 32) attend_regs(q, keys, values, c, w, pos, dim, scores, out, 2);
        else if (dim <= 64) attend_regs(q, keys, values, c, w, pos, dim, scores, out, 4);
        else attend_regs(q, keys, values, c, w, pos, dim, scores, out, 8);
        return;
    }
    int64_t first = first_visible(pos, window), count = pos - first + 1;
    float best = -INFINITY;
    for (int64_t t = 0; t < count; t++) {
        scores[t] = dot64(q, keys + ((first + t) % capacity) * dim, dim);
        best = scores[t] > best ? scores[t] : best;
    }
    __m512 norm = _mm512_set1_ps(softmax_exp(scores, count, best));
    /* The values, read once in slot order. */
    for (int64_t d = 0; d < dim; d++) out[d] = 0.0f;
    for (int64_t t = 0; t < count; t++) {
        const float *row = values + ((first + t) % capacity) * dim;
        __m512 p = _mm512_set1_ps(scores[t]);
        for (int64_t d = 0; d < dim; d += 16) {
            __mmask16 m = tail_mask(dim - d);
            __m512 o = _mm512_maskz_loadu_ps(m, out + d);
            o = _mm512_fmadd_ps(p, _mm512_maskz_loadu_ps(m, row + d), o);
            _mm512_mask_storeu_ps(out + d, m, o);
        }
    }
    for (int64_t d = 0; d < dim; d += 16) {
        __mmask16 m = tail_mask(dim - d);
        _mm512_mask_storeu_ps(out + d, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, out + d), norm));
    }
}

/* The attention phase of layer l: (row, head) pairs split between the team's threads in
 * contiguous runs; each thread first prefetches the slots its pairs will read. */
static void attention(const float *qkv, float *keys, float *values, int64_t capacity,
                      int64_t window, const int64_t *pos, int64_t rows, int64_t new,
                      int64_t heads, int64_t dim, float *scores, float *att, Member *me) {
    int64_t width = heads * dim, start, end;
    my_share(rows * heads, &start, &end);
    /* What fits in half an L2 at most: past that, prefetched lines would evict each other
     * before use (a long context read twice); the rest streams in behind the reads. */
    int64_t budget = KV_PREFETCH / (2 * dim * (int64_t)sizeof(float));
    for (int64_t rh = start; rh < end && budget > 0; rh++) {
        int64_t p = pos[rh / heads];
        int64_t first = first_visible(p, window), count = p - first; /* stored before */
        count = count < budget ? count : budget;
        budget -= count;
        prefetch_slots(keys + rh * capacity * dim, first, count, capacity, dim);
        prefetch_slots(values + rh * capacity * dim, first, count, capacity, dim);
    }
    for (int64_t rh = start; rh < end; rh++) {
        int64_t r = rh / heads, head = rh % heads, at = rh * capacity * dim, p = pos[r];
        for (int64_t j = 0; j < new; j++) {
            const float *q = qkv + (r * new + j) * 3 * width + head * dim;
            store_step(q + width, q + 2 * width, keys + at, values + at, capacity, p + j, dim);
        }
        for (int64_t j = 0; j < new; j++) {
            int64_t token = r * new + j;
            attend_one(qkv + token * 3 * width + head * dim, keys + at, values + at, capacity,
                       window, p + j, dim, scores, att + token * width + head * dim);
        }
    }
    team_wait(me);
}

/* Every layer for `new` tokens of each of `rows` rows, row r at steps pos[r] .. pos[r] +
 * new - 1 (a decode step: one; a speculative verify: the drafts and one more; a short
 * prompt): x [rows * new, width] (the embeddings) becomes the final LayerNorm of the last
 * block's output. A local ring must not lose a key that a new step still sees: room for
 * the window and the new steps (capacity >= window + new - 1), or for every position so
 * far. keys[l]/values[l]: layer l's cache, [rows (or more: the first `rows` are used),
 * heads, capacity[l], dim] float32. `prompt`: the int8 products run as panels_quads runs
 * a prompt's (bf16 pairs, x rounded to bf16; only where the CPU has AVX512-BF16).
 * scratch: floats for the intermediates, tokens * (5 * width + inner + (max(width, inner)
 * + 1) / 2) + 3 * (max(width, inner) + 3) / 4 + threads * (the largest capacity + 2 *
 * PANEL * (max(width, inner) + 3) / 4) (`step_scratch`, tokens = rows * new). `head`: NULL,
 * or the (tied) head, whose width is `width` and whose outputs go to logits [tokens, head->m]
 * in the same parallel region: no second team to wake, no torch call after the stream.
 * `embed`: NULL (x holds the embeddings), or x is written from `ids` [tokens] first; `pos`
 * NULL: every row at step `at`. Returns 0; -1 for an id or a position outside its table
 * (the cache untouched); -2 where memory ran out. */
int64_t step_scratch(int64_t tokens, int64_t width, int64_t inner, int64_t capacity, int threads) {
    int64_t widest = width > inner ? width : inner;
    return tokens * (5 * width + inner + (widest + 1) / 2) + 3 * ((widest + 3) / 4) +
           threads * (capacity + 2 * PANEL * ((widest + 3) / 4));
}

int decode_step(const Layer *layers, int64_t count, float *const *keys, float *const *values,
                const int64_t *capacity, float *x, int64_t rows, int64_t new,
                const int64_t *pos, int64_t heads, int64_t dim, int64_t inner, float eps,
                const float *lnf_w, const float *lnf_b, float *scratch, int threads,
                int prompt, const Mat *head, float *logits, const Embed *embed,
                const int64_t *ids, int64_t at) {
    int64_t tokens = rows * new, width = heads * dim, most = 0;
    int64_t *own = 0; /* every row at step `at` where pos is NULL */
    if (!pos) {
        if (!(own = malloc((size_t)rows * sizeof(int64_t)))) return -2;
        for (int64_t r = 0; r < rows; r++) own[r] = at;
        pos = own;
    }
    if (embed && embed_tokens(embed, ids, rows, new, pos, width, x)) {
        free(own);
        return -1;
    }
    int64_t widest = width > inner ? width : inner;
    for (int64_t l = 0; l < count; l++) most = capacity[l] > most ? capacity[l] : most;
    float *h = scratch, *qkv = h + tokens * width, *att = qkv + 3 * tokens * width;
    float *f = att + tokens * width;
    uint32_t *pairs = (uint32_t *)(f + tokens * inner);
    float *scores = (float *)(pairs + tokens * ((widest + 1) / 2) + 3 * ((widest + 3) / 4));
    uint32_t *panel_pairs = (uint32_t *)(scores + threads * most);
    float step = 0; /* shared by the team: the digits' step of an int8 product */
    Team team = {0, 0};
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        Member me = {&team, 0, omp_get_num_threads()};
        int first = omp_get_thread_num() == 0;
        float *mine = scores + omp_get_thread_num() * most;
        uint32_t *quads =
            prompt ? panel_pairs + omp_get_thread_num() * 2 * PANEL * ((widest + 3) / 4) : 0;
        for (int64_t l = 0; l < count; l++) {
            const Layer *L = layers + l;
            if (first) layer_norm(x, L->ln1_w, L->ln1_b, h, tokens, width, eps);
            team_wait(&me);
            product(&L->qkv, h, tokens, qkv, STORE, pairs, &step, quads, &L->out, &me);
            attention(qkv, keys[l], values[l], capacity[l], L->window, pos, rows, new, heads,
                      dim, mine, att, &me);
            product(&L->out, att, tokens, x, ADD, pairs, &step, quads, &L->fc, &me);
            if (first) layer_norm(x, L->ln2_w, L->ln2_b, h, tokens, width, eps);
            team_wait(&me);
            product(&L->fc, h, tokens, f, GELU, pairs, &step, quads, &L->proj, &me);
            const Mat *next = l + 1 < count ? &L[1].qkv : head;
            product(&L->proj, f, tokens, x, ADD, pairs, &step, quads, next, &me);
        }
        if (first) layer_norm(x, lnf_w, lnf_b, x, tokens, width, eps);
        if (head) {
            team_wait(&me);
            product(head, x, tokens, logits, STORE, pairs, &step, quads, 0, &me);
        }
    }
    free(own);
    return 0;
}
