//! One ONNX Runtime session per model behind a queue: a dedicated thread takes requests from
//! concurrent callers, runs up to `max_batch` of them as one batch, and answers each with its
//! own slice of the outputs. CPU work never runs on the async runtime.
//!
//! Batching is dynamic: a batch opens with the first waiting request and closes when it holds
//! `max_batch` samples or `max_wait` has passed since it opened, whichever comes first. With
//! `max_wait` zero the batch takes only what is already queued (no added latency).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ort::session::Session;
use ort::value::Tensor;
use tokio::sync::oneshot;

/// A float tensor: shape and row-major data.
#[derive(Debug, Clone)]
pub struct FloatTensor {
    /// Shape.
    pub shape: Vec<usize>,
    /// Data.
    pub data: Vec<f32>,
}

/// Outputs of one sample, by tensor name.
pub type Outputs = HashMap<String, FloatTensor>;

/// Errors while running a model.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// ONNX Runtime failed.
    #[error("inference failed: {0}")]
    Run(String),
    /// The engine thread is gone (shutdown).
    #[error("the inference engine has stopped")]
    Stopped,
    /// A remote inference pool cannot be reached now (retries spent or breaker open); trying
    /// again later may succeed.
    #[error("inference pool unavailable: {0}")]
    Unavailable(String),
}

/// How the engine forms batches from concurrent requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    /// Largest batch (at least 1).
    pub max_batch: usize,
    /// Longest a batch stays open for more requests once its first arrived.
    pub max_wait: Duration,
}

impl Batching {
    /// Takes only what is already queued, up to `max_batch`.
    pub fn immediate(max_batch: usize) -> Self {
        Self {
            max_batch,
            max_wait: Duration::ZERO,
        }
    }
}

/// Batches run and samples answered since start, across the model's sessions.
#[derive(Debug, Default)]
struct Counters {
    batches: AtomicU64,
    samples: AtomicU64,
}

/// What an engine has run so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchStats {
    /// ONNX Runtime runs.
    pub batches: u64,
    /// Samples in those runs.
    pub samples: u64,
}

struct Request {
    input: FloatTensor,
    reply: oneshot::Sender<Result<Outputs, EngineError>>,
}

/// Handle to a model's session thread. Cloning shares the queue.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Request>,
    counters: Arc<Counters>,
}

impl Engine {
    /// Starts the session thread. `outputs` are fetched on every run.
    pub fn start(
        sessions: Vec<Session>,
        input_name: String,
        outputs: Vec<String>,
        batching: Batching,
        label: &str,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<Request>();
        let rx = Arc::new(Mutex::new(rx));
        let counters = Arc::new(Counters::default());
        let batching = Batching {
            max_batch: batching.max_batch.max(1),
            ..batching
        };
        for (i, session) in sessions.into_iter().enumerate() {
            let worker = Worker {
                model: label.to_string(),
                input: input_name.clone(),
                outputs: outputs.clone(),
                batching,
                counters: counters.clone(),
            };
            let rx = rx.clone();
            let spawned = thread::Builder::new()
                .name(format!("ort-{label}-{i}"))
                .spawn(move || worker.serve(session, &rx));
            if let Err(e) = spawned {
                tracing::error!("cannot start inference thread: {e}");
            }
        }
        Self { tx, counters }
    }

    /// Batches run and samples answered so far.
    pub fn stats(&self) -> BatchStats {
        BatchStats {
            batches: self.counters.batches.load(Ordering::Relaxed),
            samples: self.counters.samples.load(Ordering::Relaxed),
        }
    }

    /// Runs one sample (batch dimension 1), waiting asynchronously.
    ///
    /// # Errors
    /// [`EngineError`] when ONNX Runtime fails or the engine stopped.
    pub async fn run(&self, input: FloatTensor) -> Result<Outputs, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request { input, reply })
            .map_err(|_| EngineError::Stopped)?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }

    /// Runs one sample from a thread that is not on the async runtime.
    ///
    /// # Errors
    /// As [`Engine::run`].
    pub fn run_blocking(&self, input: FloatTensor) -> Result<Outputs, EngineError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request { input, reply })
            .map_err(|_| EngineError::Stopped)?;
        rx.blocking_recv().map_err(|_| EngineError::Stopped)?
    }
}

/// One session's thread: what it needs besides the session and the queue.
struct Worker {
    model: String,
    input: String,
    outputs: Vec<String>,
    batching: Batching,
    counters: Arc<Counters>,
}

