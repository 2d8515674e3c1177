// ActSparseMatMul for OpenVINO's GPU plugin (docs/op.md, "GPU"): y = z'W + bias, z = x - m, z' pruned where
// |z| <= tau on a decode call (one row) and on a prefill call when prefill = "sparse".
//
// Built by the plugin with its per-tensor macros (INPUTn_DIMS, INPUTn_TYPE, INPUTn_OFFSET, OUTPUT0_...) and the
// Define elements of actsparse_gpu.xml (ASP_* = the node's attributes, as the plugin's attribute visitor prints
// them). Weights and params are read exactly as the CPU op receives them: packed tiles of u8 bytes (f32 for
// weight_format f32), f32 params or compact u4 params as u8 bytes.

#define ASP_CAT_(a, b) a##b
#define ASP_CAT(a, b) ASP_CAT_(a, b)

// the plugin prints a +inf threshold as std::to_string does: "inf"
#define inf INFINITY

// element types the plugin names in INPUTn_TYPE, as numbers the preprocessor can compare
#define ASP_T_float 0
#define ASP_T_half 1
#define ASP_T_uchar 2
#define ASP_TYPE(T) ASP_CAT(ASP_T_, T)

// weight_format and prefill arrive as bare words
#define ASP_F_f32 0
#define ASP_F_f16 1
#define ASP_F_u8 2
#define ASP_F_u4 3
#define ASP_F_bf16 4
#define ASP_FMT ASP_CAT(ASP_F_, ASP_WEIGHT_FORMAT)
#define ASP_P_dense 0
#define ASP_P_sparse 1
#define ASP_PREFILL_SPARSE ASP_CAT(ASP_P_, ASP_PREFILL)

#define ASP_WG 64                // work-items per group: the XML's WorkSizes local
#define ASP_BLOCK (2 * ASP_WG)   // output columns per group: two adjacent columns per work-item
#define ASP_PER_ITEM 8           // decode: channels each work-item screens per chunk
#define ASP_CHUNK (ASP_PER_ITEM * ASP_WG)
#define ASP_TM 8                 // prefill: rows per tile
#define ASP_TK 32                // prefill: channels per step

// float or half buffers (half through vload_half/vstore_half: no cl_khr_fp16 needed)
#if ASP_TYPE(INPUT0_TYPE) == 1
#define X_AT(i) vload_half(INPUT0_OFFSET + (i), x)
#else
#define X_AT(i) x[INPUT0_OFFSET + (i)]
#endif
#if ASP_TYPE(OUTPUT0_TYPE) == 1
#define Y_SET(i, v) vstore_half((v), OUTPUT0_OFFSET + (i), y)
#else
#define Y_SET(i, v) (y[OUTPUT0_OFFSET + (i)] = (v))
#endif
#if ASP_TYPE(INPUT1_TYPE) == 1
#define W_AT(i) vload_half(INPUT1_OFFSET + (i), w)
#define W_AT2(i) vload_half2(0, w + INPUT1_OFFSET + (i))
#else
#define W_AT(i) convert_float(w[INPUT1_OFFSET + (i)])
#define W_AT2(i) convert_float2(vload2(0, w + INPUT1_OFFSET + (i)))
#endif
#define ASP_COMPACT (ASP_TYPE(INPUT2_TYPE) == 2)
#if ASP_TYPE(INPUT2_TYPE) == 1
#define P_AT(i) vload_half(INPUT2_OFFSET + (i), params)
#else
#define P_AT(i) convert_float(params[INPUT2_OFFSET + (i)])
#endif

