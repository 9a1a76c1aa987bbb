//! Kernel sources and their compilation: `kernels/*.cu` and `*.cuh` are embedded in the binary
//! (or read from `--kernel-dir`), compiled by NVRTC to a cubin for one exact architecture, and
//! cached on disk under a hash of the sources, the options, the architecture and NVRTC's
//! version. NVRTC (libnvrtc) is opened at run time; nothing CUDA is needed to build kojo.

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};
use std::ffi::{c_char, CStr, CString};
use std::path::{Path, PathBuf};

/// The kernel sources built into the binary: (file name, text).
pub const EMBEDDED: &[(&str, &str)] = &[
    ("common.cuh", include_str!("../../../kernels/common.cuh")),
    ("quant.cuh", include_str!("../../../kernels/quant.cuh")),
    (
        "elementwise.cu",
        include_str!("../../../kernels/elementwise.cu"),
    ),
    ("matmul.cu", include_str!("../../../kernels/matmul.cu")),
    (
        "attention.cu",
        include_str!("../../../kernels/attention.cu"),
    ),
    ("sampling.cu", include_str!("../../../kernels/sampling.cu")),
];

/// A set of kernel sources: compilation units (`.cu`) and the headers they include (`.cuh`).
#[derive(Debug, Clone)]
pub struct Sources {
    files: Vec<(String, String)>,
}

impl Sources {
    pub fn embedded() -> Sources {
        Sources {
            files: EMBEDDED
                .iter()
                .map(|(n, s)| (n.to_string(), s.to_string()))
                .collect(),
        }
    }

    /// Every `.cu` and `.cuh` file of `dir` (for kernel development without rebuilding kojo).
    pub fn from_dir(dir: &Path) -> Result<Sources> {
        let mut files = Vec::new();
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("kernel directory {}", dir.display()))?;
        for e in entries {
            let path = e?.path();
            let ext = path.extension().and_then(|e| e.to_str());
            if matches!(ext, Some("cu" | "cuh")) {
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                files.push((name, text));
            }
        }
        files.sort();
        if !files.iter().any(|(n, _)| n.ends_with(".cu")) {
            bail!("kernel directory {}: no .cu files", dir.display());
        }
        Ok(Sources { files })
    }

    pub fn units(&self) -> impl Iterator<Item = &(String, String)> {
        self.files.iter().filter(|(n, _)| n.ends_with(".cu"))
    }

    fn headers(&self) -> impl Iterator<Item = &(String, String)> {
        self.files.iter().filter(|(n, _)| n.ends_with(".cuh"))
    }
}

/// The directories where a CUDA installation or the pip wheels keep their libraries.
fn cuda_roots() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT"] {
        if let Some(v) = std::env::var_os(var) {
            roots.push(PathBuf::from(v));
        }
    }
    roots.push(PathBuf::from("/usr/local/cuda"));
    roots
}

/// Open NVRTC and cuBLAS from `$CUDA_HOME/lib{64,}` (or a wheel's folder named by
/// `CUDA_HOME`) when they are there, so that cudarc's lookup by name finds them already loaded
/// without `LD_LIBRARY_PATH`. Libraries not found here are left to the system's search path.
pub fn preload_libraries() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for root in cuda_roots() {
            for sub in ["lib64", "lib"] {
                let Ok(rd) = std::fs::read_dir(root.join(sub)) else {
                    continue;
                };
                let mut libs: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
                libs.sort();
                // the builtins first: libnvrtc opens them by name when it compiles
                for prefix in [
                    "libnvrtc-builtins.so",
                    "libnvrtc.so",
                    "libcublasLt.so",
                    "libcublas.so",
                ] {
                    for p in &libs {
                        let name = p.file_name().unwrap().to_string_lossy();
                        if name.starts_with(prefix) && name.len() > prefix.len() {
                            let c = CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
                            // SAFETY: dlopen of a shared library by path; the handle is kept
                            unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
                        }
                    }
                }
            }
        }
    });
}

/// NVRTC's version, or why it cannot be used.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    preload_libraries();
    // SAFETY: only tries to open the library
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        bail!("NVRTC (libnvrtc.so) was not found: install the CUDA toolkit or `pip install nvidia-cuda-nvrtc==13.0.88` and set CUDA_HOME to its nvidia/cu13 folder");
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present; two out-parameters
    let r = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        bail!("nvrtcVersion failed: {r:?}");
    }
    Ok((major, minor))
}

