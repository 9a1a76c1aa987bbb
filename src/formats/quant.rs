//! ggml tensor types: block layouts and reference dequantizers to f32.
//!
//! Each quantized type stores a row as consecutive blocks of `block_size()` weights in
//! `type_size()` bytes. The layouts (little-endian, packed, no padding) are:
//!
//! | type | weights | bytes | layout |
//! |------|---------|-------|--------|
//! | Q4_0 | 32  | 18  | `d: f16, qs: [u8; 16]` (low nibbles = weights 0..16, high = 16..32), w = d·(q−8) |
//! | Q4_1 | 32  | 20  | `d: f16, m: f16, qs: [u8; 16]`, w = d·q + m |
//! | Q5_0 | 32  | 22  | `d: f16, qh: u32, qs: [u8; 16]` (bit i of qh = 5th bit of weight i), w = d·(q−16) |
//! | Q5_1 | 32  | 24  | `d: f16, m: f16, qh: u32, qs: [u8; 16]`, w = d·q + m |
//! | Q8_0 | 32  | 34  | `d: f16, qs: [i8; 32]`, w = d·q |
//! | Q2_K | 256 | 84  | `scales: [u8; 16] (lo nibble scale, hi nibble min), qs: [u8; 64], d: f16, dmin: f16` |
//! | Q3_K | 256 | 110 | `hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12] (16 × 6-bit), d: f16` |
//! | Q4_K | 256 | 144 | `d: f16, dmin: f16, scales: [u8; 12] (8 × 6-bit scale + 8 × 6-bit min), qs: [u8; 128]` |
//! | Q5_K | 256 | 176 | `d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]` |
//! | Q6_K | 256 | 210 | `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16` |
//!
//! The dequantizers are the reference (plain scalar code, one f32 multiply and one add or
//! subtract per weight, in the same order as ggml and the `gguf` Python package) and are tested
//! bit-exact against that package. Fast kernels live in the backends.

use half::{bf16, f16};

/// A ggml tensor type id as stored in GGUF. Unknown ids are kept, not rejected: a tensor of an
/// unknown type is an error only when it is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    /// A type id kojo cannot dequantize (including ggml types it knows the name of).
    Other(u32),
}

pub const QK: usize = 32;
pub const QK_K: usize = 256;

impl GgmlType {
    pub fn from_id(id: u32) -> Self {
        match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2K,
            11 => Self::Q3K,
            12 => Self::Q4K,
            13 => Self::Q5K,
            14 => Self::Q6K,
            30 => Self::BF16,
            other => Self::Other(other),
        }
    }

    pub fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q4_1 => 3,
            Self::Q5_0 => 6,
            Self::Q5_1 => 7,
            Self::Q8_0 => 8,
            Self::Q2K => 10,
            Self::Q3K => 11,
            Self::Q4K => 12,
            Self::Q5K => 13,
            Self::Q6K => 14,
            Self::BF16 => 30,
            Self::Other(id) => id,
        }
    }

    /// Every type kojo dequantizes.
    pub const SUPPORTED: [GgmlType; 13] = [
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q2K,
        Self::Q3K,
        Self::Q4K,
        Self::Q5K,
        Self::Q6K,
    ];

    pub fn name(self) -> String {
        let known = match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q2K => "Q2_K",
            Self::Q3K => "Q3_K",
            Self::Q4K => "Q4_K",
            Self::Q5K => "Q5_K",
            Self::Q6K => "Q6_K",
            Self::Other(id) => {
                let name = match id {
                    9 => "Q8_1",
                    15 => "Q8_K",
                    16 => "IQ2_XXS",
                    17 => "IQ2_XS",
                    18 => "IQ3_XXS",
                    19 => "IQ1_S",
                    20 => "IQ4_NL",
                    21 => "IQ3_S",
                    22 => "IQ2_S",
                    23 => "IQ4_XS",
                    24 => "I8",
                    25 => "I16",
                    26 => "I32",
                    27 => "I64",
                    28 => "F64",
                    29 => "IQ1_M",
                    34 => "TQ1_0",
                    35 => "TQ2_0",
                    39 => "MXFP4",
                    _ => return format!("unknown type {id}"),
                };
                return format!("{name} (unsupported)");
            }
        };
        known.to_string()
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::SUPPORTED
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
    }

    pub fn is_supported(self) -> bool {
        !matches!(self, Self::Other(_))
    }

    /// Weights per block (1 for plain float types); `None` for unsupported types.
    pub fn block_size(self) -> Option<usize> {
        Some(match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 => QK,
            Self::Q2K | Self::Q3K | Self::Q4K | Self::Q5K | Self::Q6K => QK_K,
            Self::Other(_) => return None,
        })
    }

    /// Bytes per block; `None` for unsupported types.
    pub fn type_size(self) -> Option<usize> {
        Some(match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q2K => 84,
            Self::Q3K => 110,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
            Self::Other(_) => return None,
        })
    }

    /// Bytes needed for `n` weights, or why that count is invalid for this type.
    pub fn bytes_for(self, n: u64) -> Result<u64, String> {
        let (bs, ts) = match (self.block_size(), self.type_size()) {
            (Some(b), Some(t)) => (b as u64, t as u64),
            _ => return Err(format!("tensor type {} is not supported", self.name())),
        };
        if n % bs != 0 {
            return Err(format!(
                "{n} weights is not a multiple of the {} block size {bs}",
                self.name()
            ));
        }
        (n / bs)
            .checked_mul(ts)
            .ok_or_else(|| format!("{n} weights of {} overflow u64 bytes", self.name()))
    }
}

