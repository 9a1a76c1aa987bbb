//! The CPU executor itself (crates/kexec): warps of 32 lanes and every shuffle form, block
//! reductions, dynamic shared memory, 2D geometry, blocks run in a shuffled order, argument
//! checking, and an abort (with a message) when a barrier or a warp collective is not reached
//! by every thread.

use std::ffi::c_void;

/// Launch with pointer arguments only.
fn launch(
    name: &str,
    grid: [u32; 3],
    block: [u32; 3],
    smem: usize,
    ptrs: &[*mut c_void],
) -> Result<(), String> {
    let mut vals: Vec<u64> = ptrs.iter().map(|p| *p as u64).collect();
    let mut params: Vec<*mut c_void> = vals
        .iter_mut()
        .map(|v| v as *mut u64 as *mut c_void)
        .collect();
    let sizes = vec![8; params.len()];
    // SAFETY: each test passes buffers sized for its geometry
    unsafe { kexec::launch(name, grid, block, smem, &mut params, &sizes) }
}

#[test]
fn shuffles_follow_cuda_semantics() {
    let mut out = vec![-1i32; 64 * 4];
    launch(
        "probe_shuffles",
        [1, 1, 1],
        [64, 1, 1],
        0,
        &[out.as_mut_ptr() as _],
    )
    .unwrap();
    for t in 0..64i32 {
        let (warp, lane) = (t / 32 * 32, t % 32);
        let o = &out[4 * t as usize..][..4];
        assert_eq!(o[0], warp + (lane ^ 5), "xor, thread {t}");
        assert_eq!(
            o[1],
            if lane + 3 < 32 { t + 3 } else { t },
            "down, thread {t}"
        );
        assert_eq!(o[2], warp + 7, "idx, thread {t}");
        assert_eq!(o[3], if lane >= 2 { t - 2 } else { t }, "up, thread {t}");
    }
}

#[test]
fn block_reduction_shared_and_dynamic_memory() {
    let x: Vec<f32> = (0..3 * 96).map(|i| (i % 17) as f32 - 8.0).collect();
    let mut out = vec![f32::NAN; 3];
    launch(
        "probe_block_sum",
        [3, 1, 1],
        [96, 1, 1],
        0,
        &[out.as_mut_ptr() as _, x.as_ptr() as _],
    )
    .unwrap();
    for b in 0..3 {
        assert_eq!(out[b], x[b * 96..(b + 1) * 96].iter().sum::<f32>());
    }
    let n = 200usize;
    let x: Vec<f32> = (0..n).map(|i| i as f32).collect();
    let mut out = vec![f32::NAN; n];
    let mut nv = n as u32;
    let mut vals = [out.as_mut_ptr() as u64, x.as_ptr() as u64];
    let mut params: Vec<*mut c_void> = vals
        .iter_mut()
        .map(|v| v as *mut u64 as *mut c_void)
        .collect();
    params.push(&mut nv as *mut u32 as *mut c_void);
    // SAFETY: n floats each, n * 4 bytes of dynamic shared memory
    unsafe {
        kexec::launch(
            "probe_dyn_smem",
            [1, 1, 1],
            [n as u32, 1, 1],
            n * 4,
            &mut params,
            &[8, 8, 4],
        )
    }
    .unwrap();
    assert_eq!(out, x.iter().rev().copied().collect::<Vec<_>>());
}

/// A GPU runs blocks in no promised order; the executor shuffles them, anew at each launch,
/// so a kernel that relies on an order (a "last block" that is assumed to be the highest
/// index) fails in tests too.
#[test]
fn blocks_run_in_a_shuffled_order() {
    let mut orders = Vec::new();
    for _ in 0..2 {
        let (mut out, mut counter) = (vec![u32::MAX; 4 * 3 * 2 * 6], vec![0u32]);
        launch(
            "probe_block_order",
            [24, 3, 2],
            [32, 1, 1],
            0,
            &[out.as_mut_ptr() as _, counter.as_mut_ptr() as _],
        )
        .unwrap();
        // every block ran once
        let mut sorted = out.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..144).collect::<Vec<u32>>());
        assert_ne!(
            out,
            (0..144).collect::<Vec<u32>>(),
            "blocks ran in index order"
        );
        orders.push(out);
    }
    assert_ne!(orders[0], orders[1], "the same order at two launches");
}

#[test]
fn two_dimensional_geometry() {
    let (gx, gy, bx, by) = (3u32, 2u32, 8u32, 4u32);
    let mut out = vec![u32::MAX; (gx * gy * bx * by) as usize];
    launch(
        "probe_2d",
        [gx, gy, 1],
        [bx, by, 1],
        0,
        &[out.as_mut_ptr() as _],
    )
    .unwrap();
    for y in 0..gy {
        for x in 0..gx {
            for ty in 0..by {
                for tx in 0..bx {
                    let i = ((y * gx + x) * bx * by + ty * bx + tx) as usize;
                    assert_eq!(out[i], tx + 100 * ty + 10000 * x + 1_000_000 * y);
                }
            }
        }
    }
}

#[test]
fn arguments_are_checked_against_the_kernel() {
    let mut out = vec![0f32; 32];
    let err = launch(
        "probe_2d",
        [1, 1, 1],
        [32, 1, 1],
        0,
        &[out.as_mut_ptr() as _, out.as_mut_ptr() as _],
    );
    assert!(err.unwrap_err().contains("do not match"));
    assert!(launch("no_such_kernel", [1, 1, 1], [32, 1, 1], 0, &[])
        .unwrap_err()
        .contains("no kernel"));
}

/// Run `kernel` in a child process (the executor aborts the process) and return its stderr.
fn aborts(kernel: &str) -> String {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "misuse_child",
            "--nocapture",
            "--test-threads",
            "1",
        ])
        .env("KEXEC_MISUSE", kernel)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{kernel} did not abort");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The child side of [`aborts`]; does nothing in a normal run.
#[test]
fn misuse_child() {
    if let Ok(k) = std::env::var("KEXEC_MISUSE") {
        let mut out = vec![0f32; 64];
        let _ = launch(&k, [1, 1, 1], [64, 1, 1], 0, &[out.as_mut_ptr() as _]);
    }
}

#[test]
fn a_barrier_not_reached_by_every_thread_aborts() {
    let err = aborts("probe_divergent_barrier");
    assert!(
        err.contains("__syncthreads was not reached by every thread of the block"),
        "{err}"
    );
}

#[test]
fn a_shuffle_not_reached_by_every_lane_aborts() {
    let err = aborts("probe_divergent_shuffle");
    assert!(
        err.contains("a warp collective was not reached by every lane"),
        "{err}"
    );
}
