//! The GPU backend: kojo's own kernels (`kernels/*.cu`) driven through a [`Device`].
//!
//! - [`GpuBackend`]: the [`Backend`] ops as kernel launches over device buffers; weights stay in
//!   their GGUF blocks and are dequantized in registers; the KV cache is f16.
//! - [`Device`]: memory, copies and launches by kernel name. [`cuda::CudaDevice`] is the real
//!   GPU (cudarc, loaded at run time); the tests give the same backend a device whose "memory"
//!   is host memory and whose launches run the kernels as C++ on the CPU (`crates/kexec`), so
//!   every launch configuration and argument list is exercised without a GPU.
//! - [`kernels`]: the embedded kernel sources, NVRTC compilation and its disk cache.
//!
//! Errors are sticky, as CUDA's are: the first failed allocation or launch is kept, later ops
//! are skipped, and the next op that returns a `Result` (embedding, KV write, attention,
//! download) returns it.

pub mod cuda;
pub mod kernels;
pub mod lab;
pub mod selftest;

use super::{
    attention_input_by_ops, ffn_glu_by_ops, AttnParams, Backend, BatchLayout, Glu, HostWeight,
    KvShape, QkvWeights, Result, Rope, RopeLayout, Stack, StepFn, StepInputs,
};
use crate::formats::quant::dequantize_to_vec;
use crate::formats::GgmlType;
use crate::sampling::Pick;
use anyhow::{anyhow, bail, Context};
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

/// One kernel argument, as the kernel declares it.
#[derive(Debug, Clone, Copy)]
pub enum Arg {
    /// A device pointer (0 for an absent optional one).
    Ptr(u64),
    U32(u32),
    F32(f32),
}

impl Arg {
    pub fn size(&self) -> usize {
        match self {
            Arg::Ptr(_) => 8,
            Arg::U32(_) | Arg::F32(_) => 4,
        }
    }

    /// Pointer to the value, for cuLaunchKernel's `kernelParams`.
    pub fn as_param(&self) -> *mut c_void {
        match self {
            Arg::Ptr(p) => p as *const u64 as *mut c_void,
            Arg::U32(v) => v as *const u32 as *mut c_void,
            Arg::F32(v) => v as *const f32 as *mut c_void,
        }
    }
}

/// Launch geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grid {
    pub grid: [u32; 3],
    pub block: [u32; 3],
}

impl Grid {
    fn new(grid: [usize; 3], block: u32) -> Result<Grid> {
        if grid[0] > i32::MAX as usize || grid[1] > 65535 || grid[2] > 65535 {
            bail!("launch grid {grid:?} is beyond the GPU's limits");
        }
        Ok(Grid {
            grid: [grid[0] as u32, grid[1] as u32, grid[2] as u32],
            block: [block, 1, 1],
        })
    }
}

/// Element types a device's matrix library multiplies ([`Device::gemm`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmType {
    Bf16,
    F16,
}

/// Memory, copies and kernel launches on one device, in order (one stream).
pub trait Device: Send + Sync {
    /// What the device is, for logs: name, memory, architecture.
    fn describe(&self) -> String;
    /// `bytes` of device memory (not zeroed); `bytes > 0`.
    fn alloc(&self, bytes: usize) -> Result<u64>;
    /// # Safety
    /// `ptr` came from [`Device::alloc`] of this device and is not used afterwards.
    unsafe fn free(&self, ptr: u64);
    /// # Safety
    /// `dst .. dst + src.len()` lies inside one allocation of this device.
    unsafe fn upload(&self, dst: u64, src: &[u8]) -> Result<()>;
    /// Waits for every earlier op.
    ///
    /// # Safety
    /// `src .. src + dst.len()` lies inside one allocation of this device.
    unsafe fn download(&self, src: u64, dst: &mut [u8]) -> Result<()>;
    /// # Safety
    /// `dst .. dst + bytes` lies inside one allocation of this device.
    unsafe fn zero(&self, dst: u64, bytes: usize) -> Result<()>;
    /// `bytes` from `src` to `dst`, both on this device.
    ///
    /// # Safety
    /// Each range lies inside one allocation of this device; they do not overlap.
    unsafe fn copy(&self, dst: u64, src: u64, bytes: usize) -> Result<()>;
    /// Waits for every earlier op.
    fn synchronize(&self) -> Result<()>;
    /// Streaming multiprocessors (how many blocks run at once, roughly, per 2048 threads).
    fn multiprocessors(&self) -> usize;
    /// Record the work given from now on into a graph instead of running it: allocations and
    /// frees become the graph's own; uploads, downloads and waiting are errors until
    /// [`Device::end_capture`].
    fn begin_capture(&self) -> Result<()>;
    /// Stop recording: the graph, ready to launch; an error when the recording failed (then
    /// nothing of it is kept).
    fn end_capture(&self) -> Result<u64>;
    /// Run a recorded graph on the stream, in order with the other work.
    ///
    /// # Safety
    /// `graph` came from [`Device::end_capture`] of this device and was not dropped; the
    /// memory it allocates and does not free (its output) was freed since its last launch;
    /// the buffers it reads and writes outside its own are alive.
    unsafe fn launch_graph(&self, graph: u64) -> Result<()>;
    /// # Safety
    /// `graph` came from [`Device::end_capture`] and is not used afterwards.
    unsafe fn drop_graph(&self, graph: u64);
    /// Launch kernel `name`.
    ///
    /// # Safety
    /// `args` match the kernel's parameters, and every pointer among them covers what the
    /// kernel reads and writes for this geometry.
    unsafe fn launch(&self, name: &str, g: Grid, args: &[Arg]) -> Result<()>;
    /// `c[n, m] = a[n, k] . b[m, k]^T`, `a` and `b` of `ty`, `c` f32, accumulated in f32, by the
    /// device's matrix library (cuBLAS); `Ok(false)` when it has none.
    ///
    /// # Safety
    /// `a`, `b` and `c` hold `n x k`, `m x k` and `n x m` elements.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        &self,
        ty: GemmType,
        n: usize,
        k: usize,
        m: usize,
        a: u64,
        b: u64,
        c: u64,
    ) -> Result<bool>;
}

/// A device allocation, freed on drop.
pub struct Buf {
    ptr: u64,
    bytes: usize,
    dev: Arc<dyn Device>,
    /// cleared when the buffer is freed (a recorded step's output: the step may be launched
    /// again only after)
    held: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl Buf {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        if self.ptr != 0 {
            // SAFETY: allocated by this device; the buffer owns it
            unsafe { self.dev.free(self.ptr) }
        }
        if let Some(h) = &self.held {
            h.store(false, std::sync::atomic::Ordering::Release);
        }
    }
}

/// `[rows, cols]` f32 on the device.
pub struct GpuTensor {
    pub buf: Buf,
    pub rows: usize,
    pub cols: usize,
}

/// A weight on the device: a matrix in its file's type, or a vector as f32.
pub struct GpuWeight {
    pub buf: Buf,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub row_bytes: usize,
}

/// The f16 KV cache: per layer K and V of `[num_blocks * block_size, n_kv_heads * head_dim]`.
pub struct GpuKvCache {
    /// as asked for, plus one spare block at the end (the padding of recorded steps)
    pub shape: KvShape,
    spare: u32,
    /// unique over the process: recorded steps are keyed by it
    id: u64,
    k: Vec<Buf>,
    v: Vec<Buf>,
}

/// The kernels' name for a weight type, when they take it.
pub fn kernel_type(ty: GgmlType) -> Option<&'static str> {
    use GgmlType::*;
    Some(match ty {
        F32 => "f32",
        F16 => "f16",
        BF16 => "bf16",
        Q4_0 => "q4_0",
        Q4_1 => "q4_1",
        Q5_0 => "q5_0",
        Q5_1 => "q5_1",
        Q8_0 => "q8_0",
        Q4K => "q4_k",
        Q5K => "q5_k",
        Q6K => "q6_k",
        _ => return None,
    })
}

/// Bytes per row of a matrix weight the kernels take (its type, shape and size checked).
fn matrix_row_bytes(w: &HostWeight) -> Result<usize> {
    let (rows, cols) = (w.rows(), w.cols());
    if kernel_type(w.ty).is_none() {
        bail!(
            "tensor {}: type {} is not supported on the GPU yet",
            w.name,
            w.ty.name()
        );
    }
    if cols % 32 != 0 {
        bail!("tensor {}: rows of {cols} are not a multiple of 32 (the GPU kernels read 32 at a time)", w.name);
    }
    let bs = w.ty.block_size().unwrap_or(1);
    if cols % bs != 0 {
        bail!(
            "tensor {}: row of {cols} is not whole {} blocks",
            w.name,
            w.ty.name()
        );
    }
    let row_bytes = cols / bs * w.ty.type_size().unwrap_or(0);
    if w.data.len() != rows * row_bytes {
        bail!(
            "tensor {}: {} bytes for {rows} rows of {row_bytes}",
            w.name,
            w.data.len()
        );
    }
    Ok(row_bytes)
}