/// Why a dequantization could not run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DequantError(pub String);

impl std::fmt::Display for DequantError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for DequantError {}

#[inline]
fn h(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// Dequantize `data` (whole blocks of type `ty`) into `out` (`out.len()` weights).
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<(), DequantError> {
    let need = ty.bytes_for(out.len() as u64).map_err(DequantError)?;
    if data.len() as u64 != need {
        return Err(DequantError(format!(
            "{} weights of {} need {need} bytes, got {}",
            out.len(),
            ty.name(),
            data.len()
        )));
    }
    let (bs, ts) = (ty.block_size().unwrap_or(1), ty.type_size().unwrap_or(1));
    let blocks = data.chunks_exact(ts).zip(out.chunks_exact_mut(bs));
    match ty {
        GgmlType::F32 => {
            blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        GgmlType::F16 => blocks.for_each(|(b, y)| y[0] = h(b, 0)),
        GgmlType::BF16 => blocks
            .for_each(|(b, y)| y[0] = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()),
        GgmlType::Other(_) => unreachable!("bytes_for rejects unsupported types"),
        _ => {
            let mut u = Unpacked::default();
            for (b, y) in blocks {
                unpack_block(ty, b, &mut u);
                u.dequantize(y);
            }
        }
    }
    Ok(())
}

/// Dequantize to a new vector of `n` weights.
pub fn dequantize_to_vec(ty: GgmlType, data: &[u8], n: usize) -> Result<Vec<f32>, DequantError> {
    let mut out = vec![0f32; n];
    dequantize(ty, data, &mut out)?;
    Ok(out)
}

/// Weights per scale group in [`Unpacked`]: every quantized type's groups are a multiple of it.
pub const GROUP: usize = 16;

/// One quantized block as small integers and affine scales per 16-weight group:
/// `w[i] = a[i / 16] * q[i] - b[i / 16]`. This form serves both the reference dequantizer
/// (bit-exact with ggml: the products and differences are the ones ggml computes) and the
/// integer dot products of the CPU backend (`sum(w * x) = a * sum(q * y) * dy - b * sum(y) * dy`).
#[derive(Clone)]
pub struct Unpacked {
    /// `[256]`, the first `block_size` used
    pub q: [i8; 256],
    /// `[16]` multipliers per group
    pub a: [f32; 16],
    /// `[16]` offsets per group (subtracted)
    pub b: [f32; 16],
}

impl Default for Unpacked {
    fn default() -> Self {
        Unpacked {
            q: [0; 256],
            a: [0.0; 16],
            b: [0.0; 16],
        }
    }
}

impl Unpacked {
    pub fn dequantize(&self, y: &mut [f32]) {
        for (i, y) in y.iter_mut().enumerate() {
            *y = self.a[i / GROUP] * self.q[i] as f32 - self.b[i / GROUP];
        }
    }

    fn set_groups(&mut self, groups: usize, a: f32, b: f32) {
        self.a[..groups].fill(a);
        self.b[..groups].fill(b);
    }
}

/// Unpack one block `b` (exactly `ty.type_size()` bytes) of a quantized type into `u`.
/// Panics on a non-block type (F32, F16, BF16, unknown): callers dispatch those first.
pub fn unpack_block(ty: GgmlType, b: &[u8], u: &mut Unpacked) {
    match ty {
        GgmlType::Q4_0 => unpack_q4_0(b, u),
        GgmlType::Q4_1 => unpack_q4_1(b, u),
        GgmlType::Q5_0 => unpack_q5_0(b, u),
        GgmlType::Q5_1 => unpack_q5_1(b, u),
        GgmlType::Q8_0 => unpack_q8_0(b, u),
        GgmlType::Q2K => unpack_q2_k(b, u),
        GgmlType::Q3K => unpack_q3_k(b, u),
        GgmlType::Q4K => unpack_q4_k(b, u),
        GgmlType::Q5K => unpack_q5_k(b, u),
        GgmlType::Q6K => unpack_q6_k(b, u),
        other => panic!(
            "unpack_block: {} is not a block-quantized type",
            other.name()
        ),
    }
}

/// Weight `i` of a 32-weight block whose 4-bit parts sit in `qs[16]`: low nibbles first.
#[inline]
fn nibble32(qs: &[u8], i: usize) -> u8 {
    (qs[i % 16] >> (4 * (i / 16))) & 0x0F
}

fn unpack_q4_0(b: &[u8], u: &mut Unpacked) {
    u.set_groups(2, h(b, 0), 0.0);
    let qs = &b[2..18];
    for i in 0..32 {
        u.q[i] = nibble32(qs, i) as i8 - 8;
    }
}

fn unpack_q4_1(b: &[u8], u: &mut Unpacked) {
    u.set_groups(2, h(b, 0), -h(b, 2));
    let qs = &b[4..20];
    for i in 0..32 {
        u.q[i] = nibble32(qs, i) as i8;
    }
}

fn q5(qh: u32, qs: &[u8], i: usize) -> u8 {
    nibble32(qs, i) | ((((qh >> i) & 1) as u8) << 4)
}

fn unpack_q5_0(b: &[u8], u: &mut Unpacked) {
    u.set_groups(2, h(b, 0), 0.0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for i in 0..32 {
        u.q[i] = q5(qh, qs, i) as i8 - 16;
    }
}

fn unpack_q5_1(b: &[u8], u: &mut Unpacked) {
    u.set_groups(2, h(b, 0), -h(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for i in 0..32 {
        u.q[i] = q5(qh, qs, i) as i8;
    }
}

fn unpack_q8_0(b: &[u8], u: &mut Unpacked) {
    u.set_groups(2, h(b, 0), 0.0);
    for i in 0..32 {
        u.q[i] = b[2 + i] as i8;
    }
}

/// Weight `i` (0..256) of a K-quant whose 2-bit parts are packed as two 128-weight halves of
/// `qs[32]` bytes each, four 32-weight groups per byte (shifts 0, 2, 4, 6).
#[inline]
fn crumb256(qs: &[u8], i: usize) -> u8 {
    let (half, rem) = (i / 128, i % 128);
    let (group, l) = (rem / 32, rem % 32);
    (qs[half * 32 + l] >> (2 * group)) & 3
}

fn unpack_q2_k(b: &[u8], u: &mut Unpacked) {
    let scales = &b[0..16];
    let qs = &b[16..80];
    let (d, dmin) = (h(b, 80), h(b, 82));
    for (g, sc) in scales.iter().enumerate() {
        u.a[g] = d * (sc & 0x0F) as f32;
        u.b[g] = dmin * (sc >> 4) as f32;
    }
    for i in 0..256 {
        u.q[i] = crumb256(qs, i) as i8;
    }
}

fn unpack_q3_k(b: &[u8], u: &mut Unpacked) {
    let hmask = &b[0..32];
    let qs = &b[32..96];
    let sc = &b[96..108];
    let d = h(b, 108);
    // 16 six-bit scales: low 4 bits from sc[0..8] (low nibbles = scales 0..8, high = 8..16),
    // high 2 bits from sc[8..12] (shift 0 = scales 0..4, 2 = 4..8, 4 = 8..12, 6 = 12..16).
    for k in 0..16 {
        let lo = (sc[k % 8] >> (4 * (k / 8))) & 0x0F;
        let hi = (sc[8 + k % 4] >> (2 * (k / 4))) & 0x03;
        u.a[k] = d * (((lo | (hi << 4)) as i8) - 32) as f32;
        u.b[k] = 0.0;
    }
    for i in 0..256 {
        let low = crumb256(qs, i) as i8;
        let high_bit_clear = ((hmask[i % 32] >> (i / 32)) & 1) ^ 1;
        u.q[i] = low - ((high_bit_clear << 2) as i8);
    }
}

/// The 8 six-bit scales and mins of Q4_K/Q5_K, packed in 12 bytes.
pub(crate) fn scale_min_k4(sc: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut s, mut m) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        s[j] = sc[j] & 0x3F;
        m[j] = sc[4 + j] & 0x3F;
        s[4 + j] = (sc[8 + j] & 0x0F) | ((sc[j] >> 2) & 0x30);
        m[4 + j] = (sc[8 + j] >> 4) | ((sc[4 + j] >> 2) & 0x30);
    }
    (s, m)
}

/// Scales of a Q4_K/Q5_K block: 8 groups of 32 weights, two 16-weight groups each.
fn k4_groups(b: &[u8], u: &mut Unpacked) {
    let (d, dmin) = (h(b, 0), h(b, 2));
    let (s, m) = scale_min_k4(&b[4..16]);
    for g in 0..16 {
        u.a[g] = d * s[g / 2] as f32;
        u.b[g] = dmin * m[g / 2] as f32;
    }
}

/// 4-bit part of weight `i` (0..256) in Q4_K/Q5_K: four 64-weight chunks of `qs[32]` bytes,
/// low nibbles first.
#[inline]
fn nibble256(qs: &[u8], i: usize) -> u8 {
    let (chunk, rem) = (i / 64, i % 64);
    (qs[chunk * 32 + rem % 32] >> (4 * (rem / 32))) & 0x0F
}

fn unpack_q4_k(b: &[u8], u: &mut Unpacked) {
    k4_groups(b, u);
    let qs = &b[16..144];
    for i in 0..256 {
        u.q[i] = nibble256(qs, i) as i8;
    }
}

fn unpack_q5_k(b: &[u8], u: &mut Unpacked) {
    k4_groups(b, u);
    let qh = &b[16..48];
    let qs = &b[48..176];
    for i in 0..256 {
        u.q[i] = (nibble256(qs, i) | (((qh[i % 32] >> (i / 32)) & 1) << 4)) as i8;
    }
}

fn unpack_q6_k(b: &[u8], u: &mut Unpacked) {
    let ql = &b[0..128];
    let qh = &b[128..192];
    let scales = &b[192..208];
    let d = h(b, 208);
    for g in 0..16 {
        u.a[g] = d * (scales[g] as i8) as f32;
        u.b[g] = 0.0;
    }
    for i in 0..256 {
        let (half, rem) = (i / 128, i % 128);
        // low 4 bits: two 64-weight halves of ql[64], low nibbles first
        let lo = (ql[half * 64 + rem % 64] >> (4 * (rem / 64))) & 0x0F;
        let hi = crumb256(qh, i);
        u.q[i] = ((lo | (hi << 4)) as i8) - 32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_match_ggml() {
        // ggml's type traits: (block size, type size)
        let want = [
            (GgmlType::Q4_0, 32, 18),
            (GgmlType::Q4_1, 32, 20),
            (GgmlType::Q5_0, 32, 22),
            (GgmlType::Q5_1, 32, 24),
            (GgmlType::Q8_0, 32, 34),
            (GgmlType::Q2K, 256, 84),
            (GgmlType::Q3K, 256, 110),
            (GgmlType::Q4K, 256, 144),
            (GgmlType::Q5K, 256, 176),
            (GgmlType::Q6K, 256, 210),
        ];
        for (t, b, s) in want {
            assert_eq!(
                (t.block_size(), t.type_size()),
                (Some(b), Some(s)),
                "{}",
                t.name()
            );
            assert_eq!(GgmlType::from_id(t.id()), t);
        }
    }

    #[test]
    fn q4_0_by_hand() {
        let mut b = vec![0u8; 18];
        b[..2].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        b[2] = 0xF0; // weight 0 = 0, weight 16 = 15
        let y = dequantize_to_vec(GgmlType::Q4_0, &b, 32).unwrap();
        assert_eq!(y[0], -4.0);
        assert_eq!(y[16], 3.5);
        assert_eq!(y[1], -4.0);
    }

    #[test]
    fn wrong_lengths_are_errors() {
        assert!(dequantize_to_vec(GgmlType::Q4_0, &[0u8; 17], 32).is_err());
        assert!(dequantize_to_vec(GgmlType::Q4_0, &[0u8; 18], 31).is_err());
        assert!(dequantize_to_vec(GgmlType::Other(99), &[0u8; 18], 32).is_err());
    }
}