/// The folder with `cuda_fp16.h` (NVRTC ships no headers of its own).
pub fn include_dir() -> Result<PathBuf> {
    let mut tried = Vec::new();
    let mut candidates: Vec<PathBuf> = std::env::var_os("KOJO_CUDA_INCLUDE")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    candidates.extend(cuda_roots().into_iter().map(|r| r.join("include")));
    for c in candidates {
        if c.join("cuda_fp16.h").is_file() {
            return Ok(c);
        }
        tried.push(c.display().to_string());
    }
    bail!(
        "cuda_fp16.h was not found (looked in {}): set CUDA_HOME, or KOJO_CUDA_INCLUDE to a folder with the CUDA headers (`pip install nvidia-cuda-runtime==13.0.96` has them)",
        tried.join(", ")
    )
}

/// One compiled unit.
pub struct Compiled {
    pub unit: String,
    pub cubin: Vec<u8>,
    /// NVRTC's log, with ptxas's per-kernel resource lines.
    pub log: String,
}

fn options(arch: &str, include: &Path) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".into(),
        "-lineinfo".into(),
        "--ptxas-options=-v".into(),
        format!("--include-path={}", include.display()),
    ]
}

fn nvrtc_check(r: cudarc::nvrtc::sys::nvrtcResult, what: &str) -> Result<()> {
    if r == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(anyhow!("NVRTC {what}: {r:?}"))
    }
}

/// Compile one unit of `src` to a cubin for `arch` (`sm_80`, `sm_90`, ...).
pub fn compile(src: &Sources, unit: &str, arch: &str, include: &Path) -> Result<Compiled> {
    use cudarc::nvrtc::sys;
    nvrtc_version()?;
    let text = &src
        .units()
        .find(|(n, _)| n == unit)
        .ok_or_else(|| anyhow!("no kernel unit {unit}"))?
        .1;
    let c_src = CString::new(text.as_str())?;
    let c_name = CString::new(unit)?;
    let hdrs: Vec<(CString, CString)> = src
        .headers()
        .map(|(n, t)| Ok((CString::new(t.as_str())?, CString::new(n.as_str())?)))
        .collect::<Result<_>>()?;
    let hdr_src: Vec<*const c_char> = hdrs.iter().map(|h| h.0.as_ptr()).collect();
    let hdr_names: Vec<*const c_char> = hdrs.iter().map(|h| h.1.as_ptr()).collect();
    let opts: Vec<CString> = options(arch, include)
        .into_iter()
        .map(CString::new)
        .collect::<std::result::Result<_, _>>()?;
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    // SAFETY: every pointer lives until the program is destroyed below
    unsafe {
        let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
        nvrtc_check(
            sys::nvrtcCreateProgram(
                &mut prog,
                c_src.as_ptr(),
                c_name.as_ptr(),
                hdrs.len() as i32,
                hdr_src.as_ptr(),
                hdr_names.as_ptr(),
            ),
            "create program",
        )?;
        let compiled = sys::nvrtcCompileProgram(prog, opt_ptrs.len() as i32, opt_ptrs.as_ptr());
        let mut log_size = 0usize;
        sys::nvrtcGetProgramLogSize(prog, &mut log_size);
        let mut log = vec![0u8; log_size.max(1)];
        sys::nvrtcGetProgramLog(prog, log.as_mut_ptr() as *mut c_char);
        let log = CStr::from_bytes_until_nul(&log)
            .map(|c| c.to_string_lossy().into_owned())
            .unwrap_or_default();
        let result = (|| {
            if compiled != sys::nvrtcResult::NVRTC_SUCCESS {
                bail!("{unit} for {arch} does not compile:\n{log}");
            }
            let mut size = 0usize;
            nvrtc_check(sys::nvrtcGetCUBINSize(prog, &mut size), "cubin size")?;
            let mut cubin = vec![0u8; size];
            nvrtc_check(
                sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char),
                "cubin",
            )?;
            Ok(cubin)
        })();
        sys::nvrtcDestroyProgram(&mut prog);
        Ok(Compiled {
            unit: unit.to_string(),
            cubin: result?,
            log,
        })
    }
}