/// The matrix library's type for weights of `ty`, if it takes them.
fn gemm_type(ty: GgmlType) -> Option<GemmType> {
    match ty {
        GgmlType::BF16 => Some(GemmType::Bf16),
        GgmlType::F16 => Some(GemmType::F16),
        _ => None,
    }
}

/// The kernels' id of a gated activation.
fn glu_id(act: Glu) -> u32 {
    match act {
        Glu::Silu => 0,
        Glu::GeluTanh => 1,
    }
}

/// The fewest context positions an attention split takes (see kernels/attention.cu).
const ATTN_MIN_CHUNK: usize = 64;

/// How many splits decode attention divides each token's context into (evenly, in the
/// kernel), for a batch whose longest context is `longest`. `blocks` is the launch's block count
/// without splitting (tokens x KV heads x head groups); splits are added until about two blocks
/// per multiprocessor, so a batch of a few long sequences still fills the GPU, but the longest
/// context's splits keep at least ATTN_MIN_CHUNK positions.
pub fn attn_splits(longest: usize, blocks: usize, sms: usize) -> usize {
    let want = (2 * sms).div_ceil(blocks.max(1));
    want.clamp(1, (longest / ATTN_MIN_CHUNK).max(1))
}

/// Query heads per attention block.
const ATTN_MAXG: usize = 8;
/// Tokens per matmul warp (MM_TOKENS in kernels/matmul.cu).
const MM_TOKENS: usize = 4;
/// From this many tokens, bf16/f16 weights go to the device's matrix library (activations
/// rounded to the weights' type); below, to kojo's kernel in f32.
pub const GEMM_MIN_TOKENS: usize = 16;

/// A batch layout as the kernels read it, kept while the same layout comes back (every layer
/// of a step). Its buffers are input slots ([`GpuBackend::put_with`]): stable addresses.
struct DeviceLayout {
    key: (Vec<u32>, Vec<usize>, Vec<Vec<u32>>, Vec<u32>),
    positions: u64,
    token_seq: u64,
    tables: u64,
    /// the tables' row width: the longest table rounded up to a power of two (so that it, and
    /// with it a recorded step, changes rarely as contexts grow)
    max_blocks: usize,
    slots: u64,
}

/// A device buffer of per-step inputs at a stable address: rewritten in place while what it
/// holds fits, reallocated (and the backend's generation bumped) when it grows.
struct Slot {
    buf: Buf,
    /// what the content was made from
    key: Vec<u8>,
    /// bytes of content (0: the kernels get a null pointer)
    len: usize,
}

#[derive(Default)]
struct Inputs {
    slots: std::collections::HashMap<String, Slot>,
    /// bumped whenever a slot moves: recorded steps from before are stale
    generation: u64,
    /// a step is being recorded: inputs must not change (an upload cannot be recorded)
    frozen: bool,
    /// attn_split's completion counters: zero between launches (each launch resets those it
    /// used), at a stable address
    counters: Option<Buf>,
}

/// A recorded decode step (a CUDA graph) for one bucket.
struct Graph {
    handle: u64,
    /// its last output is still alive
    held: Arc<std::sync::atomic::AtomicBool>,
    /// the logits, allocated by the graph and freed by their tensor after each launch
    out: u64,
    out_bytes: usize,
    cols: usize,
    generation: u64,
}

enum GraphState {
    /// ran once unrecorded (the warm-up: libraries initialized, kernels loaded)
    Seen,
    Ready(Graph),
    /// recording failed: this bucket runs op by op
    Unrecordable,
}

/// What a recorded step depends on besides its inputs' content: the padded batch size, the
/// block-table width, the KV cache's id (and so the model).
type GraphKey = (usize, usize, u64);

/// Decode batches up to this size are recorded as graphs, padded to a bucket.
pub const GRAPH_MAX_BATCH: usize = 256;

/// The batch size a decode batch of `n` is padded to: the next power of two, except that a
/// batch under GEMM_MIN_TOKENS stays under it (so padding never moves bf16/f16 projections from
/// kojo's f32 kernel to the matrix library, which rounds the activations).
pub fn graph_bucket(n: usize) -> usize {
    let b = n.next_power_of_two();
    if n < GEMM_MIN_TOKENS {
        b.min(GEMM_MIN_TOKENS - 1)
    } else {
        b
    }
}

/// Ends a recording that did not finish (a panic in an op): the stream and the inputs are
/// usable again.
struct RecordingGuard<'a> {
    be: &'a GpuBackend,
    active: bool,
}

impl Drop for RecordingGuard<'_> {
    fn drop(&mut self) {
        if self.active {
            if let Ok(h) = self.be.dev.end_capture() {
                // SAFETY: just made, never launched
                unsafe { self.be.dev.drop_graph(h) };
            }
            let mut inputs = self.be.inputs.lock().unwrap_or_else(|e| e.into_inner());
            inputs.frozen = false;
        }
    }
}

pub struct GpuBackend {
    dev: Arc<dyn Device>,
    error: Mutex<Option<String>>,
    layout: Mutex<Option<DeviceLayout>>,
    inputs: Mutex<Inputs>,
    graphs: Mutex<std::collections::HashMap<GraphKey, GraphState>>,
    /// record decode steps as graphs and replay them
    use_graphs: bool,
    /// the device could not start a recording: never pad or record again
    cannot_record: std::sync::atomic::AtomicBool,
    /// kernels and library calls submitted (recorded ones count when recorded)
    launches: std::sync::atomic::AtomicUsize,
    /// the kept error is one step's (out of memory), not the device's
    step_only: std::sync::atomic::AtomicBool,
}

