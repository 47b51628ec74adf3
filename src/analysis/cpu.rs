//! Where the analyses' CPU work runs. Two lanes:
//!
//! - **Foreground** (a user waits: the legacy API, `/v1/analyze`, a STOW-RS request that asked
//!   for its result): the blocking pool, at most [`limit_cpu_work`] images at once so pixel
//!   work queues instead of taking the cores from the inference sessions.
//! - **Background** (the job workers' analyses of stored instances): a few threads of their own
//!   at a lower OS priority (`nice` +10 on Linux). Ingest (STOW-RS, C-STORE, FHIR) and
//!   foreground requests then keep the cores while a burst of studies arrives, and the queued
//!   analyses use what is left and catch up when the burst ends. Nothing is lost or skipped:
//!   the jobs are durable and run in the same order, only later.
//!
//! A future runs in the background lane inside [`background`]'s scope (the job workers wrap
//! each job in it); [`run`] picks the lane from that scope.

use std::future::Future;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::{oneshot, Semaphore};

/// How much lower than normal the background threads run (the `nice` increment on Linux).
pub const BACKGROUND_NICE: i32 = 10;

tokio::task_local! {
    static BACKGROUND: bool;
}

/// Permits for foreground pixel work (decode, preprocess, overlay, encode).
static FOREGROUND: OnceLock<Semaphore> = OnceLock::new();

/// The background lane's threads.
static POOL: OnceLock<Pool> = OnceLock::new();

/// Why CPU work did not come back.
#[derive(Debug, thiserror::Error)]
#[error("CPU work failed: {0}")]
pub struct CpuError(pub String);

/// Sizes the foreground lane: at most `workers` images are decoded, resized or drawn at once
/// (0 = one per core). Takes effect once, before the first analysis; later calls are ignored.
pub fn limit_cpu_work(workers: usize) {
    let _ = FOREGROUND.set(Semaphore::new(per_core(workers)));
}

fn per_core(n: usize) -> usize {
    match n {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    }
}

/// Runs `fut` with its CPU work in the background lane.
pub async fn background<F: Future>(fut: F) -> F::Output {
    BACKGROUND.scope(true, fut).await
}

/// Whether the current task runs in the background lane.
pub fn in_background() -> bool {
    BACKGROUND.try_with(|b| *b).unwrap_or(false)
}

/// Runs CPU work `f` off the async runtime, in the lane of the calling task.
///
/// # Errors
/// [`CpuError`] when the work panicked or its thread is gone.
pub async fn run<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, CpuError> {
    if in_background() {
        return pool().run(f).await;
    }
    let permits = FOREGROUND.get_or_init(|| Semaphore::new(per_core(0)));
    let _permit = permits
        .acquire()
        .await
        .map_err(|e| CpuError(e.to_string()))?;
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| CpuError(e.to_string()))
}

type Work = Box<dyn FnOnce() + Send>;

/// A fixed set of low-priority threads taking work from one queue.
struct Pool {
    tx: mpsc::Sender<Work>,
}

fn pool() -> &'static Pool {
    POOL.get_or_init(|| Pool::start(per_core(0)))
}

impl Pool {
    fn start(threads: usize) -> Self {
        let (tx, rx) = mpsc::channel::<Work>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("analysis-bg-{i}"))
                .spawn(move || {
                    lower_priority();
                    loop {
                        let work = {
                            let Ok(queue) = rx.lock() else { return };
                            let Ok(w) = queue.recv() else { return };
                            w
                        };
                        work();
                    }
                });
            if let Err(e) = spawned {
                tracing::error!("cannot start a background analysis thread: {e}");
            }
        }
        Self { tx }
    }

    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, CpuError> {
        let (reply, rx) = oneshot::channel();
        let work: Work = Box::new(move || {
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = reply.send(out);
        });
        self.tx
            .send(work)
            .map_err(|_| CpuError("no background analysis thread".into()))?;
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(CpuError("background analysis work panicked".into())),
            Err(_) => Err(CpuError("background analysis thread stopped".into())),
        }
    }
}

/// Lowers the calling thread's scheduling priority by [`BACKGROUND_NICE`] (Linux: a thread is
/// its own scheduling entity, so this leaves the rest of the process as it is; raising a nice
/// value needs no privilege).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let tid = Some(rustix::thread::gettid());
        let lowered = rustix::process::getpriority_process(tid).and_then(|now| {
            rustix::process::setpriority_process(tid, (now + BACKGROUND_NICE).min(19))
        });
        if let Err(e) = lowered {
            tracing::warn!(error = %e, "cannot lower the background analysis thread's priority");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The calling thread's nice value (Linux; 0 elsewhere).
    fn current_nice() -> i32 {
        #[cfg(target_os = "linux")]
        {
            rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap_or(0)
        }
        #[cfg(not(target_os = "linux"))]
        {
            0
        }
    }

    #[tokio::test]
    async fn background_work_runs_on_lower_priority_threads_and_foreground_does_not() {
        let fg = run(|| {
            (
                current_nice(),
                std::thread::current().name().map(String::from),
            )
        })
        .await
        .map_err(|e| e.to_string());
        let bg = background(async {
            assert!(in_background());
            run(|| {
                (
                    current_nice(),
                    std::thread::current().name().map(String::from),
                )
            })
            .await
        })
        .await
        .map_err(|e| e.to_string());
        let (fg_nice, fg_name) = fg.clone().unwrap_or_default();
        let (bg_nice, bg_name) = bg.clone().unwrap_or_default();
        assert!(fg.is_ok() && bg.is_ok(), "{fg:?} {bg:?}");
        assert!(!in_background());
        assert!(
            bg_name
                .as_deref()
                .is_some_and(|n| n.starts_with("analysis-bg-")),
            "{bg_name:?}"
        );
        assert!(!fg_name.as_deref().unwrap_or("").starts_with("analysis-bg-"));
        if cfg!(target_os = "linux") {
            assert_eq!(
                bg_nice,
                (fg_nice + BACKGROUND_NICE).min(19),
                "fg {fg_nice}, bg {bg_nice}"
            );
        }
    }

    #[tokio::test]
    async fn a_panic_in_background_work_is_an_error_not_a_hang() {
        let r: Result<(), _> = background(run(|| panic!("boom"))).await;
        assert!(r.is_err());
        // the lane still works afterwards
        let ok = background(run(|| 2 + 2)).await.map_err(|e| e.to_string());
        assert_eq!(ok, Ok(4));
    }
}
