//! A real GPU as a [`Device`]: cudarc over the CUDA driver API, loaded at run time.
//!
//! Opening checks, in order, that libcuda is present, that the driver initializes, that the
//! device exists and is compute capability 8.0 or newer, and that NVRTC and the CUDA headers
//! are there; each failure is one sentence (cudarc itself panics on a missing library, so
//! presence is checked before its first call). The kernels are compiled for the device's exact
//! `sm_XY` (or read from the disk cache) and loaded as modules; functions are looked up by
//! name on first launch. All work goes to one stream; memory comes from the stream-ordered
//! allocator.

use super::kernels::{self, Sources};
use super::{Arg, Device, Grid};
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{result as cu, sys, CudaContext, CudaStream};
use std::collections::HashMap;
use std::ffi::CString;
use std::path::Path;
use std::sync::{Arc, Mutex};

pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    modules: Vec<(String, sys::CUmodule)>,
    functions: Mutex<HashMap<String, usize>>,
    describe: String,
}

// SAFETY: CUmodule and CUfunction handles are plain driver handles, usable from any thread
// once the context is bound (every call binds it first)
unsafe impl Send for CudaDevice {}
unsafe impl Sync for CudaDevice {}

/// Why CUDA cannot be used here, in one sentence; `Ok` with the device count otherwise.
pub fn probe() -> Result<usize> {
    kernels::preload_libraries();
    // SAFETY: only tries to open the library
    if !unsafe { sys::is_culib_present() } {
        bail!("no NVIDIA driver: libcuda.so was not found");
    }
    cu::init().map_err(|e| anyhow!("the CUDA driver did not initialize: {e:?}"))?;
    let n = CudaContext::device_count().map_err(|e| anyhow!("no CUDA device: {e:?}"))?;
    if n <= 0 {
        bail!("no CUDA device: the driver reports none");
    }
    Ok(n as usize)
}

impl CudaDevice {
    /// Open GPU `ordinal`, compiling (or loading from the cache) every kernel for it.
    pub fn open(ordinal: usize, kernel_dir: Option<&Path>) -> Result<CudaDevice> {
        let count = probe()?;
        if ordinal >= count {
            bail!(
                "no CUDA device {ordinal}: this machine has {count} (0..{})",
                count - 1
            );
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| anyhow!("CUDA device {ordinal}: {e:?}"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| anyhow!("CUDA device {ordinal}: {e:?}"))?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        if major < 8 {
            bail!("{name} (CUDA device {ordinal}) has compute capability {major}.{minor}; kojo needs 8.0 or newer");
        }
        let mem = ctx.total_mem().unwrap_or(0);
        let arch = format!("sm_{major}{minor}");
        let sources = match kernel_dir {
            Some(d) => Sources::from_dir(d)?,
            None => Sources::embedded(),
        };
        let t0 = std::time::Instant::now();
        let compiled = kernels::compile_all(&sources, &arch)
            .with_context(|| format!("compiling kernels for {name} ({arch})"))?;
        tracing::info!(
            "kernels for {arch} ready in {:.2} s",
            t0.elapsed().as_secs_f64()
        );
        ctx.bind_to_thread().map_err(|e| anyhow!("{e:?}"))?;
        let mut modules = Vec::new();
        for c in compiled {
            // SAFETY: a cubin NVRTC made for this architecture
            let m =
                unsafe { cu::module::load_data(c.cubin.as_ptr() as *const _) }.map_err(|e| {
                    anyhow!(
                        "loading {} for {arch}: {e:?} (clear the kernel cache {:?} if it persists)",
                        c.unit,
                        kernels::cache_dir()
                    )
                })?;
            modules.push((c.unit, m));
        }
        let stream = ctx.default_stream();
        Ok(CudaDevice {
            describe: format!(
                "{name}, {:.1} GiB, compute capability {major}.{minor}",
                mem as f64 / (1u64 << 30) as f64
            ),
            ctx,
            stream,
            modules,
            functions: Mutex::new(HashMap::new()),
        })
    }

    fn bind(&self) -> Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| anyhow!("CUDA: {e:?}"))
    }

    fn function(&self, name: &str) -> Result<sys::CUfunction> {
        let mut f = self.functions.lock().unwrap();
        if let Some(&p) = f.get(name) {
            return Ok(p as sys::CUfunction);
        }
        let c = CString::new(name)?;
        for (_, m) in &self.modules {
            // SAFETY: a loaded module; a missing name is an error, not UB
            if let Ok(func) = unsafe { cu::module::get_function(*m, c.clone()) } {
                f.insert(name.to_string(), func as usize);
                return Ok(func);
            }
        }
        bail!("no kernel named {name} in the compiled modules")
    }
}

impl Device for CudaDevice {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn alloc(&self, bytes: usize) -> Result<u64> {
        self.bind()?;
        // SAFETY: stream-ordered allocation on our stream
        unsafe { cu::malloc_async(self.stream.cu_stream(), bytes) }
            .map_err(|e| anyhow!("allocating {bytes} bytes on the GPU: {e:?}"))
    }

    unsafe fn free(&self, ptr: u64) {
        if self.bind().is_ok() {
            let _ = cu::free_async(ptr, self.stream.cu_stream());
        }
    }

    unsafe fn upload(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.bind()?;
        cu::memcpy_htod_async(dst, src, self.stream.cu_stream())
            .map_err(|e| anyhow!("copy to the GPU: {e:?}"))?;
        // the source is the caller's memory: wait until it has been read
        self.stream
            .synchronize()
            .map_err(|e| anyhow!("copy to the GPU: {e:?}"))
    }

    unsafe fn download(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.bind()?;
        cu::memcpy_dtoh_async(dst, src, self.stream.cu_stream())
            .map_err(|e| anyhow!("copy from the GPU: {e:?}"))?;
        self.stream
            .synchronize()
            .map_err(|e| anyhow!("GPU work or copy failed: {e:?}"))
    }

    unsafe fn zero(&self, dst: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        cu::memset_d8_async(dst, 0, bytes, self.stream.cu_stream())
            .map_err(|e| anyhow!("GPU memset: {e:?}"))
    }

    unsafe fn launch(&self, name: &str, g: Grid, args: &[Arg]) -> Result<()> {
        self.bind()?;
        let f = self.function(name)?;
        let mut params: Vec<*mut std::ffi::c_void> = args.iter().map(|a| a.as_param()).collect();
        cu::launch_kernel(
            f,
            (g.grid[0], g.grid[1], g.grid[2]),
            (g.block[0], g.block[1], g.block[2]),
            0,
            self.stream.cu_stream(),
            &mut params,
        )
        .map_err(|e| anyhow!("launch: {e:?}"))
    }
}