#define ASP_PROD(D) ((long)(D)[0] * (D)[1] * (D)[2] * (D)[3])
#define ASP_N ((long)ASP_OUT_FEATURES)
#if ASP_FMT == ASP_F_u4
#define ASP_ROW_UNITS ((ASP_N + 1) / 2)   // bytes per row of all N columns
#else
#define ASP_ROW_UNITS ASP_N               // elements (f32, f16/bf16 pairs of bytes, u8 bytes)
#endif
// K from the weight's size (rank-free: the plugin's DIMS do not say x's rank)
#if ASP_FMT == ASP_F_f16 || ASP_FMT == ASP_F_bf16
#define ASP_K (ASP_PROD(INPUT1_DIMS) / (2 * ASP_ROW_UNITS))
#else
#define ASP_K (ASP_PROD(INPUT1_DIMS) / ASP_ROW_UNITS)
#endif
#define ASP_S (ASP_FMT == ASP_F_u4 ? ASP_K / ASP_GROUP_SIZE * ASP_N : ASP_N)  // scales (u8/u4)
#define ASP_BIAS_AT (ASP_HAS_BIAS ? ASP_N : 0)                                // f32 params: first scale

// Where column n (even) of row k starts, and the row stride, in the units W_AT/weight_pair index.
typedef struct { long base; long stride; } asp_column;

inline asp_column asp_locate(long n) {
    const long t = n / ASP_TILE_COLS, c = n - t * ASP_TILE_COLS;
    const long width = min((long)ASP_TILE_COLS, ASP_N - t * ASP_TILE_COLS);
    asp_column col;
#if ASP_FMT == ASP_F_u4
    col.base = ASP_K * t * (ASP_TILE_COLS / 2) + c / 2;
    col.stride = (width + 1) / 2;
#else
    col.base = ASP_K * t * ASP_TILE_COLS + c;
    col.stride = width;
#endif
    return col;
}

inline float asp_scale(const __global INPUT2_TYPE* params, long s) {
#if ASP_COMPACT
    return vload_half(s, (const __global half*)(params + INPUT2_OFFSET + 4 * ASP_BIAS_AT));
#else
    return P_AT(ASP_BIAS_AT + s);
#endif
}

inline float asp_zero_point(const __global INPUT2_TYPE* params, long s) {
#if ASP_COMPACT
    return convert_float(params[INPUT2_OFFSET + 4 * ASP_BIAS_AT + 2 * ASP_S + s]);
#else
    return P_AT(ASP_BIAS_AT + ASP_S + s);
#endif
}

inline float asp_bias(const __global INPUT2_TYPE* params, long n) {
#if ASP_COMPACT
    return ((const __global float*)(params + INPUT2_OFFSET))[n];
#else
    return P_AT(n);
#endif
}

// Columns n, n + 1 of row k as stored (codes for u8/u4, values otherwise); `pair`: n + 1 < N.
inline float2 asp_raw(const __global INPUT1_TYPE* w, asp_column col, long k, bool pair) {
    const long i = col.base + k * col.stride;
#if ASP_FMT == ASP_F_f32
    return pair ? W_AT2(i) : (float2)(W_AT(i), 0.f);
#elif ASP_FMT == ASP_F_f16
    const __global half* h = (const __global half*)(w + INPUT1_OFFSET);
    return pair ? vload_half2(0, h + i) : (float2)(vload_half(i, h), 0.f);
#elif ASP_FMT == ASP_F_bf16
    const __global ushort* b = (const __global ushort*)(w + INPUT1_OFFSET);
    const uint2 bits = pair ? convert_uint2(vload2(0, b + i)) : (uint2)((uint)b[i], 0u);
    return as_float2(bits << 16);
#elif ASP_FMT == ASP_F_u8
    return pair ? convert_float2(vload2(0, w + INPUT1_OFFSET + i)) : (float2)(convert_float(w[INPUT1_OFFSET + i]), 0.f);
#else
    const uchar byte = w[INPUT1_OFFSET + i];  // even column in the low nibble
    return (float2)(convert_float(byte & 15), convert_float(byte >> 4));
#endif
}

// Dequantisation of columns n, n + 1 for the scale group of row k; cached across rows of one group.
typedef struct { float2 scale; float2 zero; long group; } asp_dequant;

