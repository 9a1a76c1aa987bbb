//! A persistent pool of worker threads for the CPU backend's parallel ops.
//!
//! One op is one [`Pool::run`]: every thread (the caller is thread 0) runs the same closure
//! with its index, and the call returns when all are done. Workers spin on an epoch counter
//! between ops (an op every few microseconds during a forward pass), then yield the core
//! (another thread may need it when cores are oversubscribed), and sleep on a condition
//! variable after [`SPIN`] of idleness, so an idle server uses no CPU. Calls from several
//! threads at once are serialized; a call made while the pool is busy (a nested op, or
//! another engine in the same process) runs on the caller alone, so it never deadlocks.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it sleeps.
const SPIN: Duration = Duration::from_millis(2);

type Job = dyn Fn(usize, usize) + Sync;

struct Shared {
    /// The current job, valid while `pending > 0` (set by `run`, which outlives it).
    job: Mutex<Option<&'static Job>>,
    epoch: AtomicUsize,
    pending: AtomicUsize,
    panicked: AtomicBool,
    sleep: Mutex<()>,
    wake: Condvar,
    threads: usize,
}

pub struct Pool {
    shared: Arc<Shared>,
    busy: Mutex<()>,
}

static POOL: OnceLock<Pool> = OnceLock::new();
static WANT: AtomicUsize = AtomicUsize::new(0);

/// Sets the number of threads of the process-wide pool; must come before its first use.
/// Returns false when the pool already runs with another size.
pub fn set_threads(n: usize) -> bool {
    WANT.store(n.max(1), Ordering::SeqCst);
    match POOL.get() {
        Some(p) => p.threads() == n.max(1),
        None => true,
    }
}

/// The process-wide pool: `set_threads`, else `KOJO_THREADS`, else one thread per core.
pub fn global() -> &'static Pool {
    POOL.get_or_init(|| {
        let n = match WANT.load(Ordering::SeqCst) {
            0 => std::env::var("KOJO_THREADS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
            n => n,
        };
        Pool::new(n)
    })
}

impl Pool {
    pub fn new(threads: usize) -> Pool {
        let threads = threads.max(1);
        let shared = Arc::new(Shared {
            job: Mutex::new(None),
            epoch: AtomicUsize::new(0),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
            threads,
        });
        for i in 1..threads {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("kojo-cpu-{i}"))
                .spawn(move || worker(s, i))
                .expect("spawning a CPU worker thread");
        }
        Pool {
            shared,
            busy: Mutex::new(()),
        }
    }

    pub fn threads(&self) -> usize {
        self.shared.threads
    }

    /// Runs `f(thread, threads)` on every thread of the pool and waits for all of them.
    pub fn run(&self, f: &(dyn Fn(usize, usize) + Sync)) {
        let n = self.shared.threads;
        let guard = match self.busy.try_lock() {
            Ok(g) if n > 1 => g,
            _ => {
                // single thread, or the pool is in use: run every part here
                for i in 0..n {
                    f(i, n);
                }
                return;
            }
        };
        let s = &self.shared;
        // SAFETY: the reference is only used by workers while `pending > 0`, and this
        // function does not return before `pending` is back to 0.
        let job: &'static Job =
            unsafe { std::mem::transmute::<&(dyn Fn(usize, usize) + Sync + '_), &'static Job>(f) };
        *s.job.lock().unwrap() = Some(job);
        s.pending.store(n - 1, Ordering::SeqCst);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        {
            let _l = s.sleep.lock().unwrap();
            s.wake.notify_all();
        }
        let mine = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(0, n)));
        let mut spins = 0u32;
        while s.pending.load(Ordering::Acquire) != 0 {
            spins += 1;
            if spins < 4096 {
                std::hint::spin_loop();
            } else {
                // a worker that is not running (more threads than free cores: other
                // processes, parallel tests) needs this core more than we need to spin
                std::thread::yield_now();
            }
        }
        *s.job.lock().unwrap() = None;
        drop(guard);
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if s.panicked.swap(false, Ordering::SeqCst) {
            panic!("a CPU worker thread panicked");
        }
    }

    /// Splits `0..len` into one contiguous range per thread and runs `f(range)` on each.
    pub fn for_ranges(&self, len: usize, f: impl Fn(std::ops::Range<usize>) + Sync) {
        self.run(&|i, n| {
            let (a, b) = (len * i / n, len * (i + 1) / n);
            if a < b {
                f(a..b)
            }
        });
    }
}

fn worker(s: Arc<Shared>, index: usize) {
    // epoch 0 is the state at construction: a worker that starts late still runs job 1
    let mut seen = 0;
    loop {
        let mut since = Instant::now();
        let mut spins = 0u32;
        loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            spins += 1;
            if spins < 4096 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
            if spins % 1024 == 0 && since.elapsed() > SPIN {
                let mut l = s.sleep.lock().unwrap();
                while s.epoch.load(Ordering::Acquire) == seen {
                    l = s
                        .wake
                        .wait_timeout(l, Duration::from_millis(100))
                        .unwrap()
                        .0;
                }
                since = Instant::now();
                spins = 0;
            }
        }
        let job = *s.job.lock().unwrap();
        if let Some(job) = job {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(index, s.threads)))
                .is_err()
            {
                s.panicked.store(true, Ordering::SeqCst);
            }
        }
        s.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_part_runs_once() {
        let pool = Pool::new(3);
        for len in [0, 1, 2, 7, 100] {
            let hits: Vec<AtomicUsize> = (0..len).map(|_| AtomicUsize::new(0)).collect();
            pool.for_ranges(len, |r| {
                for i in r {
                    hits[i].fetch_add(1, Ordering::SeqCst);
                }
            });
            assert!(hits.iter().all(|h| h.load(Ordering::SeqCst) == 1));
        }
        // nested use runs inline instead of deadlocking
        let total = AtomicUsize::new(0);
        pool.run(&|_, _| {
            pool.run(&|_, _| {
                total.fetch_add(1, Ordering::SeqCst);
            })
        });
        assert_eq!(total.load(Ordering::SeqCst), 9);
    }

    #[test]
    fn a_panic_reaches_the_caller() {
        let pool = Pool::new(2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(&|i, _| assert_ne!(i, 1, "boom"))
        }));
        assert!(r.is_err());
        // and the pool still works
        let c = AtomicUsize::new(0);
        pool.run(&|_, _| {
            c.fetch_add(1, Ordering::SeqCst);
        });
        assert_eq!(c.load(Ordering::SeqCst), 2);
    }
}
