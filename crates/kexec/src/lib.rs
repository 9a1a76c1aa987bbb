//! Test-only: kojo's CUDA kernels built as C++ and run on the CPU (see `kexec.h`).
//!
//! [`launch`] takes cuLaunchKernel's convention: one pointer per kernel argument, plus each
//! argument's size, which is checked against the kernel's parameter list.

use std::ffi::{c_char, c_void, CString};

extern "C" {
    fn kexec_launch(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        dyn_bytes: usize,
        params: *mut *mut c_void,
        sizes: *const usize,
        n_params: usize,
    ) -> i32;
    fn kexec_kernel_names(buf: *mut c_char, cap: usize) -> usize;
}

/// Run kernel `name` over `grid` blocks of `block` threads.
///
/// # Safety
/// `params[i]` must point at a value of the kernel's i-th parameter type (`sizes[i]` bytes); the
/// pointers among those values must be valid for everything the kernel reads and writes.
pub unsafe fn launch(
    name: &str,
    grid: [u32; 3],
    block: [u32; 3],
    dyn_bytes: usize,
    params: &mut [*mut c_void],
    sizes: &[usize],
) -> Result<(), String> {
    assert_eq!(params.len(), sizes.len());
    let c = CString::new(name).map_err(|e| e.to_string())?;
    match kexec_launch(
        c.as_ptr(),
        grid.as_ptr(),
        block.as_ptr(),
        dyn_bytes,
        params.as_mut_ptr(),
        sizes.as_ptr(),
        params.len(),
    ) {
        0 => Ok(()),
        1 => Err(format!("kexec: no kernel named {name}")),
        _ => Err(format!("kexec: arguments do not match kernel {name}")),
    }
}

/// Every kernel of kojo's `kernels/` built into this library (the executor's own `probe_`
/// kernels left out).
pub fn kernel_names() -> Vec<String> {
    all_kernel_names()
        .into_iter()
        .filter(|n| !n.starts_with("probe_"))
        .collect()
}

/// Every kernel built into this library.
pub fn all_kernel_names() -> Vec<String> {
    // SAFETY: the first call asks for the size; the second writes at most `cap` bytes
    unsafe {
        let n = kexec_kernel_names(std::ptr::null_mut(), 0);
        let mut buf = vec![0u8; n];
        kexec_kernel_names(buf.as_mut_ptr() as *mut c_char, n);
        let s = String::from_utf8_lossy(&buf[..n - 1]).into_owned();
        s.lines().map(str::to_string).collect()
    }
}
