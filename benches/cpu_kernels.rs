//! Micro-benchmarks of the CPU kernels: each quantized matmul on the hand-written SIMD kernels
//! (and the x8 repacking where the type has one) beside the portable loops, at a decode shape
//! (1 token) and a prefill shape (64 tokens), on SmolLM2-like sizes (768 → 1536: its 576
//! rounded up to whole 256-weight blocks). Compare the
//! variants as ratios within one run; absolute times move with the machine.
//!
//! `cargo bench --bench cpu_kernels` (one thread per core; `KOJO_THREADS=1` for one).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use kojo::backend::cpu::matmul::{Kernels, MatmulMode, Matrix};
use kojo::formats::GgmlType;

fn random_blocks(ty: GgmlType, rows: usize, cols: usize, seed: &mut u64) -> Vec<u8> {
    let (bs, ts) = (ty.block_size().unwrap(), ty.type_size().unwrap());
    let mut next = || {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    };
    let mut data: Vec<u8> = (0..rows * cols / bs * ts).map(|_| next() as u8).collect();
    // finite, small f16 scales where each type keeps them
    let at: &[usize] = match ty {
        GgmlType::Q6K => &[208],
        GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
        _ => &[0],
    };
    for blk in data.chunks_exact_mut(ts) {
        for &a in at {
            blk[a..a + 2].copy_from_slice(&f16::from_f32(0.01).to_bits().to_le_bytes());
        }
    }
    data
}

fn matmuls(c: &mut Criterion) {
    let (k, m) = (576usize.div_ceil(256) * 256, 1536usize);
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q6K,
    ] {
        let data = random_blocks(ty, m, k, &mut seed);
        let row_bytes = k / ty.block_size().unwrap() * ty.type_size().unwrap();
        let blocks = Matrix::Blocks {
            ty,
            data: data.clone(),
            row_bytes,
        };
        #[cfg(target_arch = "x86_64")]
        let x8 = kojo::backend::cpu::x8::repack(ty, &data, m, row_bytes)
            .map(|data| Matrix::X8 { ty, data });
        let mut g = c.benchmark_group(format!("matmul_{}", ty.name()));
        for n in [1usize, 64] {
            let x: Vec<f32> = (0..n * k)
                .map(|i| ((i * 7919) % 2001) as f32 / 1000.0 - 1.0)
                .collect();
            g.throughput(Throughput::Elements((n * m * k) as u64));
            g.bench_with_input(BenchmarkId::new("portable", n), &n, |b, _| {
                b.iter(|| blocks.matmul_with(&x, k, m, MatmulMode::Quantized, Kernels::Portable))
            });
            let best = Kernels::detect();
            if best != Kernels::Portable {
                g.bench_with_input(BenchmarkId::new("simd", n), &n, |b, _| {
                    b.iter(|| blocks.matmul_with(&x, k, m, MatmulMode::Quantized, best))
                });
                #[cfg(target_arch = "x86_64")]
                if let (Some(x8), Kernels::Simd(kojo::backend::cpu::simd::Isa::Vnni)) = (&x8, best)
                {
                    g.bench_with_input(BenchmarkId::new("x8", n), &n, |b, _| {
                        b.iter(|| x8.matmul_with(&x, k, m, MatmulMode::Quantized, best))
                    });
                }
            }
        }
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
    targets = matmuls
}
criterion_main!(benches);