inline void asp_dequant_at(const __global INPUT2_TYPE* params, asp_dequant* d, long n, long k, bool pair) {
#if ASP_FMT == ASP_F_u8 || ASP_FMT == ASP_F_u4
#if ASP_FMT == ASP_F_u4
    const long g = k / ASP_GROUP_SIZE;
#else
    const long g = 0;
#endif
    if (g == d->group) return;
    d->group = g;
    const long s = g * ASP_N + n;
    d->scale = (float2)(asp_scale(params, s), pair ? asp_scale(params, s + 1) : 0.f);
    d->zero = (float2)(asp_zero_point(params, s), pair ? asp_zero_point(params, s + 1) : 0.f);
#endif
}

inline float2 asp_weight(const __global INPUT1_TYPE* w, const __global INPUT2_TYPE* params, asp_dequant* d,
                         asp_column col, long n, long k, bool pair) {
    const float2 raw = asp_raw(w, col, k, pair);
#if ASP_FMT == ASP_F_u8 || ASP_FMT == ASP_F_u4
    asp_dequant_at(params, d, n, k, pair);
    return (raw - d->zero) * d->scale;
#else
    return raw;
#endif
}

inline void asp_store(__global OUTPUT0_TYPE* y, const __global INPUT2_TYPE* params, long row, long n, float2 acc) {
    if (ASP_HAS_BIAS) {
        acc.x += asp_bias(params, n);
        if (n + 1 < ASP_N) acc.y += asp_bias(params, n + 1);
    }
    Y_SET(row * ASP_N + n, acc.x);
    if (n + 1 < ASP_N) Y_SET(row * ASP_N + n + 1, acc.y);
}

// kept: not (|z| <= tau), so NaN is kept
#define ASP_KEPT(z) (!(fabs(z) <= (float)(ASP_THRESHOLD)))

// Decode (one row): per chunk of channels, the group lists the live ones in local memory (prefix sum of
// per-item counts), then each work-item accumulates its two columns over that list.
inline void asp_decode(const __global INPUT0_TYPE* x, const __global INPUT1_TYPE* w,
                       const __global INPUT2_TYPE* params, __global OUTPUT0_TYPE* y,
                       __local int* live_k, __local float* live_z, __local int* offsets) {
    const int lid = get_local_id(0);
    const long blocks = (ASP_N + ASP_BLOCK - 1) / ASP_BLOCK;
    for (long block = get_group_id(0); block < blocks; block += get_num_groups(0)) {
        const long n = block * ASP_BLOCK + 2 * lid;
        const bool mine = n < ASP_N, pair = n + 1 < ASP_N;
        const asp_column col = asp_locate(mine ? n : 0);
        asp_dequant d = {(float2)(0.f), (float2)(0.f), -1};
        float2 acc = (float2)(0.f);
        for (long k0 = 0; k0 < ASP_K; k0 += ASP_CHUNK) {
            float z[ASP_PER_ITEM];
            int count = 0;
            for (int j = 0; j < ASP_PER_ITEM; ++j) {
                const long k = k0 + lid * ASP_PER_ITEM + j;
                z[j] = k < ASP_K ? X_AT(k) - (float)(ASP_MODE) : 0.f;
                count += k < ASP_K && ASP_KEPT(z[j]);
            }
            offsets[lid] = count;
            barrier(CLK_LOCAL_MEM_FENCE);
            for (int step = 1; step < ASP_WG; step *= 2) {  // inclusive scan (Hillis-Steele)
                const int add = lid >= step ? offsets[lid - step] : 0;
                barrier(CLK_LOCAL_MEM_FENCE);
                offsets[lid] += add;
                barrier(CLK_LOCAL_MEM_FENCE);
            }
            int at = offsets[lid] - count;
            for (int j = 0; j < ASP_PER_ITEM; ++j) {
                const long k = k0 + lid * ASP_PER_ITEM + j;
                if (k < ASP_K && ASP_KEPT(z[j])) {
                    live_k[at] = (int)(k - k0);
                    live_z[at++] = z[j];
                }
            }
            const int live = offsets[ASP_WG - 1];
            barrier(CLK_LOCAL_MEM_FENCE);
            if (mine)
                for (int i = 0; i < live; ++i)
                    acc += live_z[i] * asp_weight(w, params, &d, col, n, k0 + live_k[i], pair);
            barrier(CLK_LOCAL_MEM_FENCE);
        }
        if (mine) asp_store(y, params, 0, n, acc);
    }
}

