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
use super::{Arg, Device, GemmType, Grid};
use anyhow::{anyhow, bail, Context, Result};
use cudarc::cublas::sys as blas;
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
    /// cuBLAS, when the library is there
    blas: Option<blas::cublasHandle_t>,
    /// Stream-ordered allocation (memory pools) works here; else cuMemAlloc/cuMemFree.
    pooled: bool,
    /// streaming multiprocessors
    sms: usize,
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
        let sms = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_or(1, |n| n.max(1) as usize);
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
        // a stream of our own: the legacy default stream cannot be recorded into a graph
        let stream = ctx
            .new_stream()
            .map_err(|e| anyhow!("CUDA device {ordinal}: creating a stream: {e:?}"))?;
        // the stream-ordered allocator, kept from giving memory back to the system at every
        // synchronization (its default threshold is 0); where memory pools do not work (some
        // virtualized GPUs), plain allocations
        let pooled = ctx.has_async_alloc()
            && (|| -> Result<()> {
                // SAFETY: the device and context are live and bound
                unsafe {
                    let pool = cu::device::get_default_mem_pool(ctx.cu_device())
                        .map_err(|e| anyhow!("{e:?}"))?;
                    let mut threshold = u64::MAX;
                    sys::cuMemPoolSetAttribute(
                        pool,
                        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                        &mut threshold as *mut u64 as *mut _,
                    )
                    .result()
                    .map_err(|e| anyhow!("{e:?}"))?;
                    let p =
                        cu::malloc_async(stream.cu_stream(), 256).map_err(|e| anyhow!("{e:?}"))?;
                    cu::free_async(p, stream.cu_stream()).map_err(|e| anyhow!("{e:?}"))?;
                    Ok(())
                }
            })()
            .map_err(|e| {
                tracing::warn!("stream-ordered allocation unavailable ({e}); using cuMemAlloc")
            })
            .is_ok();
        // SAFETY: only tries to open the library
        let blas = if unsafe { blas::is_culib_present() } {
            let mut h: blas::cublasHandle_t = std::ptr::null_mut();
            // SAFETY: the context is bound; the handle is used on our stream only
            unsafe {
                blas_check(blas::cublasCreate_v2(&mut h), "cublasCreate")?;
                blas_check(
                    blas::cublasSetStream_v2(h, stream.cu_stream() as blas::cudaStream_t),
                    "cublasSetStream",
                )?;
            }
            Some(h)
        } else {
            tracing::warn!("cuBLAS (libcublas.so) was not found: bf16/f16 weights use kojo's own kernel at every batch size");
            None
        };
        Ok(CudaDevice {
            blas,
            pooled,
            sms,
            describe: format!(
                "{name}, {:.1} GiB, {sms} SMs, compute capability {major}.{minor}",
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
        // SAFETY: stream-ordered allocation on our stream, or a plain one
        unsafe {
            if self.pooled {
                cu::malloc_async(self.stream.cu_stream(), bytes)
            } else {
                cu::malloc_sync(bytes)
            }
        }
        .map_err(|e| anyhow!("allocating {bytes} bytes on the GPU: {e:?}"))
    }

    unsafe fn free(&self, ptr: u64) {
        if self.bind().is_ok() {
            // (cuMemFree waits for the device's work first)
            let _ = if self.pooled {
                cu::free_async(ptr, self.stream.cu_stream())
            } else {
                cu::free_sync(ptr)
            };
        }
    }

    unsafe fn upload(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.bind()?;
        // from pageable memory the call returns once the source has been staged, so the
        // caller may reuse it at once
        cu::memcpy_htod_async(dst, src, self.stream.cu_stream())
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

    unsafe fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.bind()?;
        cu::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream())
            .map_err(|e| anyhow!("copy on the GPU: {e:?}"))
    }

    fn synchronize(&self) -> Result<()> {
        self.bind()?;
        self.stream
            .synchronize()
            .map_err(|e| anyhow!("GPU work failed: {e:?}"))
    }

    fn multiprocessors(&self) -> usize {
        self.sms
    }

    fn begin_capture(&self) -> Result<()> {
        if !self.pooled {
            bail!("recording needs stream-ordered allocation, which this GPU lacks");
        }
        self.bind()?;
        // SAFETY: our stream (not the legacy default one, which cannot be captured)
        unsafe {
            cu::stream::begin_capture(
                self.stream.cu_stream(),
                sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
        }
        .map_err(|e| anyhow!("starting to record: {e:?}"))
    }

    fn end_capture(&self) -> Result<u64> {
        self.bind()?;
        // SAFETY: our stream; the graph is instantiated, then its template dropped
        unsafe {
            let graph = cu::stream::end_capture(self.stream.cu_stream())
                .map_err(|e| anyhow!("recording: {e:?}"))?;
            if graph.is_null() {
                bail!("recording: no graph came back");
            }
            let exec = cu::graph::instantiate(graph, sys::CUgraphInstantiate_flags(0));
            let _ = cu::graph::destroy(graph);
            let exec = exec.map_err(|e| anyhow!("instantiating a recorded step: {e:?}"))?;
            Ok(exec as u64)
        }
    }

    unsafe fn launch_graph(&self, graph: u64) -> Result<()> {
        self.bind()?;
        cu::graph::launch(graph as sys::CUgraphExec, self.stream.cu_stream())
            .map_err(|e| anyhow!("launching a recorded step: {e:?}"))
    }

    unsafe fn drop_graph(&self, graph: u64) {
        if self.bind().is_ok() {
            let _ = cu::graph::exec_destroy(graph as sys::CUgraphExec);
        }
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

    unsafe fn gemm(
        &self,
        ty: GemmType,
        n: usize,
        k: usize,
        m: usize,
        a: u64,
        b: u64,
        c: u64,
    ) -> Result<bool> {
        let Some(h) = self.blas else {
            return Ok(false);
        };
        self.bind()?;
        let dt = match ty {
            GemmType::Bf16 => blas::cudaDataType::CUDA_R_16BF,
            GemmType::F16 => blas::cudaDataType::CUDA_R_16F,
        };
        let (alpha, beta) = (1.0f32, 0.0f32);
        // row-major c[n, m] = a[n, k] b[m, k]^T is column-major c^T (m x n) = b^T' a':
        // the weights as the transposed first operand, the activations as the second
        blas_check(
            blas::cublasGemmEx(
                h,
                blas::cublasOperation_t::CUBLAS_OP_T,
                blas::cublasOperation_t::CUBLAS_OP_N,
                m as i32,
                n as i32,
                k as i32,
                &alpha as *const f32 as *const _,
                b as *const _,
                dt,
                k as i32,
                a as *const _,
                dt,
                k as i32,
                &beta as *const f32 as *const _,
                c as *mut _,
                blas::cudaDataType::CUDA_R_32F,
                m as i32,
                blas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
            ),
            "cublasGemmEx",
        )?;
        Ok(true)
    }
}

fn blas_check(s: blas::cublasStatus_t, what: &str) -> Result<()> {
    if s == blas::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(anyhow!("{what}: {s:?}"))
    }
}
