//! Every kernel compiles with NVRTC for sm_80 and sm_90, without register spills
//! (`kojo kernels check`), and the check fails on a compile error and on a spill.
//!
//! Needs libnvrtc and the CUDA headers (scripts/test installs the pinned pip wheels and points
//! CUDA_HOME at them). Without them the tests are skipped, except under CI=true, where they fail.

mod common;

use common::*;
use std::path::Path;

/// `kojo kernels check` output, or None when NVRTC is missing outside CI.
fn check(args: &[&str]) -> Option<std::process::Output> {
    let mut all = vec!["kernels", "check"];
    all.extend_from_slice(args);
    let out = kojo(&all);
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("NVRTC (libnvrtc.so) was not found")
        || err.contains("cuda_fp16.h was not found")
    {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI=true but NVRTC or the CUDA headers are missing: {err}"
        );
        eprintln!("skipped: {}", err.trim());
        return None;
    }
    Some(out)
}

#[test]
fn every_kernel_compiles_for_sm80_and_sm90_without_spills() {
    let Some(out) = check(&["--arch", "sm_80,sm_90"]) else {
        return;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // every kernel the CPU executor knows appears for both architectures
    for name in kexec::kernel_names() {
        for arch in ["sm_80", "sm_90"] {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(arch) && l.split_whitespace().nth(2) == Some(&name)),
                "{name} missing for {arch}"
            );
        }
    }
}

fn kernel_copy(extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(root().join("kernels")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    let m = dir.path().join("matmul.cu");
    let text = std::fs::read_to_string(&m).unwrap() + extra;
    std::fs::write(&m, text).unwrap();
    dir
}

fn dir_arg(d: &Path) -> String {
    d.display().to_string()
}

#[test]
fn a_compile_error_fails_the_check() {
    let dir =
        kernel_copy("\nextern \"C\" __global__ void broken(float* o) { o[0] = undeclared; }\n");
    let Some(out) = check(&["--arch", "sm_90", "--kernel-dir", &dir_arg(dir.path())]) else {
        return;
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("matmul.cu") && err.contains("undeclared"),
        "{err}"
    );
}

#[test]
fn a_register_spill_fails_the_check() {
    let dir = kernel_copy(
        r#"
extern "C" __global__ void __launch_bounds__(1024, 2) spill_probe(float* o, const float* x) {
    float v[48];
#pragma unroll
    for (int i = 0; i < 48; i++) v[i] = x[i * blockDim.x + threadIdx.x];
    float s = 0.0f;
#pragma unroll
    for (int i = 0; i < 48; i++)
#pragma unroll
        for (int j = 0; j < 48; j++) s += v[i] * v[(j * 7 + i) % 48];
    o[threadIdx.x] = s;
}
"#,
    );
    let Some(out) = check(&["--arch", "sm_90", "--kernel-dir", &dir_arg(dir.path())]) else {
        return;
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("register spills in spill_probe"), "{err}");
}