/// Where compiled cubins are kept: `KOJO_CACHE_DIR`, else `$XDG_CACHE_HOME/kojo/kernels`, else
/// `~/.cache/kojo/kernels`.
pub fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("KOJO_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("kojo").join("kernels"))
}

/// Every unit of `src` for `arch`, from the disk cache when it holds them (keyed by the
/// sources, options, architecture and NVRTC version), else compiled and stored.
pub fn compile_all(src: &Sources, arch: &str) -> Result<Vec<Compiled>> {
    let (major, minor) = nvrtc_version()?;
    let include = include_dir()?;
    let mut key = Sha256::new();
    for (n, t) in &src.files {
        key.update(n.as_bytes());
        key.update([0]);
        key.update(t.as_bytes());
        key.update([0]);
    }
    for o in options(arch, Path::new("")) {
        key.update(o.as_bytes());
    }
    key.update(format!("{arch} nvrtc {major}.{minor}").as_bytes());
    let key: String = key.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let dir = cache_dir();
    let mut out = Vec::new();
    for (unit, _) in src.units() {
        let stem = unit.trim_end_matches(".cu");
        let path = dir
            .as_ref()
            .map(|d| d.join(format!("{stem}-{arch}-{}.cubin", &key[..16])));
        if let Some(cubin) = path.as_ref().and_then(|p| std::fs::read(p).ok()) {
            if !cubin.is_empty() {
                out.push(Compiled {
                    unit: unit.clone(),
                    cubin,
                    log: String::new(),
                });
                continue;
            }
        }
        let c = compile(src, unit, arch, &include)?;
        if let Some(p) = &path {
            // best effort: a cache that cannot be written costs a compile next time
            let tmp = p.with_extension(format!("tmp{}", std::process::id()));
            let _ = std::fs::create_dir_all(p.parent().unwrap())
                .and_then(|_| std::fs::write(&tmp, &c.cubin))
                .and_then(|_| std::fs::rename(&tmp, p));
        }
        out.push(c);
    }
    Ok(out)
}

/// ptxas's resource report for one kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelStats {
    pub name: String,
    pub registers: u32,
    pub shared_bytes: u32,
    pub stack_bytes: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
}

/// The per-kernel lines of a `--ptxas-options=-v` log.
pub fn parse_ptxas_log(log: &str) -> Vec<KernelStats> {
    let mut out: Vec<KernelStats> = Vec::new();
    let num_before = |line: &str, what: &str| -> Option<u32> {
        let i = line.find(what)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(KernelStats {
                name,
                ..Default::default()
            });
            continue;
        }
        let Some(k) = out.last_mut() else { continue };
        if line.contains("bytes stack frame") {
            k.stack_bytes = num_before(line, "bytes stack frame").unwrap_or(0);
            k.spill_stores = num_before(line, "bytes spill stores").unwrap_or(0);
            k.spill_loads = num_before(line, "bytes spill loads").unwrap_or(0);
        }
        if line.contains("Used") && line.contains("registers") {
            k.registers = num_before(line, "registers").unwrap_or(0);
            k.shared_bytes = num_before(line, "bytes smem").unwrap_or(0);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptxas_log_is_read_per_kernel() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'rms_norm' for 'sm_90'\n\
ptxas info    : Function properties for rms_norm\n\
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 30 registers, used 1 barriers, 128 bytes smem, 400 bytes cmem[0]\n\
ptxas info    : Compiling entry function 'glu' for 'sm_90'\n\
ptxas info    : Function properties for glu\n\
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 12 registers, 380 bytes cmem[0]\n";
        let s = parse_ptxas_log(log);
        assert_eq!(s.len(), 2);
        assert_eq!(
            s[0],
            KernelStats {
                name: "rms_norm".into(),
                registers: 30,
                shared_bytes: 128,
                stack_bytes: 8,
                spill_stores: 4,
                spill_loads: 12
            }
        );
        assert_eq!(
            (s[1].registers, s[1].shared_bytes, s[1].spill_stores),
            (12, 0, 0)
        );
    }

    #[test]
    fn embedded_sources_are_the_kernel_folder() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
        let on_disk = Sources::from_dir(&dir).unwrap();
        let mut embedded = Sources::embedded().files;
        embedded.sort();
        assert_eq!(on_disk.files, embedded, "kernels/ and EMBEDDED list differ");
    }
}
