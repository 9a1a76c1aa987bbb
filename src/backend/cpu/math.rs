//! Element-wise math the compiler can vectorize: `exp` as Cephes' `expf` computes it (a
//! degree-6 polynomial on `[-ln 2 / 2, ln 2 / 2]` times `2^n`, within 2 ulp of the true
//! value over the clamped range), written without branches or library calls so a loop of it
//! becomes SIMD code, and the activations built on it.

/// `e^x` for `x` clamped to `[-87, 88]` (results from about 1.6e-38 to 1.65e38).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    let x = x.clamp(-87.0, 88.0);
    let n = (x * LOG2E).round_ties_even();
    // x - n ln 2 in two parts, so the reduction stays exact
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// `x * sigmoid(x)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// GELU, tanh form: `0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let z = SQRT_2_OVER_PI * x * (1.0 + 0.044715 * x * x);
    // tanh z = 1 - 2 / (e^{2z} + 1), exact at both ends (e^{2z} -> 0 or huge)
    let t = 1.0 - 2.0 / (exp(2.0 * z) + 1.0);
    0.5 * x * (1.0 + t)
}

/// `v = e^v` over a slice.
#[inline(always)]
fn exp_in_place_body(v: &mut [f32]) {
    for x in v {
        *x = exp(*x);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_in_place_avx2(v: &mut [f32]) {
    exp_in_place_body(v)
}

/// `v = e^v` over a slice, vectorized where the CPU allows.
pub fn exp_in_place(v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::matmul::has_avx2() {
        // SAFETY: the CPU has AVX2 and FMA (checked just now)
        return unsafe { exp_in_place_avx2(v) };
    }
    exp_in_place_body(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_a_few_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.001_3;
        }
        assert!(
            worst < 3.0 * f32::EPSILON as f64,
            "worst relative error {worst}"
        );
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) > 0.0 && exp(1000.0).is_finite());
    }

    #[test]
    fn activations_match_the_library_functions() {
        for i in -2000..2000 {
            let x = i as f32 * 0.01;
            let silu_ref = x as f64 / (1.0 + (-x as f64).exp());
            let z = 0.797_884_560_802_865_4 * x as f64 * (1.0 + 0.044715 * (x as f64).powi(2));
            let gelu_ref = 0.5 * x as f64 * (1.0 + z.tanh());
            assert!(
                (silu(x) as f64 - silu_ref).abs() <= 1e-6 * (1.0 + silu_ref.abs()),
                "silu {x}"
            );
            assert!(
                (gelu_tanh(x) as f64 - gelu_ref).abs() <= 1e-6 * (1.0 + gelu_ref.abs()),
                "gelu {x}"
            );
        }
    }
}