impl Worker {
    fn serve(self, mut session: Session, rx: &Mutex<mpsc::Receiver<Request>>) {
        loop {
            // The lock is held while the batch forms and released before it runs, so another
            // session forms the next batch while this one computes.
            let batch = {
                let Ok(queue) = rx.lock() else { return };
                let Ok(first) = queue.recv() else { return };
                self.fill(vec![first], &queue)
            };
            // Samples of different shapes run in batches of their own.
            for group in group_by_shape(batch) {
                self.run(&mut session, group);
            }
        }
    }

    /// Adds queued requests to `batch` until it is full or `max_wait` has passed.
    fn fill(&self, mut batch: Vec<Request>, queue: &mpsc::Receiver<Request>) -> Vec<Request> {
        let Batching {
            max_batch,
            max_wait,
        } = self.batching;
        let deadline = Instant::now() + max_wait;
        while batch.len() < max_batch {
            let next = match queue.try_recv() {
                Ok(r) => Ok(r),
                Err(_) => match deadline.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => queue.recv_timeout(left).map_err(|_| ()),
                    _ => Err(()),
                },
            };
            match next {
                Ok(r) => batch.push(r),
                Err(()) => break,
            }
        }
        batch
    }

    fn run(&self, session: &mut Session, group: Vec<Request>) {
        let inputs: Vec<&FloatTensor> = group.iter().map(|r| &r.input).collect();
        let started = Instant::now();
        let result = run_batch(session, &self.input, &self.outputs, &inputs);
        crate::metrics::global().observe_inference(
            &self.model,
            started.elapsed().as_secs_f64(),
            group.len(),
        );
        self.counters.batches.fetch_add(1, Ordering::Relaxed);
        self.counters
            .samples
            .fetch_add(group.len() as u64, Ordering::Relaxed);
        match result {
            Ok(mut per_sample) => {
                for (r, out) in group.into_iter().zip(per_sample.drain(..)) {
                    let _ = r.reply.send(Ok(out));
                }
            }
            Err(e) => {
                for r in group {
                    let _ = r.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

fn group_by_shape(reqs: Vec<Request>) -> Vec<Vec<Request>> {
    let mut groups: Vec<Vec<Request>> = Vec::new();
    for r in reqs {
        match groups
            .iter_mut()
            .find(|g| g[0].input.shape == r.input.shape)
        {
            Some(g) => g.push(r),
            None => groups.push(vec![r]),
        }
    }
    groups
}

/// Runs `inputs` (each with batch dimension n_i) as one concatenated batch and splits outputs.
///
/// # Errors
/// [`EngineError::Run`] with ONNX Runtime's message.
pub fn run_batch(
    session: &mut Session,
    input_name: &str,
    outputs: &[String],
    inputs: &[&FloatTensor],
) -> Result<Vec<Outputs>, EngineError> {
    let fail = |e: ort::Error| EngineError::Run(e.to_string());
    let Some(first) = inputs.first() else {
        return Ok(Vec::new());
    };
    let counts: Vec<usize> = inputs
        .iter()
        .map(|t| t.shape.first().copied().unwrap_or(1))
        .collect();
    let mut shape = first.shape.clone();
    shape[0] = counts.iter().sum();
    let data: Vec<f32> = inputs.iter().flat_map(|t| t.data.iter().copied()).collect();
    let tensor = Tensor::from_array((shape, data)).map_err(fail)?;
    let result = session
        .run(ort::inputs![input_name => tensor])
        .map_err(fail)?;
    let mut per: Vec<Outputs> = counts.iter().map(|_| HashMap::new()).collect();
    for name in outputs {
        let value = result
            .get(name.as_str())
            .ok_or_else(|| EngineError::Run(format!("the model has no output '{name}'")))?;
        let (oshape, odata) = value.try_extract_tensor::<f32>().map_err(fail)?;
        let dims: Vec<usize> = oshape.iter().map(|&d| d.max(0) as usize).collect();
        let total = dims.first().copied().unwrap_or(1).max(1);
        let per_row = odata.len() / total;
        let mut offset = 0;
        for (i, &n) in counts.iter().enumerate() {
            let mut s = dims.clone();
            if !s.is_empty() {
                s[0] = n;
            }
            let len = per_row * n;
            let slice = odata.get(offset..offset + len).ok_or_else(|| {
                EngineError::Run(format!("output '{name}' is shorter than the batch"))
            })?;
            per[i].insert(
                name.clone(),
                FloatTensor {
                    shape: s,
                    data: slice.to_vec(),
                },
            );
            offset += len;
        }
    }
    Ok(per)
}
