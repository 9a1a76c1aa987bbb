//! `--device cuda` on a machine that cannot run it: one line on stderr naming the problem, a
//! non-zero exit, no panic, nothing left listening. (On a machine with a usable GPU these
//! checks do not apply and are skipped; scripts/gpu-check.sh covers that side.)

mod common;

use common::*;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn cuda_usable() -> bool {
    kojo::backend::gpu::cuda::probe().is_ok()
}

/// Run kojo with a deadline; (exit code, stderr).
fn run_with_deadline(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kojo"))
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            return (
                status.code(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("kojo {args:?} did not exit within 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn assert_one_line_error(args: &[&str]) {
    let (code, err) = run_with_deadline(args);
    assert_eq!(code, Some(1), "kojo {args:?}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        1,
        "kojo {args:?}: expected one line, got:\n{err}"
    );
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn serve_on_cuda_without_a_gpu_is_a_one_line_error() {
    if cuda_usable() {
        eprintln!("skipped: this machine has a usable GPU");
        return;
    }
    let model = smollm2();
    let m = model.to_str().unwrap();
    assert_one_line_error(&["serve", "-m", m, "--device", "cuda", "--port", "0"]);
    assert_one_line_error(&["serve", "-m", m, "--device", "cuda:3", "--port", "0"]);
    assert_one_line_error(&[
        "generate", "-m", m, "--device", "cuda", "-p", "hi", "-n", "2",
    ]);
    assert_one_line_error(&["bench", "-m", m, "--device", "cuda", "-p", "8", "-n", "0"]);
    assert_one_line_error(&["gpu-check"]);
    assert_one_line_error(&["kernels", "bench", "--shapes", "tiny"]);
    // and a lab on the CPU is refused before anything loads
    assert_one_line_error(&["kernels", "bench", "--device", "cpu"]);
}

#[test]
fn an_unknown_device_is_a_usage_error() {
    let out = kojo(&["serve", "-m", "x.gguf", "--device", "tpu"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("'tpu' is not a device: cpu, cuda or cuda:N"),
        "{err}"
    );
}