impl GpuBackend {
    pub fn new(dev: Arc<dyn Device>) -> Self {
        GpuBackend {
            dev,
            error: Mutex::new(None),
            layout: Mutex::new(None),
            inputs: Mutex::new(Inputs::default()),
            graphs: Mutex::new(std::collections::HashMap::new()),
            use_graphs: std::env::var("KOJO_CUDA_GRAPHS").map_or(true, |v| v != "0"),
            cannot_record: std::sync::atomic::AtomicBool::new(false),
            launches: std::sync::atomic::AtomicUsize::new(0),
            step_only: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// GPU `ordinal` through CUDA, its kernels compiled (or taken from the cache).
    pub fn cuda(ordinal: usize, kernel_dir: Option<&std::path::Path>) -> Result<Self> {
        let dev = cuda::CudaDevice::open(ordinal, kernel_dir)?;
        tracing::info!("CUDA device {ordinal}: {}", dev.describe());
        Ok(GpuBackend::new(Arc::new(dev)))
    }

    /// Run decode steps op by op, never recorded (`KOJO_CUDA_GRAPHS=0` does this too).
    pub fn without_graphs(mut self) -> Self {
        self.use_graphs = false;
        self
    }

    /// Kernels and matrix-library calls submitted so far (a step replayed from a recording
    /// counts nothing: its launches were counted when recorded).
    pub fn launch_count(&self) -> usize {
        self.launches.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn device(&self) -> &Arc<dyn Device> {
        &self.dev
    }

    /// The first error since the backend was made, if any.
    pub fn check(&self) -> Result<()> {
        match &*self.error.lock().unwrap() {
            Some(e) => Err(anyhow!("GPU: {e}")),
            None => Ok(()),
        }
    }

    fn failed(&self) -> bool {
        self.error.lock().unwrap().is_some()
    }

    fn fail(&self, e: anyhow::Error) {
        self.fail_as(e, false);
    }

    /// Keep the first error; `step_only`: it ends the current step, not the device (an
    /// allocation that did not fit), so [`Backend::recover`] clears it.
    fn fail_as(&self, e: anyhow::Error, step_only: bool) {
        let mut err = self.error.lock().unwrap();
        if err.is_none() {
            tracing::error!("GPU: {e:#}");
            *err = Some(format!("{e:#}"));
            self.step_only
                .store(step_only, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// A copy's error, kept as the device's (fatal, as a launch's: a download also reports
    /// the faults of the work before it), and returned.
    fn copy_failed(&self, e: anyhow::Error) -> anyhow::Error {
        let returned = anyhow!("GPU: {e:#}");
        self.fail(e);
        returned
    }

    fn try_alloc(&self, bytes: usize) -> Result<Buf> {
        let ptr = if bytes == 0 {
            0
        } else {
            self.dev.alloc(bytes)?
        };
        Ok(Buf {
            ptr,
            bytes,
            dev: self.dev.clone(),
            held: None,
        })
    }

    /// A buffer, or a null one after recording the error.
    fn alloc(&self, bytes: usize) -> Buf {
        if !self.failed() {
            match self.try_alloc(bytes) {
                Ok(b) => return b,
                Err(e) => self.fail_as(e, true),
            }
        }
        Buf {
            ptr: 0,
            bytes: 0,
            dev: self.dev.clone(),
            held: None,
        }
    }

    fn tensor(&self, rows: usize, cols: usize) -> GpuTensor {
        GpuTensor {
            buf: self.alloc(rows * cols * 4),
            rows,
            cols,
        }
    }

    fn upload_bytes(&self, data: &[u8]) -> Result<Buf> {
        let b = self.try_alloc(data.len())?;
        if !data.is_empty() {
            // SAFETY: `b` holds `data.len()` bytes
            unsafe { self.dev.upload(b.ptr, data) }.map_err(|e| self.copy_failed(e))?;
        }
        Ok(b)
    }

    fn upload_u32(&self, v: &[u32]) -> Result<Buf> {
        self.upload_bytes(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
    }

    fn upload_f32(&self, v: &[f32]) -> Result<Buf> {
        self.upload_bytes(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
    }

    /// Launch unless an error came before (recording this one if it fails). An empty grid is
    /// nothing to do.
    ///
    /// # Safety
    /// As [`Device::launch`].
    unsafe fn launch(&self, name: &str, grid: [usize; 3], block: u32, args: &[Arg]) {
        if self.failed() || grid.contains(&0) {
            return;
        }
        self.launches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let r = Grid::new(grid, block).and_then(|g| self.dev.launch(name, g, args));
        if let Err(e) = r.with_context(|| format!("kernel {name}")) {
            self.fail(e);
        }
    }

    /// The input slot `name` holding `make()`, which depends only on `key`: rewritten when
    /// the key differs from the last one. An empty content is a null pointer.
    fn put_with(&self, name: &str, key: &[u8], make: impl FnOnce() -> Vec<u8>) -> Result<u64> {
        let mut inputs = self.inputs.lock().unwrap();
        if let Some(s) = inputs.slots.get(name) {
            if s.key == key {
                return Ok(if s.len == 0 { 0 } else { s.buf.ptr });
            }
        }
        if inputs.frozen {
            // a recording's failure (sticky, so it is taken for one), not the step's
            let e = anyhow!("step input {name} changed while the step was being recorded");
            self.fail(anyhow!("{e}"));
            return Err(e);
        }
        let data = make();
        if data.is_empty() {
            // keep the buffer (for a later, non-empty content); the kernels get null
            let dev = self.dev.clone();
            let s = inputs
                .slots
                .entry(name.to_string())
                .or_insert_with(|| Slot {
                    buf: Buf {
                        ptr: 0,
                        bytes: 0,
                        dev,
                        held: None,
                    },
                    key: Vec::new(),
                    len: 0,
                });
            s.key = key.to_vec();
            s.len = 0;
            return Ok(0);
        }
        if let Some(s) = inputs.slots.get_mut(name) {
            if s.buf.bytes >= data.len() {
                // SAFETY: the slot's buffer holds at least data.len() bytes; the copy is ordered
                // after the work already queued that reads the old content
                unsafe { self.dev.upload(s.buf.ptr, &data) }.map_err(|e| self.copy_failed(e))?;
                s.key = key.to_vec();
                s.len = data.len();
                return Ok(s.buf.ptr);
            }
        }
        let buf = self.try_alloc(data.len().next_power_of_two().max(256))?;
        // SAFETY: as above
        unsafe { self.dev.upload(buf.ptr, &data) }.map_err(|e| self.copy_failed(e))?;
        let ptr = buf.ptr;
        inputs.generation += 1;
        inputs.slots.insert(
            name.to_string(),
            Slot {
                buf,
                key: key.to_vec(),
                len: data.len(),
            },
        );
        Ok(ptr)
    }

    /// At least `n` zeroed attention counters (see attn_split).
    fn attn_counters(&self, n: usize) -> Result<u64> {
        let mut inputs = self.inputs.lock().unwrap();
        if let Some(b) = &inputs.counters {
            if b.bytes >= n * 4 {
                return Ok(b.ptr);
            }
        }
        if inputs.frozen {
            let e = anyhow!("attention counters grew while a step was being recorded");
            self.fail(anyhow!("{e}"));
            return Err(e);
        }
        let bytes = (n * 4).next_power_of_two().max(1024);
        let b = self.try_alloc(bytes)?;
        // SAFETY: the whole buffer
        unsafe { self.dev.zero(b.ptr, bytes) }.map_err(|e| self.copy_failed(e))?;
        let ptr = b.ptr;
        inputs.counters = Some(b);
        inputs.generation += 1;
        Ok(ptr)
    }

    /// [`Self::put_with`] of u32 values, keyed by themselves.
    fn put_u32(&self, name: &str, v: &[u32]) -> Result<u64> {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.put_with(name, &bytes, || bytes.clone())
    }

    /// The device copy of `layout` (input slots), rewritten when it differs from the last one.
    fn with_layout<T>(
        &self,
        layout: &BatchLayout,
        f: impl FnOnce(&DeviceLayout) -> Result<T>,
    ) -> Result<T> {
        let key = (
            layout.positions.to_vec(),
            layout.seq_starts.to_vec(),
            layout.block_tables.iter().map(|t| t.to_vec()).collect(),
            layout.slots.to_vec(),
        );
        let mut cached = self.layout.lock().unwrap();
        if cached.as_ref().map(|c| &c.key) != Some(&key) {
            let n = layout.positions.len();
            let num_seqs = layout.seq_starts.len().saturating_sub(1);
            let mut token_seq = vec![0u32; n];
            for s in 0..num_seqs {
                let (a, b) = (layout.seq_starts[s], layout.seq_starts[s + 1]);
                if a > b || b > n {
                    bail!("batch layout: sequence {s} spans {a}..{b} of {n} tokens");
                }
                token_seq[a..b].iter_mut().for_each(|x| *x = s as u32);
            }
            let max_blocks = layout
                .block_tables
                .iter()
                .map(|t| t.len())
                .max()
                .unwrap_or(0)
                .max(1)
                .next_power_of_two();
            let mut tables = vec![0u32; num_seqs.max(1) * max_blocks];
            for (s, t) in layout.block_tables.iter().enumerate() {
                tables[s * max_blocks..s * max_blocks + t.len()].copy_from_slice(t);
            }
            // (a failure leaves no layout cached)
            *cached = None;
            *cached = Some(DeviceLayout {
                positions: self.put_u32("positions", layout.positions)?,
                token_seq: self.put_u32("token_seq", &token_seq)?,
                tables: self.put_u32("tables", &tables)?,
                max_blocks,
                slots: self.put_u32("slots", layout.slots)?,
                key,
            });
        }
        f(cached.as_ref().unwrap())
    }

    /// The batch's rows for the two attention kernels, in input slots: decode tokens (the
    /// only token of their sequence in the batch) for attn_split, tiles of up to `tile_tokens`
    /// consecutive prefill tokens for attn_prefill. `(decode tokens, tiles, decode list,
    /// tile starts, tile lengths)`.
    fn attention_lists(
        &self,
        layout: &BatchLayout,
        tile_tokens: usize,
    ) -> Result<(usize, usize, u64, u64, u64)> {
        let (mut decode, mut starts, mut lens) = (Vec::new(), Vec::new(), Vec::new());
        for w in layout.seq_starts.windows(2) {
            let (a, b) = (w[0], w[1]);
            if b - a == 1 {
                decode.push(a as u32);
                continue;
            }
            for t in (a..b).step_by(tile_tokens.max(1)) {
                starts.push(t as u32);
                lens.push((b - t).min(tile_tokens) as u32);
            }
        }
        Ok((
            decode.len(),
            starts.len(),
            self.put_u32("decode", &decode)?,
            self.put_u32("tile_start", &starts)?,
            self.put_u32("tile_len", &lens)?,
        ))
    }

    /// Device pointer of the `[n, n_rot / 2]` (cos, sin) table: one input slot per RoPE
    /// (base, scale, dimensions, factors), rewritten when the positions change.
    fn rope_table(&self, positions: &[u32], rope: &Rope, factors: Option<&[f32]>) -> Result<u64> {
        let mut name = format!(
            "rope {:x} {:x} {}",
            rope.base.to_bits(),
            rope.freq_scale.to_bits(),
            rope.n_rot
        );
        if let Some(f) = factors {
            let h = f.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, x| {
                (h ^ x.to_bits() as u64).wrapping_mul(0x100_0000_01b3)
            });
            name += &format!(" {h:x}");
        }
        let key: Vec<u8> = positions.iter().flat_map(|p| p.to_le_bytes()).collect();
        self.put_with(&name, &key, || {
            super::rope_table(positions, rope, factors)
                .into_iter()
                .flat_map(|(c, s)| [c, s])
                .flat_map(|x| x.to_le_bytes())
                .collect()
        })
    }

    fn check_kv_write(
        cache: &GpuKvCache,
        k: &GpuTensor,
        v: &GpuTensor,
        layout: &BatchLayout,
    ) -> Result<()> {
        let w = cache.shape.n_kv_heads * cache.shape.head_dim;
        if k.cols != w || v.cols != w || k.rows != layout.slots.len() || v.rows != k.rows {
            bail!(
                "write_kv: K {}x{} / V {}x{} for {} slots of width {w}",
                k.rows,
                k.cols,
                v.rows,
                v.cols,
                layout.slots.len()
            );
        }
        let capacity = cache.shape.num_blocks * cache.shape.block_size;
        if let Some(&s) = layout.slots.iter().find(|&&s| s as usize >= capacity) {
            bail!("write_kv: slot {s} beyond the cache's {capacity}");
        }
        Ok(())
    }

    /// Store K (rotated first when `cs` is a RoPE table) and V at the layout's slots.
    #[allow(clippy::too_many_arguments)]
    fn store_kv(
        &self,
        cache: &mut GpuKvCache,
        layer: usize,
        k: &GpuTensor,
        v: &GpuTensor,
        layout: &BatchLayout,
        cs: u64,
        hd: usize,
        rope: Option<&Rope>,
    ) -> Result<()> {
        self.check()?;
        Self::check_kv_write(cache, k, v, layout)?;
        let slots = self.with_layout(layout, |l| Ok(l.slots))?;
        let (half, interleaved) = rope.map_or((0, 0), |r| {
            (r.n_rot / 2, (r.layout == RopeLayout::Interleaved) as u32)
        });
        // SAFETY: shapes checked above; slots inside the cache
        unsafe {
            self.launch(
                "write_kv",
                [k.rows, 1, 1],
                128,
                &[
                    Arg::Ptr(cache.k[layer].ptr),
                    Arg::Ptr(cache.v[layer].ptr),
                    Arg::Ptr(k.buf.ptr),
                    Arg::Ptr(v.buf.ptr),
                    Arg::Ptr(slots),
                    Arg::Ptr(cs),
                    Arg::U32(k.cols as u32),
                    Arg::U32(hd as u32),
                    Arg::U32(half as u32),
                    Arg::U32(interleaved),
                ],
            )
        };
        self.check()
    }

    /// Token ids of each row's largest logit (lowest id among equals).
    fn argmax_kernel(&self, logits: &GpuTensor) -> Result<Vec<u32>> {
        let ids = self.alloc(logits.rows * 4);
        // SAFETY: one id per row; rows of `cols` logits
        unsafe {
            self.launch(
                "argmax_rows",
                [logits.rows, 1, 1],
                256,
                &[
                    Arg::Ptr(ids.ptr),
                    Arg::Ptr(logits.buf.ptr),
                    Arg::U32(logits.cols as u32),
                ],
            )
        };
        self.download_u32(&ids, logits.rows)
    }

    /// One token per row from its top k (1..=64) candidates (greedy rows as k = 1).
    fn top_k_kernel(&self, logits: &GpuTensor, picks: &[Pick]) -> Result<Vec<u32>> {
        let f = |g: fn(&Pick) -> f32| -> Result<Buf> {
            self.upload_f32(&picks.iter().map(g).collect::<Vec<f32>>())
        };
        let ks: Vec<u32> = picks
            .iter()
            .map(|p| if p.is_greedy() { 1 } else { p.top_k as u32 })
            .collect();
        let ks = self.upload_u32(&ks)?;
        let temps = f(|p| if p.is_greedy() { 1.0 } else { p.temperature })?;
        let top_ps = f(|p| p.top_p)?;
        let min_ps = f(|p| p.min_p)?;
        let us = f(|p| p.u as f32)?;
        let ids = self.alloc(logits.rows * 4);
        // SAFETY: one id and one of each parameter per row; rows of `cols` logits
        unsafe {
            self.launch(
                "sample_top_k",
                [logits.rows, 1, 1],
                256,
                &[
                    Arg::Ptr(ids.ptr),
                    Arg::Ptr(logits.buf.ptr),
                    Arg::U32(logits.cols as u32),
                    Arg::Ptr(ks.ptr),
                    Arg::Ptr(temps.ptr),
                    Arg::Ptr(top_ps.ptr),
                    Arg::Ptr(min_ps.ptr),
                    Arg::Ptr(us.ptr),
                ],
            )
        };
        self.download_u32(&ids, logits.rows)
    }

    fn download_u32(&self, b: &Buf, n: usize) -> Result<Vec<u32>> {
        self.check()?;
        let mut bytes = vec![0u8; n * 4];
        if n > 0 {
            // SAFETY: `b` holds n u32
            unsafe { self.dev.download(b.ptr, &mut bytes) }.map_err(|e| self.copy_failed(e))?;
        }
        Ok(bytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect())
    }

    /// `out = x @ w^T (+ bias)` through the device's matrix library; false when it has none
    /// (nothing was done).
    fn library_gemm(
        &self,
        gt: GemmType,
        x: &GpuTensor,
        w: &GpuWeight,
        bias: Option<&GpuWeight>,
        out: &GpuTensor,
    ) -> bool {
        let (n, k, m) = (x.rows, x.cols, w.rows);
        let a = self.alloc(n * k * 2);
        self.elementwise(
            "to_half",
            n * k,
            &[
                Arg::Ptr(a.ptr),
                Arg::Ptr(x.buf.ptr),
                Arg::U32((n * k) as u32),
                Arg::U32((gt == GemmType::Bf16) as u32),
            ],
        );
        if self.failed() {
            return true;
        }
        self.launches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: a [n, k] and w [m, k] of the type, out [n, m] f32
        match unsafe { self.dev.gemm(gt, n, k, m, a.ptr, w.buf.ptr, out.buf.ptr) } {
            Ok(false) => false,
            Ok(true) => {
                if let Some(b) = bias {
                    self.elementwise(
                        "add_bias",
                        n * m,
                        &[
                            Arg::Ptr(out.buf.ptr),
                            Arg::Ptr(b.buf.ptr),
                            Arg::U32((n * m) as u32),
                            Arg::U32(m as u32),
                        ],
                    );
                }
                true
            }
            Err(e) => {
                self.fail(e.context("GEMM"));
                true
            }
        }
    }

    /// `out (+)= P(x) @ w^T (+ bias)`, `P(x)` = RMSNorm(x) by `norm` when given, else x;
    /// added into `out` when `accumulate`.
    fn project(
        &self,
        out: &GpuTensor,
        accumulate: bool,
        x: &GpuTensor,
        w: &GpuWeight,
        bias: Option<&GpuWeight>,
        norm: Option<(&GpuWeight, f32)>,
    ) {
        assert_eq!(
            x.cols, w.cols,
            "matmul: x has {} columns, weight {}",
            x.cols, w.cols
        );
        assert_eq!(
            (out.rows, out.cols),
            (x.rows, w.rows),
            "matmul: output shape"
        );
        if let Some(b) = bias {
            assert_eq!(
                b.rows * b.cols,
                w.rows,
                "matmul: bias of {} for {} rows",
                b.cols,
                w.rows
            );
        }
        if let Some((nw, _)) = norm {
            assert_eq!(
                nw.cols, x.cols,
                "matmul: a norm of {} over rows of {}",
                nw.cols, x.cols
            );
        }
        if let Some(gt) = gemm_type(w.ty).filter(|_| x.rows >= GEMM_MIN_TOKENS && !self.failed()) {
            // the library takes plain inputs and overwrites its output
            let h = norm.map(|(nw, eps)| self.norm(x, None, nw, eps));
            let xin = h.as_ref().unwrap_or(x);
            let tmp = accumulate.then(|| self.tensor(out.rows, out.cols));
            if self.library_gemm(gt, xin, w, bias, tmp.as_ref().unwrap_or(out)) {
                if let Some(t) = tmp {
                    self.add_into(out, &t);
                }
                return;
            }
        }
        let name = format!("matmul_{}", kernel_type(w.ty).unwrap());
        let (nw, eps) = norm.map_or((0, 0.0), |(nw, eps)| (nw.buf.ptr, eps));
        // SAFETY: x [n, k], w [m, k] of row_bytes, bias [m], norm [k], out [n, m]
        unsafe {
            self.launch(
                &name,
                [w.rows.div_ceil(4), x.rows.div_ceil(MM_TOKENS), 1],
                128,
                &[
                    Arg::Ptr(out.buf.ptr),
                    Arg::Ptr(x.buf.ptr),
                    Arg::Ptr(w.buf.ptr),
                    Arg::Ptr(bias.map_or(0, |b| b.buf.ptr)),
                    Arg::Ptr(nw),
                    Arg::U32(x.rows as u32),
                    Arg::U32(x.cols as u32),
                    Arg::U32(w.rows as u32),
                    Arg::U32(w.row_bytes as u32),
                    Arg::F32(eps),
                    Arg::U32(accumulate as u32),
                ],
            )
        };
    }

    /// `out += x`, element-wise (the device writes through the shared handle).
    fn add_into(&self, out: &GpuTensor, x: &GpuTensor) {
        assert_eq!((out.rows, out.cols), (x.rows, x.cols));
        let n = x.rows * x.cols;
        self.elementwise(
            "add_inplace",
            n,
            &[
                Arg::Ptr(out.buf.ptr),
                Arg::Ptr(x.buf.ptr),
                Arg::U32(n as u32),
            ],
        );
    }

    /// RMSNorm of every `w.cols`-wide segment of `r` (after `r += x` when `x` is given).
    fn norm(&self, r: &GpuTensor, x: Option<&GpuTensor>, w: &GpuWeight, eps: f32) -> GpuTensor {
        assert_eq!(
            r.cols % w.cols,
            0,
            "rms_norm: {} columns in segments of {}",
            r.cols,
            w.cols
        );
        let out = self.tensor(r.rows, r.cols);
        // SAFETY: r, x and out hold rows x cols; w holds one segment
        unsafe {
            self.launch(
                "rms_norm",
                [r.rows * r.cols / w.cols, 1, 1],
                128,
                &[
                    Arg::Ptr(out.buf.ptr),
                    Arg::Ptr(r.buf.ptr),
                    Arg::Ptr(x.map_or(0, |x| x.buf.ptr)),
                    Arg::Ptr(w.buf.ptr),
                    Arg::U32(w.cols as u32),
                    Arg::F32(eps),
                ],
            )
        };
        out
    }

    fn elementwise(&self, name: &str, n: usize, args: &[Arg]) {
        // SAFETY: callers pass n-element buffers
        unsafe { self.launch(name, [n.div_ceil(256), 1, 1], 256, args) }
    }
}

impl Drop for GpuBackend {
    fn drop(&mut self) {
        for (_, state) in self.graphs.lock().unwrap().drain() {
            if let GraphState::Ready(g) = state {
                // SAFETY: this backend's graph, not used again
                unsafe { self.dev.drop_graph(g.handle) };
            }
        }
    }
}

/// The most candidates `sample_top_k` keeps (`SAMPLE_MAX_K` in kernels/sampling.cu; a test
/// reads it there).
pub const SAMPLE_MAX_K: usize = 64;

impl Backend for GpuBackend {
    type Tensor = GpuTensor;
    type Weight = GpuWeight;
    type KvCache = GpuKvCache;

    fn recover(&self) -> std::result::Result<(), String> {
        let mut err = self.error.lock().unwrap();
        match &*err {
            None => Ok(()),
            Some(_) if self.step_only.load(std::sync::atomic::Ordering::Relaxed) => {
                *err = None;
                Ok(())
            }
            Some(e) => Err(format!("GPU: {e}")),
        }
    }

    fn load_weight(&self, w: &HostWeight) -> Result<GpuWeight> {
        let (rows, cols) = (w.rows(), w.cols());
        if rows == 1 || w.dims.len() == 1 {
            // vectors (norm weights, biases) are read element-wise: f32
            let v = dequantize_to_vec(w.ty, &w.data, rows * cols)
                .with_context(|| format!("tensor {}", w.name))?;
            return Ok(GpuWeight {
                buf: self.upload_f32(&v)?,
                ty: GgmlType::F32,
                rows,
                cols,
                row_bytes: cols * 4,
            });
        }
        let row_bytes = matrix_row_bytes(w)?;
        Ok(GpuWeight {
            buf: self
                .upload_bytes(&w.data)
                .with_context(|| format!("uploading tensor {}", w.name))?,
            ty: w.ty,
            rows,
            cols,
            row_bytes,
        })
    }

    fn run_step(
        &self,
        kv: &mut GpuKvCache,
        step: &StepInputs,
        run: &mut StepFn<Self>,
    ) -> Result<GpuTensor> {
        let n = step.tokens.len();
        // decoding only: one token per sequence, every row's logits, in order
        let decode = n > 0
            && step.layout.seq_starts.len() == n + 1
            && step
                .layout
                .seq_starts
                .iter()
                .enumerate()
                .all(|(i, &s)| s == i)
            && step.logit_rows.len() == n
            && step.logit_rows.iter().enumerate().all(|(i, &r)| r == i)
            && step.layout.block_tables.len() == n;
        use std::sync::atomic::Ordering;
        if !self.use_graphs
            || self.cannot_record.load(Ordering::Relaxed)
            || !decode
            || n > GRAPH_MAX_BATCH
            || self.failed()
        {
            return run(kv, step);
        }
        // recorded steps of another KV cache (a finished session) go: theirs is gone
        {
            let mut graphs = self.graphs.lock().unwrap();
            let stale: Vec<GraphKey> = graphs.keys().filter(|k| k.2 != kv.id).copied().collect();
            for k in stale {
                if let Some(GraphState::Ready(g)) = graphs.remove(&k) {
                    // SAFETY: this backend's graph, not launched again
                    unsafe { self.dev.drop_graph(g.handle) };
                }
            }
        }
        // pad to the bucket: the extra sequences are one token at position 0 in the cache's
        // spare block, whose logits nobody reads
        let bucket = graph_bucket(n);
        let bs = kv.shape.block_size as u32;
        let mut tokens = step.tokens.to_vec();
        let mut positions = step.layout.positions.to_vec();
        let mut slots = step.layout.slots.to_vec();
        let mut tables = step.layout.block_tables.to_vec();
        let spare = [kv.spare];
        tokens.resize(bucket, 0);
        positions.resize(bucket, 0);
        slots.resize(bucket, kv.spare * bs);
        tables.resize(bucket, &spare);
        let starts: Vec<usize> = (0..=bucket).collect();
        let rows: Vec<usize> = (0..bucket).collect();
        let padded = StepInputs {
            tokens: &tokens,
            layout: BatchLayout {
                positions: &positions,
                seq_starts: &starts,
                block_tables: &tables,
                slots: &slots,
            },
            logit_rows: &rows,
            ropes: step.ropes,
        };
        // the step's inputs into their slots, as the ops will look them up
        let width = self.with_layout(&padded.layout, |l| Ok(l.max_blocks))?;
        self.put_u32("ids", &tokens)?;
        // (decoding only: no prefill tiles, whatever their size)
        self.attention_lists(&padded.layout, 1)?;
        for (rope, factors) in padded.ropes {
            self.rope_table(&positions, rope, *factors)?;
        }
        let generation = self.inputs.lock().unwrap().generation;
        let key: GraphKey = (bucket, width, kv.id);
        let state = self.graphs.lock().unwrap().remove(&key);
        let put_back = |st: GraphState| {
            self.graphs.lock().unwrap().insert(key, st);
        };
        let truncate = |mut t: GpuTensor| {
            t.rows = n;
            t
        };
        match state {
            Some(GraphState::Ready(g)) if g.generation == generation => {
                if g.held.load(Ordering::Acquire) {
                    // the last step's logits are still alive (a caller kept them): this one
                    // runs op by op rather than launch over them
                    put_back(GraphState::Ready(g));
                    return run(kv, step);
                }
                // SAFETY: a graph of this backend, its inputs in place; its last output was
                // freed with its tensor
                let launched = unsafe { self.dev.launch_graph(g.handle) };
                if let Err(e) = launched {
                    put_back(GraphState::Ready(g));
                    self.fail(e.context("launching a recorded step"));
                    return Err(self.check().unwrap_err());
                }
                g.held.store(true, Ordering::Release);
                let out = GpuTensor {
                    buf: Buf {
                        ptr: g.out,
                        bytes: g.out_bytes,
                        dev: self.dev.clone(),
                        held: Some(g.held.clone()),
                    },
                    rows: n,
                    cols: g.cols,
                };
                put_back(GraphState::Ready(g));
                return Ok(out);
            }
            Some(GraphState::Ready(g)) => {
                // recorded before an input slot moved: record again. (Its last output, if
                // still alive, stays valid: graph memory outlives the graph.)
                // SAFETY: not launched again
                unsafe { self.dev.drop_graph(g.handle) };
            }
            None => {
                // the first step of this shape runs as it is (a warm-up)
                put_back(GraphState::Seen);
                return run(kv, &padded).map(truncate);
            }
            Some(GraphState::Unrecordable) => {
                put_back(GraphState::Unrecordable);
                return run(kv, step);
            }
            Some(GraphState::Seen) => {}
        }
        // record
        if let Err(e) = self.dev.begin_capture() {
            tracing::warn!("decode steps are not recorded on this device: {e:#}");
            self.cannot_record.store(true, Ordering::Relaxed);
            return run(kv, step);
        }
        self.inputs.lock().unwrap().frozen = true;
        let mut guard = RecordingGuard {
            be: self,
            active: true,
        };
        let ran = run(kv, &padded);
        guard.active = false;
        drop(guard);
        let ended = self.dev.end_capture();
        self.inputs.lock().unwrap().frozen = false;
        // (an op's failure while recording: nothing ran, the device is as before)
        let recorded_error = self.error.lock().unwrap().take();
        match (ran, ended, recorded_error) {
            (Ok(t), Ok(handle), None) => {
                let g = Graph {
                    handle,
                    held: Arc::new(std::sync::atomic::AtomicBool::new(false)),
                    out: t.buf.ptr,
                    out_bytes: t.buf.bytes,
                    cols: t.cols,
                    generation,
                };
                // the output is the graph's: allocated at each launch, freed by the tensor
                // that launch returns
                std::mem::forget(t);
                put_back(GraphState::Ready(g));
                tracing::debug!("recorded a decode step of {bucket} (tables of {width} blocks)");
                // replay it now, for this step
                self.run_step(kv, step, run)
            }
            (Err(e), Ok(h), None) => {
                // an error of the step's own (a bad input), not of recording: the next step
                // of this shape records again
                // SAFETY: just made, never launched
                unsafe { self.dev.drop_graph(h) };
                put_back(GraphState::Seen);
                Err(e)
            }
            (ran, ended, recorded_error) => {
                let why = match ran {
                    Ok(t) => {
                        std::mem::forget(t);
                        None
                    }
                    Err(e) => Some(format!("{e:#}")),
                };
                let why = recorded_error
                    .or(why)
                    .or_else(|| ended.as_ref().err().map(|e| format!("{e:#}")))
                    .unwrap_or_default();
                if let Ok(h) = ended {
                    // SAFETY: just made, never launched
                    unsafe { self.dev.drop_graph(h) };
                }
                tracing::warn!(
                    "recording a decode step of {bucket} failed ({why}); it runs op by op"
                );
                put_back(GraphState::Unrecordable);
                run(kv, step)
            }
        }
    }

    fn load_stacked(&self, parts: &[HostWeight]) -> Result<Option<GpuWeight>> {
        let Some(first) = parts.first() else {
            return Ok(None);
        };
        let vector = |w: &HostWeight| w.rows() == 1 || w.dims.len() == 1;
        if parts.iter().all(vector) {
            let mut v = Vec::new();
            for w in parts {
                v.extend(
                    dequantize_to_vec(w.ty, &w.data, w.rows() * w.cols())
                        .with_context(|| format!("tensor {}", w.name))?,
                );
            }
            return Ok(Some(GpuWeight {
                buf: self.upload_f32(&v)?,
                ty: GgmlType::F32,
                rows: 1,
                cols: v.len(),
                row_bytes: v.len() * 4,
            }));
        }
        if parts
            .iter()
            .any(|w| vector(w) || w.ty != first.ty || w.cols() != first.cols())
        {
            return Ok(None); // mixed types (Q4_K_M's V is often Q6_K): one by one
        }
        let row_bytes = matrix_row_bytes(first)?;
        for w in parts {
            matrix_row_bytes(w)?;
        }
        let total: usize = parts.iter().map(|w| w.data.len()).sum();
        let buf = self.try_alloc(total)?;
        let mut at = 0;
        for w in parts {
            // SAFETY: the parts' sizes add up to the buffer's
            unsafe { self.dev.upload(buf.ptr + at as u64, &w.data) }
                .with_context(|| format!("uploading tensor {}", w.name))?;
            at += w.data.len();
        }
        Ok(Some(GpuWeight {
            buf,
            ty: first.ty,
            rows: parts.iter().map(|w| w.rows()).sum(),
            cols: first.cols(),
            row_bytes,
        }))
    }

    fn attention_input(
        &self,
        x: &GpuTensor,
        norm: &GpuWeight,
        w: &QkvWeights<GpuWeight>,
        eps: f32,
        cache: &mut GpuKvCache,
        layer: usize,
        layout: &BatchLayout,
        head_dim: usize,
        rope: &Rope,
        factors: Option<&[f32]>,
    ) -> Result<GpuTensor> {
        let Stack::One(wqkv) = &w.w else {
            return attention_input_by_ops(
                self, x, norm, w, eps, cache, layer, layout, head_dim, rope, factors,
            );
        };
        let bias = match &w.bias {
            None => None,
            Some(Stack::One(b)) => Some(b),
            Some(Stack::Parts(_)) => bail!("attention_input: Q/K/V stacked but not their biases"),
        };
        self.check()?;
        let shape = &cache.shape;
        let kv_cols = shape.n_kv_heads * head_dim;
        if head_dim != shape.head_dim
            || rope.n_rot > head_dim
            || wqkv.rows <= 2 * kv_cols
            || (wqkv.rows - 2 * kv_cols) % head_dim != 0
        {
            bail!(
                "attention_input: {} stacked rows for {} KV heads of {head_dim} (cache: {})",
                wqkv.rows,
                shape.n_kv_heads,
                shape.head_dim
            );
        }
        let n_heads = (wqkv.rows - 2 * kv_cols) / head_dim;
        let norms = match &w.qk_norm {
            Some([qn, kn]) => {
                if qn.cols != head_dim || kn.cols != head_dim {
                    bail!(
                        "attention_input: head norms of {} and {} for heads of {head_dim}",
                        qn.cols,
                        kn.cols
                    );
                }
                (qn.buf.ptr, kn.buf.ptr)
            }
            None => (0, 0),
        };
        let n = x.rows;
        if layout.positions.len() != n || layout.slots.len() != n {
            bail!(
                "attention_input: {n} tokens, {} positions, {} slots",
                layout.positions.len(),
                layout.slots.len()
            );
        }
        let capacity = shape.num_blocks * shape.block_size;
        if let Some(&s) = layout.slots.iter().find(|&&s| s as usize >= capacity) {
            bail!("attention_input: slot {s} beyond the cache's {capacity}");
        }
        let qkv = self.tensor(n, wqkv.rows);
        self.project(&qkv, false, x, wqkv, bias, Some((norm, eps)));
        let cs = self.rope_table(layout.positions, rope, factors)?;
        let slots = self.with_layout(layout, |l| Ok(l.slots))?;
        let q = self.tensor(n, n_heads * head_dim);
        // SAFETY: qkv [n, (n_heads + 2 n_kv) hd], q [n, n_heads hd]; slots checked against
        // the cache; the norms hold hd; the table [n, n_rot / 2] pairs
        unsafe {
            self.launch(
                "qkv_post",
                [n, n_heads + shape.n_kv_heads, 1],
                128,
                &[
                    Arg::Ptr(q.buf.ptr),
                    Arg::Ptr(cache.k[layer].ptr),
                    Arg::Ptr(cache.v[layer].ptr),
                    Arg::Ptr(qkv.buf.ptr),
                    Arg::Ptr(slots),
                    Arg::Ptr(cs),
                    Arg::Ptr(norms.0),
                    Arg::Ptr(norms.1),
                    Arg::F32(eps),
                    Arg::U32(n_heads as u32),
                    Arg::U32(shape.n_kv_heads as u32),
                    Arg::U32(head_dim as u32),
                    Arg::U32((rope.n_rot / 2) as u32),
                    Arg::U32((rope.layout == RopeLayout::Interleaved) as u32),
                ],
            )
        };
        self.check()?;
        Ok(q)
    }

    fn ffn_glu(
        &self,
        x: &GpuTensor,
        norm: &GpuWeight,
        eps: f32,
        w: &Stack<GpuWeight>,
        act: Glu,
    ) -> Result<GpuTensor> {
        let Stack::One(w) = w else {
            return ffn_glu_by_ops(self, x, norm, eps, w, act);
        };
        if w.rows % 2 != 0 || x.cols != w.cols || norm.cols != x.cols {
            bail!(
                "ffn_glu: stacked gate/up of {}x{} and a norm of {} for x of {} columns",
                w.rows,
                w.cols,
                norm.cols,
                x.cols
            );
        }
        self.check()?;
        let (n, m) = (x.rows, w.rows / 2);
        let act = glu_id(act);
        let out = self.tensor(n, m);
        if let Some(gt) = gemm_type(w.ty).filter(|_| n >= GEMM_MIN_TOKENS) {
            let h = self.norm(x, None, norm, eps);
            let gu = self.tensor(n, 2 * m);
            if self.library_gemm(gt, &h, w, None, &gu) {
                self.elementwise(
                    "glu",
                    n * m,
                    &[
                        Arg::Ptr(out.buf.ptr),
                        Arg::Ptr(gu.buf.ptr),
                        Arg::Ptr(gu.buf.ptr + (m * 4) as u64),
                        Arg::U32((n * m) as u32),
                        Arg::U32(m as u32),
                        Arg::U32((2 * m) as u32),
                        Arg::U32(act),
                    ],
                );
                self.check()?;
                return Ok(out);
            }
        }
        let name = format!("matmul_glu_{}", kernel_type(w.ty).unwrap());
        // SAFETY: x [n, k], w [2m, k] of row_bytes, norm [k], out [n, m]
        unsafe {
            self.launch(
                &name,
                [m.div_ceil(4), n.div_ceil(MM_TOKENS), 1],
                128,
                &[
                    Arg::Ptr(out.buf.ptr),
                    Arg::Ptr(x.buf.ptr),
                    Arg::Ptr(w.buf.ptr),
                    Arg::Ptr(norm.buf.ptr),
                    Arg::U32(n as u32),
                    Arg::U32(x.cols as u32),
                    Arg::U32(m as u32),
                    Arg::U32(w.row_bytes as u32),
                    Arg::U32(act),
                    Arg::F32(eps),
                ],
            )
        };
        self.check()?;
        Ok(out)
    }

    fn zeros(&self, rows: usize, cols: usize) -> GpuTensor {
        let t = self.tensor(rows, cols);
        if t.buf.ptr != 0 {
            // SAFETY: the tensor's whole buffer
            if let Err(e) = unsafe { self.dev.zero(t.buf.ptr, t.buf.bytes) } {
                self.fail(e);
            }
        }
        t
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> GpuTensor {
        assert_eq!(data.len(), rows * cols);
        match self.upload_f32(data) {
            Ok(buf) => GpuTensor { buf, rows, cols },
            Err(e) => {
                self.fail(e);
                self.tensor(rows, cols)
            }
        }
    }

    fn download(&self, t: &GpuTensor) -> Result<Vec<f32>> {
        self.check()?;
        let mut bytes = vec![0u8; t.rows * t.cols * 4];
        if !bytes.is_empty() {
            // SAFETY: the tensor's buffer holds rows * cols f32
            unsafe { self.dev.download(t.buf.ptr, &mut bytes) }.map_err(|e| self.copy_failed(e))?;
        }
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect())
    }

    fn shape(&self, t: &GpuTensor) -> (usize, usize) {
        (t.rows, t.cols)
    }

    fn alloc_kv(&self, shape: KvShape) -> Result<GpuKvCache> {
        if shape.head_dim % 32 != 0 || shape.head_dim > 256 {
            bail!(
                "head dimension {} is not supported on the GPU (a multiple of 32, at most 256)",
                shape.head_dim
            );
        }
        let spare = shape.num_blocks;
        let shape = KvShape {
            num_blocks: shape.num_blocks + 1,
            ..shape
        };
        if spare > u32::MAX as usize / shape.block_size.max(1) {
            bail!("KV cache of {spare} blocks: slots beyond 32 bits");
        }
        let bytes = shape
            .num_blocks
            .checked_mul(shape.block_size)
            .and_then(|x| x.checked_mul(shape.n_kv_heads * shape.head_dim * 2))
            .ok_or_else(|| anyhow!("KV cache shape {shape:?} overflows"))?;
        let pools = || -> Result<Vec<Buf>> {
            (0..shape.n_layers)
                .map(|_| {
                    let b = self.try_alloc(bytes)?;
                    // SAFETY: the whole buffer
                    unsafe { self.dev.zero(b.ptr, bytes)? };
                    Ok(b)
                })
                .collect()
        };
        let k = pools().context("allocating the KV cache")?;
        let v = pools().context("allocating the KV cache")?;
        static NEXT_KV: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Ok(GpuKvCache {
            shape,
            spare: spare as u32,
            id: NEXT_KV.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            k,
            v,
        })
    }

    fn embed(&self, table: &GpuWeight, tokens: &[u32], scale: f32) -> Result<GpuTensor> {
        self.check()?;
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= table.rows) {
            bail!("token id {t} is outside the vocabulary of {}", table.rows);
        }
        let ids = self.put_u32("ids", tokens)?;
        let out = self.tensor(tokens.len(), table.cols);
        let name = format!("embed_{}", kernel_type(table.ty).unwrap());
        // SAFETY: ids checked against the table; out holds tokens x cols
        unsafe {
            self.launch(
                &name,
                [tokens.len(), 1, 1],
                128,
                &[
                    Arg::Ptr(out.buf.ptr),
                    Arg::Ptr(table.buf.ptr),
                    Arg::Ptr(ids),
                    Arg::U32(table.cols as u32),
                    Arg::U32(table.row_bytes as u32),
                    Arg::F32(scale),
                ],
            )
        };
        self.check()?;
        Ok(out)
    }

    fn gather_rows(&self, x: &GpuTensor, rows: &[usize]) -> GpuTensor {
        assert!(
            rows.iter().all(|&r| r < x.rows),
            "gather_rows: a row outside the tensor"
        );
        let out = self.tensor(rows.len(), x.cols);
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        match self.put_u32("rows", &idx) {
            // SAFETY: rows checked; out holds rows x cols
            Ok(ib) => unsafe {
                self.launch(
                    "gather_rows",
                    [rows.len(), 1, 1],
                    128,
                    &[
                        Arg::Ptr(out.buf.ptr),
                        Arg::Ptr(x.buf.ptr),
                        Arg::Ptr(ib),
                        Arg::U32(x.cols as u32),
                    ],
                )
            },
            Err(e) => self.fail(e),
        }
        out
    }

    fn rms_norm(&self, x: &GpuTensor, w: &GpuWeight, eps: f32) -> GpuTensor {
        self.norm(x, None, w, eps)
    }

    fn add_rms_norm(
        &self,
        residual: &mut GpuTensor,
        x: &GpuTensor,
        w: &GpuWeight,
        eps: f32,
    ) -> GpuTensor {
        assert_eq!((residual.rows, residual.cols), (x.rows, x.cols));
        self.norm(residual, Some(x), w, eps)
    }

    fn add(&self, residual: &mut GpuTensor, x: &GpuTensor) {
        self.add_into(residual, x);
    }

    fn matmul(&self, x: &GpuTensor, w: &GpuWeight, bias: Option<&GpuWeight>) -> GpuTensor {
        let out = self.tensor(x.rows, w.rows);
        self.project(&out, false, x, w, bias, None);
        out
    }

    fn matmul_add(&self, residual: &mut GpuTensor, x: &GpuTensor, w: &GpuWeight) {
        assert_eq!((residual.rows, residual.cols), (x.rows, w.rows));
        self.project(residual, true, x, w, None, None);
    }

    fn matmul_normed(&self, x: &GpuTensor, norm: &GpuWeight, eps: f32, w: &GpuWeight) -> GpuTensor {
        let out = self.tensor(x.rows, w.rows);
        self.project(&out, false, x, w, None, Some((norm, eps)));
        out
    }

    fn rope(
        &self,
        x: &mut GpuTensor,
        positions: &[u32],
        head_dim: usize,
        rope: &Rope,
        factors: Option<&[f32]>,
    ) {
        assert_eq!(x.rows, positions.len());
        assert!(x.cols % head_dim == 0 && rope.n_rot <= head_dim);
        match self.rope_table(positions, rope, factors) {
            // SAFETY: x [n, cols]; the table [n, n_rot / 2] pairs
            Ok(cs) => unsafe {
                self.launch(
                    "rope",
                    [x.rows, 1, 1],
                    128,
                    &[
                        Arg::Ptr(x.buf.ptr),
                        Arg::Ptr(cs),
                        Arg::U32(x.cols as u32),
                        Arg::U32(head_dim as u32),
                        Arg::U32((rope.n_rot / 2) as u32),
                        Arg::U32((rope.layout == RopeLayout::Interleaved) as u32),
                    ],
                )
            },
            Err(e) => self.fail(e),
        }
    }

    fn scale(&self, x: &mut GpuTensor, s: f32) {
        let n = x.rows * x.cols;
        self.elementwise(
            "scale_inplace",
            n,
            &[Arg::Ptr(x.buf.ptr), Arg::U32(n as u32), Arg::F32(s)],
        );
    }

    fn write_kv(
        &self,
        cache: &mut GpuKvCache,
        layer: usize,
        k: &GpuTensor,
        v: &GpuTensor,
        layout: &BatchLayout,
    ) -> Result<()> {
        let hd = cache.shape.head_dim;
        self.store_kv(cache, layer, k, v, layout, 0, hd, None)
    }

    fn rope_write_kv(
        &self,
        cache: &mut GpuKvCache,
        layer: usize,
        k: &mut GpuTensor,
        v: &GpuTensor,
        layout: &BatchLayout,
        head_dim: usize,
        rope: &Rope,
        factors: Option<&[f32]>,
    ) -> Result<()> {
        if head_dim != cache.shape.head_dim || rope.n_rot > head_dim {
            bail!(
                "rope_write_kv: head dimension {head_dim} for a cache of {}",
                cache.shape.head_dim
            );
        }
        let cs = self.rope_table(layout.positions, rope, factors)?;
        self.store_kv(cache, layer, k, v, layout, cs, head_dim, Some(rope))
    }

    fn attention(
        &self,
        cache: &GpuKvCache,
        layer: usize,
        q: &GpuTensor,
        layout: &BatchLayout,
        p: &AttnParams,
    ) -> Result<GpuTensor> {
        self.check()?;
        let hd = p.head_dim;
        let n = layout.positions.len();
        super::check_attention(layout, p, &cache.shape, q.rows, q.cols)?;
        let bs = cache.shape.block_size;
        let out = self.tensor(n, q.cols);
        let group = p.n_heads / p.n_kv_heads;
        // rows of a prefill block: at most 32 and 4096 / hd (its shared memory)
        let rows_cap = (4096 / hd).min(32);
        let tile_heads = group.min(rows_cap);
        let tile_tokens = rows_cap / tile_heads;
        let window = p.window.map_or(0, |w| w.min(u32::MAX as usize)) as u32;
        self.with_layout(layout, |l| {
            let (nd, n_tiles, decode, tile_start, tile_len) =
                self.attention_lists(layout, tile_tokens)?;
            // splits sized for the longest context the block tables allow (so that a recorded
            // step's grid stays right while contexts grow within the table width)
            let span = l.max_blocks * bs;
            let longest = p.window.map_or(span, |w| w.min(span));
            let splits = attn_splits(
                longest,
                nd * p.n_kv_heads * group.div_ceil(ATTN_MAXG),
                self.dev.multiprocessors(),
            );
            let part_o = self.alloc(nd * p.n_heads * splits * hd * 4);
            let part_ml = self.alloc(nd * p.n_heads * splits * 2 * 4);
            let counters = self.attn_counters(nd * p.n_kv_heads * group.div_ceil(ATTN_MAXG))?;
            // SAFETY: every position read is inside the checked block tables and the cache;
            // the partial buffers hold n_decode x heads x splits, the counters one per block
            // group (zero); decode rows and prefill tiles cover disjoint rows of `out`
            unsafe {
                self.launch(
                    "attn_split",
                    [nd * p.n_kv_heads, splits, group.div_ceil(ATTN_MAXG)],
                    128,
                    &[
                        Arg::Ptr(out.buf.ptr),
                        Arg::Ptr(part_o.ptr),
                        Arg::Ptr(part_ml.ptr),
                        Arg::Ptr(counters),
                        Arg::Ptr(q.buf.ptr),
                        Arg::Ptr(cache.k[layer].ptr),
                        Arg::Ptr(cache.v[layer].ptr),
                        Arg::Ptr(l.positions),
                        Arg::Ptr(l.token_seq),
                        Arg::Ptr(l.tables),
                        Arg::Ptr(decode),
                        Arg::U32(l.max_blocks as u32),
                        Arg::U32(p.n_heads as u32),
                        Arg::U32(p.n_kv_heads as u32),
                        Arg::U32(hd as u32),
                        Arg::U32(bs as u32),
                        Arg::F32(p.scale),
                        Arg::U32(window),
                    ],
                );
                self.launch(
                    "attn_prefill",
                    [n_tiles, p.n_kv_heads, group.div_ceil(tile_heads)],
                    128,
                    &[
                        Arg::Ptr(out.buf.ptr),
                        Arg::Ptr(q.buf.ptr),
                        Arg::Ptr(cache.k[layer].ptr),
                        Arg::Ptr(cache.v[layer].ptr),
                        Arg::Ptr(l.positions),
                        Arg::Ptr(l.token_seq),
                        Arg::Ptr(l.tables),
                        Arg::Ptr(tile_start),
                        Arg::Ptr(tile_len),
                        Arg::U32(l.max_blocks as u32),
                        Arg::U32(p.n_heads as u32),
                        Arg::U32(p.n_kv_heads as u32),
                        Arg::U32(hd as u32),
                        Arg::U32(bs as u32),
                        Arg::F32(p.scale),
                        Arg::U32(window),
                        Arg::U32(tile_heads as u32),
                    ],
                );
            }
            Ok(())
        })?;
        self.check()?;
        Ok(out)
    }

    fn mask_rows(&self, logits: &mut GpuTensor, masks: &[Option<&[u32]>]) -> Result<()> {
        if masks.len() != logits.rows {
            bail!("mask_rows: {} masks for {} rows", masks.len(), logits.rows);
        }
        if masks.iter().all(Option::is_none) {
            return Ok(());
        }
        // one u32 per 32 tokens per row, all-ones for rows without a mask (stream-ordered:
        // the buffer is freed after the kernel has read it)
        let words = logits.cols.div_ceil(32);
        let mut packed = vec![u32::MAX; logits.rows * words];
        for (r, m) in masks.iter().enumerate() {
            if let Some(m) = m {
                for (i, d) in packed[r * words..(r + 1) * words].iter_mut().enumerate() {
                    *d = m.get(i).copied().unwrap_or(0);
                }
            }
        }
        let buf = self.upload_u32(&packed)?;
        // SAFETY: `packed` holds `words` per row; rows of `cols` logits, written in place
        unsafe {
            self.launch(
                "apply_token_mask",
                [logits.cols.div_ceil(256), logits.rows, 1],
                256,
                &[
                    Arg::Ptr(logits.buf.ptr),
                    Arg::Ptr(buf.ptr),
                    Arg::U32(logits.cols as u32),
                    Arg::U32(words as u32),
                ],
            )
        };
        Ok(())
    }

    fn pick_max_k(&self) -> usize {
        SAMPLE_MAX_K
    }

    fn host_idle_during_forward(&self) -> bool {
        true
    }

    fn pick_rows(&self, logits: &GpuTensor, picks: &[Pick]) -> Result<Vec<u32>> {
        if picks.len() != logits.rows {
            bail!("pick_rows: {} picks for {} rows", picks.len(), logits.rows);
        }
        if picks.iter().all(Pick::is_greedy) {
            return self.argmax_kernel(logits);
        }
        if picks.iter().all(|p| {
            p.is_greedy() || ((1..=SAMPLE_MAX_K).contains(&p.top_k) && p.temperature > 0.0)
        }) {
            return self.top_k_kernel(logits, picks);
        }
        // more candidates than the kernel keeps: on the host
        let v = self.download(logits)?;
        let cols = logits.cols;
        Ok(picks
            .iter()
            .enumerate()
            .map(|(r, p)| crate::sampling::pick(&v[r * cols..(r + 1) * cols], p))
            .collect())
    }

    fn glu(&self, gate: &GpuTensor, up: &GpuTensor, act: Glu) -> GpuTensor {
        assert_eq!((gate.rows, gate.cols), (up.rows, up.cols));
        let n = gate.rows * gate.cols;
        let out = self.tensor(gate.rows, gate.cols);
        self.elementwise(
            "glu",
            n,
            &[
                Arg::Ptr(out.buf.ptr),
                Arg::Ptr(gate.buf.ptr),
                Arg::Ptr(up.buf.ptr),
                Arg::U32(n as u32),
                Arg::U32(gate.cols as u32),
                Arg::U32(gate.cols as u32),
                Arg::U32(glu_id(act)),
            ],
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::{attn_splits, ATTN_MIN_CHUNK};

    #[test]
    fn sample_max_k_is_the_kernels() {
        let src = include_str!("../../../kernels/sampling.cu");
        let want = format!("#define SAMPLE_MAX_K {}\n", super::SAMPLE_MAX_K);
        assert!(
            src.contains(&want),
            "kernels/sampling.cu does not define {want}"
        );
    }

    #[test]
    fn attention_splits_cover_the_context_and_fill_the_device() {
        for longest in [1, 5, 63, 64, 65, 1000, 1024, 8192, 131_072] {
            for blocks in [1, 8, 32, 264, 512, 5000] {
                for sms in [1, 4, 132] {
                    let splits = attn_splits(longest, blocks, sms);
                    assert!(splits >= 1);
                    // the longest context's splits keep the minimum, unless it is shorter
                    if splits > 1 {
                        assert!(
                            longest / splits >= ATTN_MIN_CHUNK,
                            "{longest} {blocks} {sms}"
                        );
                    }
                    // the device filled twice over when the context allows it
                    let most = (longest / ATTN_MIN_CHUNK).max(1);
                    if blocks * most >= 2 * sms {
                        assert!(
                            blocks * splits >= 2 * sms,
                            "{longest} {blocks} {sms}: {splits}"
                        );
                    }
                    // and not split further than needed
                    assert!(splits == 1 || blocks * (splits - 1) < 2 * sms);
                }
            }
        }
        // one 8k sequence of 8 KV heads on an H200 (132 SMs): 33 splits
        assert_eq!(attn_splits(8192, 8, 132), 33);
    }

    #[test]
    fn decode_buckets_stay_on_the_same_side_of_the_gemm_threshold() {
        use super::{graph_bucket, GEMM_MIN_TOKENS};
        let got: Vec<usize> = [1, 2, 3, 5, 8, 9, 15, 16, 17, 33, 256]
            .iter()
            .map(|&n| graph_bucket(n))
            .collect();
        assert_eq!(got, [1, 2, 4, 8, 8, 15, 15, 16, 32, 64, 256]);
        for n in 1..=256 {
            let b = graph_bucket(n);
            assert!(b >= n && (b < GEMM_MIN_TOKENS) == (n < GEMM_MIN_TOKENS));
        }
    }
}