// Prefill (several rows): tiles of ASP_TM rows x ASP_BLOCK columns; z (pruned only when prefill = "sparse")
// goes through local memory ASP_TK channels at a time, each weight pair is read once per tile.
inline void asp_prefill(const __global INPUT0_TYPE* x, const __global INPUT1_TYPE* w,
                        const __global INPUT2_TYPE* params, __global OUTPUT0_TYPE* y, long rows,
                        __local float (*zt)[ASP_TK]) {
    const int lid = get_local_id(0);
    const long blocks = (ASP_N + ASP_BLOCK - 1) / ASP_BLOCK, tiles = (rows + ASP_TM - 1) / ASP_TM * blocks;
    for (long tile = get_group_id(0); tile < tiles; tile += get_num_groups(0)) {
        const long r0 = tile / blocks * ASP_TM, n = tile % blocks * ASP_BLOCK + 2 * lid;
        const bool mine = n < ASP_N, pair = n + 1 < ASP_N;
        const asp_column col = asp_locate(mine ? n : 0);
        asp_dequant d = {(float2)(0.f), (float2)(0.f), -1};
        float2 acc[ASP_TM];
        for (int r = 0; r < ASP_TM; ++r) acc[r] = (float2)(0.f);
        for (long k0 = 0; k0 < ASP_K; k0 += ASP_TK) {
            for (int e = lid; e < ASP_TM * ASP_TK; e += ASP_WG) {
                const long r = r0 + e / ASP_TK, k = k0 + e % ASP_TK;
                float z = r < rows && k < ASP_K ? X_AT(r * ASP_K + k) - (float)(ASP_MODE) : 0.f;
                if (ASP_PREFILL_SPARSE && !ASP_KEPT(z)) z = 0.f;
                zt[e / ASP_TK][e % ASP_TK] = z;
            }
            barrier(CLK_LOCAL_MEM_FENCE);
            const int steps = (int)min((long)ASP_TK, ASP_K - k0);
            if (mine)
                for (int kk = 0; kk < steps; ++kk) {
                    const float2 wv = asp_weight(w, params, &d, col, n, k0 + kk, pair);
                    for (int r = 0; r < ASP_TM; ++r) acc[r] += zt[r][kk] * wv;
                }
            barrier(CLK_LOCAL_MEM_FENCE);
        }
        if (mine)
            for (int r = 0; r < ASP_TM && r0 + r < rows; ++r) asp_store(y, params, r0 + r, n, acc[r]);
    }
}

__kernel __attribute__((reqd_work_group_size(ASP_WG, 1, 1)))
void actsparse_matmul(const __global INPUT0_TYPE* x, const __global INPUT1_TYPE* w,
                      const __global INPUT2_TYPE* params, __global OUTPUT0_TYPE* y) {
    // local memory lives at kernel scope (OpenCL C 1.2)
    __local int live_k[ASP_CHUNK], offsets[ASP_WG];
    __local float live_z[ASP_CHUNK], zt[ASP_TM][ASP_TK];
    const long rows = ASP_PROD(INPUT0_DIMS) / ASP_K;
    if (rows == 1)
        asp_decode(x, w, params, y, live_k, live_z, offsets);
    else
        asp_prefill(x, w, params, y, rows, zt);
}
