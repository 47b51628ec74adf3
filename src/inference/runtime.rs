//! ONNX Runtime set-up: finds `libonnxruntime.so` (ort's `load-dynamic`), creates the one
//! process-wide environment, and builds sessions on the configured execution provider, falling
//! back to CPU with one clear log line when CUDA cannot start.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;

/// Where sessions should run.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    serde::Deserialize,
    serde::Serialize,
    Default,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    /// CUDA when it starts, else CPU.
    #[default]
    Auto,
    /// Ask for CUDA (still falls back to CPU, loudly).
    Cuda,
    /// CPU only.
    Cpu,
}

/// Runtime errors that stop start-up.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No library found.
    #[error("ONNX Runtime library not found (looked in: {0}). Run `scripts/setup.sh`, or set ORT_DYLIB_PATH to libonnxruntime.so")]
    NotFound(String),
    /// The library did not load.
    #[error("ONNX Runtime library {0} could not be loaded: {1}")]
    Load(PathBuf, String),
    /// Session creation failed.
    #[error("ONNX Runtime: {0}")]
    Ort(String),
}

static CUDA_FAILED: AtomicBool = AtomicBool::new(false);

static ENV: OnceLock<Result<(Environment, PathBuf), String>> = OnceLock::new();

/// Candidate library locations, in order: `ORT_DYLIB_PATH`, the configured path, `.deps/` next
/// to the working directory and above the executable, then Python site-packages.
fn candidates(configured: Option<&Path>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        out.push(PathBuf::from(p));
    }
    if let Some(p) = configured {
        out.push(p.to_path_buf());
    }
    let gpu_first = std::env::var_os("CARINA_ORT_GPU").is_some();
    let sub = if gpu_first {
        ["onnxruntime-gpu", "onnxruntime"]
    } else {
        ["onnxruntime", "onnxruntime-gpu"]
    };
    let mut roots = vec![PathBuf::from(".")];
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).take(4).map(Path::to_path_buf));
    }
    for r in roots {
        for s in sub {
            out.push(r.join(".deps").join(s));
        }
    }
    for base in ["/usr/local/lib", "/usr/lib", "/root/.local/lib"] {
        out.push(PathBuf::from(base));
    }
    out
}

fn resolve(p: &Path) -> Option<PathBuf> {
    if p.is_file() {
        return Some(p.to_path_buf());
    }
    let entries = std::fs::read_dir(p).ok()?;
    let mut libs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|f| {
            f.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n == "libonnxruntime.so" || (n.starts_with("libonnxruntime.so.") && n.len() > 18)
            })
        })
        .collect();
    libs.sort();
    libs.pop()
}

/// Finds the library without loading it.
///
/// # Errors
/// [`RuntimeError::NotFound`] listing where it looked.
pub fn find_library(configured: Option<&Path>) -> Result<PathBuf, RuntimeError> {
    let c = candidates(configured);
    c.iter().find_map(|p| resolve(p)).ok_or_else(|| {
        RuntimeError::NotFound(
            c.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        )
    })
}

/// The process-wide environment, created on first use from the library at `configured` or found
/// automatically.
///
/// # Errors
/// When the library is missing or fails to load (the message says where it looked).
pub fn environment(configured: Option<&Path>) -> Result<&'static Environment, RuntimeError> {
    let res = ENV.get_or_init(|| {
        let path = find_library(configured).map_err(|e| e.to_string())?;
        let builder = ort::init_from(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let env = builder
            .with_name("carina")
            .build()
            .map_err(|e| e.to_string())?;
        tracing::info!(library = %path.display(), "ONNX Runtime loaded");
        Ok((env, path))
    });
    match res {
        Ok((env, _)) => Ok(env),
        Err(e) if e.contains("not found") => Err(RuntimeError::NotFound(e.clone())),
        Err(e) => Err(RuntimeError::Load(PathBuf::new(), e.clone())),
    }
}

/// Options for building sessions.
#[derive(Debug, Clone, Copy)]
pub struct SessionOptions {
    /// Requested provider.
    pub provider: ExecutionProvider,
    /// Intra-op threads per session (0 = cores / sessions).
    pub intra_threads: usize,
    /// Sessions per model on CPU, each on its own thread and sharing one queue (0 = one per
    /// core). On CUDA one session is used.
    pub sessions: usize,
}

impl SessionOptions {
    /// Sessions to run on CPU.
    pub fn cpu_sessions(&self) -> usize {
        if self.sessions > 0 {
            self.sessions
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// Intra-op threads per CPU session.
    pub fn cpu_threads(&self) -> usize {
        if self.intra_threads > 0 {
            self.intra_threads
        } else {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / self.cpu_sessions()).max(1)
        }
    }
}

fn build(
    env: &Environment,
    bytes: &[u8],
    opts: SessionOptions,
    cuda: bool,
) -> ort::Result<Session> {
    let mut b = Session::builder(env)?.with_optimization_level(GraphOptimizationLevel::All)?;
    b = b.with_intra_threads(opts.cpu_threads())?;
    if cuda {
        b = b.with_execution_providers([ort::ep::CUDA::default().build().error_on_failure()])?;
    }
    b.commit_from_memory(bytes)
}

/// Builds a session for `bytes`, returning it with the provider that actually runs it.
///
/// # Errors
/// When the model cannot be loaded even on CPU.
pub fn session(
    env: &Environment,
    bytes: &[u8],
    opts: SessionOptions,
    what: &str,
) -> Result<(Session, &'static str), RuntimeError> {
    if opts.provider != ExecutionProvider::Cpu && !CUDA_FAILED.load(Ordering::Relaxed) {
        match build(env, bytes, opts, true) {
            Ok(s) => return Ok((s, "CUDAExecutionProvider")),
            Err(e) => {
                // Said once per process; later sessions go straight to CPU.
                CUDA_FAILED.store(true, Ordering::Relaxed);
                let msg = format!("CUDA execution provider could not start ({e}); running on CPU");
                if opts.provider == ExecutionProvider::Cuda {
                    tracing::warn!(model = what, "{msg}");
                } else {
                    tracing::info!(model = what, "execution_provider=auto: {msg}");
                }
            }
        }
    }
    build(env, bytes, opts, false)
        .map(|s| (s, "CPUExecutionProvider"))
        .map_err(|e| RuntimeError::Ort(e.to_string()))
}
