// GGUF weight types, dequantized in registers 32 values ("a unit") at a time. A row of any
// type is `k / 32` units; unit `u` covers columns `32u .. 32u + 32`. Type ids are ggml's.
#pragma once
#include "common.cuh"

enum : int {
    T_F32 = 0,
    T_F16 = 1,
    T_Q4_0 = 2,
    T_Q4_1 = 3,
    T_Q5_0 = 6,
    T_Q5_1 = 7,
    T_Q8_0 = 8,
    T_Q4_K = 12,
    T_Q5_K = 13,
    T_Q6_K = 14,
    T_BF16 = 30,
};

// (name, id) of every type the kernels take
#define KOJO_WEIGHT_TYPES(X) \
    X(f32, T_F32)            \
    X(f16, T_F16)            \
    X(bf16, T_BF16)          \
    X(q4_0, T_Q4_0)          \
    X(q4_1, T_Q4_1)          \
    X(q5_0, T_Q5_0)          \
    X(q5_1, T_Q5_1)          \
    X(q8_0, T_Q8_0)          \
    X(q4_k, T_Q4_K)          \
    X(q5_k, T_Q5_K)          \
    X(q6_k, T_Q6_K)

// the 6-bit scale and min of sub-block j of a Q4_K/Q5_K super-block
__device__ __forceinline__ void k4_scale_min(const u8* s, int j, float* sc, float* m) {
    if (j < 4) {
        *sc = (float)(s[j] & 63);
        *m = (float)(s[j + 4] & 63);
    } else {
        *sc = (float)((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4));
        *m = (float)((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
    }
}

// v[0..32] = columns 32u .. 32u + 32 of `row`
template <int TY>
__device__ __forceinline__ void dequant_unit(const u8* __restrict__ row, u32 u, float* v) {
    if (TY == T_F32) {
        const u8* p = row + (u64)u * 128;
        for (int i = 0; i < 32; i++) v[i] = __uint_as_float(load_u32(p + 4 * i));
    } else if (TY == T_F16) {
        const u8* p = row + (u64)u * 64;
        for (int i = 0; i < 32; i++) v[i] = load_f16(p + 2 * i);
    } else if (TY == T_BF16) {
        const u8* p = row + (u64)u * 64;
        for (int i = 0; i < 32; i++) v[i] = bf16_to_f32(load_u16(p + 2 * i));
    } else if (TY == T_Q4_0) {
        const u8* b = row + (u64)u * 18;
        float d = load_f16(b);
        for (int i = 0; i < 16; i++) {
            u8 q = b[2 + i];
            v[i] = ((int)(q & 0xF) - 8) * d;
            v[i + 16] = ((int)(q >> 4) - 8) * d;
        }
    } else if (TY == T_Q4_1) {
        const u8* b = row + (u64)u * 20;
        float d = load_f16(b), m = load_f16(b + 2);
        for (int i = 0; i < 16; i++) {
            u8 q = b[4 + i];
            v[i] = (q & 0xF) * d + m;
            v[i + 16] = (q >> 4) * d + m;
        }
    } else if (TY == T_Q5_0) {
        const u8* b = row + (u64)u * 22;
        float d = load_f16(b);
        u32 qh = load_u32(b + 2);
        for (int i = 0; i < 16; i++) {
            u8 q = b[6 + i];
            int lo = (q & 0xF) | (((qh >> i) & 1) << 4);
            int hi = (q >> 4) | (((qh >> (i + 16)) & 1) << 4);
            v[i] = (lo - 16) * d;
            v[i + 16] = (hi - 16) * d;
        }
    } else if (TY == T_Q5_1) {
        const u8* b = row + (u64)u * 24;
        float d = load_f16(b), m = load_f16(b + 2);
        u32 qh = load_u32(b + 4);
        for (int i = 0; i < 16; i++) {
            u8 q = b[8 + i];
            int lo = (q & 0xF) | (((qh >> i) & 1) << 4);
            int hi = (q >> 4) | (((qh >> (i + 16)) & 1) << 4);
            v[i] = lo * d + m;
            v[i + 16] = hi * d + m;
        }
    } else if (TY == T_Q8_0) {
        const u8* b = row + (u64)u * 34;
        float d = load_f16(b);
        for (int i = 0; i < 32; i++) v[i] = (float)(i8)b[2 + i] * d;
    } else if (TY == T_Q4_K || TY == T_Q5_K) {
        // super-block of 256: d, dmin, scales[12], (Q5_K: qh[32]), qs[128]
        const u32 bytes = TY == T_Q4_K ? 144 : 176;
        const u8* b = row + (u64)(u / 8) * bytes;
        int j = u % 8;
        float sc, mn;
        k4_scale_min(b + 4, j, &sc, &mn);
        float d = load_f16(b) * sc, m = load_f16(b + 2) * mn;
        const u8* qs = b + (TY == T_Q4_K ? 16 : 48) + 32 * (j / 2);
        int shift = 4 * (j % 2);
        for (int i = 0; i < 32; i++) {
            int q = (qs[i] >> shift) & 0xF;
            if (TY == T_Q5_K) q |= ((b[16 + i] >> j) & 1) << 4;
            v[i] = d * q - m;
        }
    } else if (TY == T_Q6_K) {
        // super-block of 256: ql[128], qh[64], scales[16] (i8), d
        const u8* b = row + (u64)(u / 8) * 210;
        int j = u % 8, half = j / 4, part = j % 4;
        float d = load_f16(b + 208);
        const u8* ql = b + 64 * half + 32 * (part % 2);
        const u8* qh = b + 128 + 32 * half;
        const i8* sc = (const i8*)(b + 192) + 8 * half + 2 * part;
        int lshift = 4 * (part / 2), hshift = 2 * part;
        for (int i = 0; i < 32; i++) {
            int q = ((ql[i] >> lshift) & 0xF) | (((qh[i] >> hshift) & 3) << 4);
            v[i] = d * sc[i / 16] * (q - 32);
        }
    }
}

// f16 or bf16 bits to f32
template <int TY>
__device__ __forceinline__ float half_bits(u32 h) {
    return TY == T_BF16 ? bf16_to_f32((u16)h) : kojo_h2f((u16)h);
}

// v[0..8] = columns 8c .. 8c + 8 of `row` (a "chunk"), with the widest loads each type's
// alignment allows: a row starts 16-byte aligned (the device allocation is; rows are whole
// blocks of 32 values, and every K-quant super-block but Q6_K's is a multiple of 16 bytes).
// Lanes taking consecutive chunks read consecutive bytes.
template <int TY>
__device__ __forceinline__ void dequant8(const u8* __restrict__ row, u32 c, float* v) {
    if (TY == T_F32) {
        load_f32x8(reinterpret_cast<const float*>(row) + (u64)c * 8, v);
    } else if (TY == T_F16 || TY == T_BF16) {
        u32 w[4];
        load_words<16>(row + (u64)c * 16, w);
        for (int i = 0; i < 4; i++) {
            v[2 * i] = half_bits<TY>(w[i] & 0xFFFF);
            v[2 * i + 1] = half_bits<TY>(w[i] >> 16);
        }
    } else if (TY == T_Q8_0) {
        // block of 34: d, qs[32]; 2-byte aligned
        const u8* b = row + (u64)(c / 4) * 34;
        float d = kojo_h2f((u16)load_u16a(b));
        const u8* q = b + 2 + 8 * (c % 4);
        for (int i = 0; i < 4; i++) {
            u32 h = load_u16a(q + 2 * i);
            v[2 * i] = (float)(i8)(h & 0xFF) * d;
            v[2 * i + 1] = (float)(i8)(h >> 8) * d;
        }
    } else if (TY == T_Q4_0 || TY == T_Q5_0) {
        // Q4_0: d, qs[16] (18 bytes); Q5_0: d, qh[4], qs[16] (22 bytes); 2-byte aligned.
        // values 0..15 are the low nibbles of qs, 16..31 the high ones
        const u32 bytes = TY == T_Q4_0 ? 18 : 22;
        const u8* b = row + (u64)(c / 4) * bytes;
        u32 p = c % 4;
        float d = kojo_h2f((u16)load_u16a(b));
        u32 qh = TY == T_Q5_0 ? load_u16a(b + 2) | (load_u16a(b + 4) << 16) : 0;
        const u8* q = b + (TY == T_Q4_0 ? 2 : 6) + 8 * (p % 2);
        u32 shift = 4 * (p / 2);
        for (int i = 0; i < 4; i++) {
            u32 h = load_u16a(q + 2 * i);
            for (int e = 0; e < 2; e++) {
                int x = (int)(((e ? h >> 8 : h) >> shift) & 0xF);
                if (TY == T_Q5_0) x |= (int)((qh >> (8 * p + 2 * i + e)) & 1) << 4;
                v[2 * i + e] = (float)(x - (TY == T_Q4_0 ? 8 : 16)) * d;
            }
        }
    } else if (TY == T_Q4_1 || TY == T_Q5_1) {
        // Q4_1: d, m, qs[16] (20 bytes); Q5_1: d, m, qh[4], qs[16] (24 bytes); 4-byte aligned
        const u32 bytes = TY == T_Q4_1 ? 20 : 24;
        const u8* b = row + (u64)(c / 4) * bytes;
        u32 p = c % 4;
        u32 dm = load_u32a(b);
        float d = kojo_h2f((u16)(dm & 0xFFFF)), m = kojo_h2f((u16)(dm >> 16));
        u32 qh = TY == T_Q5_1 ? load_u32a(b + 4) : 0;
        const u8* q = b + (TY == T_Q4_1 ? 4 : 8) + 8 * (p % 2);
        u32 w[2] = {load_u32a(q), load_u32a(q + 4)};
        u32 shift = 4 * (p / 2);
        for (int i = 0; i < 8; i++) {
            int x = (int)((w[i / 4] >> (8 * (i % 4) + shift)) & 0xF);
            if (TY == T_Q5_1) x |= (int)((qh >> (8 * p + i)) & 1) << 4;
            v[i] = (float)x * d + m;
        }
    } else if (TY == T_Q4_K || TY == T_Q5_K) {
        // super-block of 256 (144 / 176 bytes, 16-byte multiples): d, dmin, scales[12],
        // (Q5_K: qh[32]), qs[128]. Unit j of 32 values: nibble j % 2 of qs[32 (j / 2) ..]
        const u32 bytes = TY == T_Q4_K ? 144 : 176;
        const u8* b = row + (u64)(c / 32) * bytes;
        u32 j = (c % 32) / 4, p = c % 4;
        u32 dm = load_u32a(b);
        float sc, mn;
        k4_scale_min(b + 4, (int)j, &sc, &mn);
        float d = kojo_h2f((u16)(dm & 0xFFFF)) * sc, m = kojo_h2f((u16)(dm >> 16)) * mn;
        u32 q[2], h[2] = {0, 0};
        load_words<8>(b + (TY == T_Q4_K ? 16 : 48) + 32 * (j / 2) + 8 * p, q);
        if (TY == T_Q5_K) load_words<8>(b + 16 + 8 * p, h);
        u32 shift = 4 * (j % 2);
        for (int i = 0; i < 8; i++) {
            int x = (int)((q[i / 4] >> (8 * (i % 4) + shift)) & 0xF);
            if (TY == T_Q5_K) x |= (int)((h[i / 4] >> (8 * (i % 4) + j)) & 1) << 4;
            v[i] = d * (float)x - m;
        }
    } else if (TY == T_Q6_K) {
        // super-block of 256 (210 bytes, 2-byte aligned): ql[128], qh[64], scales[16] (i8), d
        const u8* b = row + (u64)(c / 32) * 210;
        u32 j = (c % 32) / 4, p = c % 4, half = j / 4, part = j % 4;
        float d = kojo_h2f((u16)load_u16a(b + 208));
        float s = d * (float)(i8)b[192 + 8 * half + 2 * part + p / 2];
        const u8* ql = b + 64 * half + 32 * (part % 2) + 8 * p;
        const u8* qh = b + 128 + 32 * half + 8 * p;
        u32 lshift = 4 * (part / 2), hshift = 2 * part;
        for (int i = 0; i < 4; i++) {
            u32 l = load_u16a(ql + 2 * i), hb = load_u16a(qh + 2 * i);
            for (int e = 0; e < 2; e++) {
                int x = (int)((((e ? l >> 8 : l) >> lshift) & 0xF) | ((((e ? hb >> 8 : hb) >> hshift) & 3) << 4));
                v[2 * i + e] = s * (float)(x - 32);
            }
        }
    }
}
