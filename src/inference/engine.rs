//! One ONNX Runtime session per model behind a queue: a dedicated thread takes requests from
//! concurrent callers, runs up to `max_batch` of them as one batch, and answers each with its
//! own slice of the outputs. CPU work never runs on the async runtime.

use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex};
use std::thread;

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
}

struct Request {
    input: FloatTensor,
    reply: oneshot::Sender<Result<Outputs, EngineError>>,
}

/// Handle to a model's session thread. Cloning shares the queue.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Request>,
}

impl Engine {
    /// Starts the session thread. `outputs` are fetched on every run.
    pub fn start(
        sessions: Vec<Session>,
        input_name: String,
        outputs: Vec<String>,
        max_batch: usize,
        label: &str,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<Request>();
        let rx = Arc::new(Mutex::new(rx));
        let max_batch = max_batch.max(1);
        for (i, session) in sessions.into_iter().enumerate() {
            let (rx, input, outputs) = (rx.clone(), input_name.clone(), outputs.clone());
            let model = label.to_string();
            let spawned = thread::Builder::new()
                .name(format!("ort-{label}-{i}"))
                .spawn(move || serve(session, &model, &input, &outputs, max_batch, &rx));
            if let Err(e) = spawned {
                tracing::error!("cannot start inference thread: {e}");
            }
        }
        Self { tx }
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

fn serve(
    mut session: Session,
    model: &str,
    input_name: &str,
    outputs: &[String],
    max_batch: usize,
    rx: &Mutex<mpsc::Receiver<Request>>,
) {
    loop {
        // Take one request (waiting), then whatever else is already queued, up to max_batch;
        // the lock is released before running so other sessions can form their own batch.
        let batch = {
            let Ok(queue) = rx.lock() else { return };
            let Ok(first) = queue.recv() else { return };
            let mut batch = vec![first];
            while batch.len() < max_batch {
                match queue.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            batch
        };
        // Samples of different shapes run in batches of their own.
        for group in group_by_shape(batch) {
            let inputs: Vec<&FloatTensor> = group.iter().map(|r| &r.input).collect();
            let started = std::time::Instant::now();
            let result = run_batch(&mut session, input_name, outputs, &inputs);
            crate::metrics::global().observe_inference(
                model,
                started.elapsed().as_secs_f64(),
                group.len(),
            );
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
