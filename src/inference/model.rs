//! A loaded image model: manifest + session engine + the Grad-CAM plan chosen at load time.
//! The plan is exact Grad-CAM when the head compiles and its Rust forward pass reproduces ONNX
//! Runtime's scores; otherwise ReciproCAM on a head sub-model; otherwise no map (with a reason).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ndarray::{ArrayD, IxDyn};
use ort::environment::Environment;
use ort::session::Session;

use super::engine::{run_batch, BatchStats, Engine, EngineError, FloatTensor, Outputs};
use super::gradcam::{self, Cam, CamMethod};
use super::head::Head;
use super::manifest::{BackendKind, Layout, Manifest};
use super::onnx::{extract_submodel, with_extra_outputs, OnnxGraph};
use super::preprocess::{preprocess, InputTensor};
use super::remote::RemoteEngine;
use super::runtime::{self, SessionOptions};
use super::LoadOptions;

/// A model that could not be loaded: names the file and the problem.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct LoadError {
    /// The file at fault.
    pub path: PathBuf,
    /// What is wrong.
    pub message: String,
}

/// Where the model runs.
enum Backend {
    /// ONNX Runtime sessions in this process.
    Local(Engine),
    /// A serving engine over the Open Inference Protocol.
    Remote(Box<RemoteEngine>),
}

impl Backend {
    async fn run(&self, input: FloatTensor) -> Result<Outputs, EngineError> {
        match self {
            Self::Local(e) => e.run(input).await,
            Self::Remote(r) => r.run(input).await,
        }
    }

    /// Off the async runtime's worker threads (a blocking-pool thread or a plain one).
    fn run_blocking(&self, input: FloatTensor) -> Result<Outputs, EngineError> {
        match self {
            Self::Local(e) => e.run_blocking(input),
            Self::Remote(r) => match tokio::runtime::Handle::try_current() {
                Ok(handle) => handle.block_on(r.run(input)),
                Err(_) => tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| EngineError::Run(e.to_string()))?
                    .block_on(r.run(input)),
            },
        }
    }

    fn stats(&self) -> BatchStats {
        match self {
            Self::Local(e) => e.stats(),
            Self::Remote(r) => r.stats(),
        }
    }
}

enum CamPlan {
    Exact(Head),
    Recipro(Mutex<Session>),
    Unavailable(String),
}

/// An image classifier ready to serve.
pub struct ImageModel {
    /// The manifest.
    pub manifest: Manifest,
    /// The package folder.
    pub dir: PathBuf,
    /// Provider running the session (`kserve-v2` for a remote backend).
    pub provider: &'static str,
    backend: Backend,
    probs: Option<String>,
    logits: Option<String>,
    score: String,
    score_is_logit: bool,
    target: Option<String>,
    layout: Layout,
    cam: CamPlan,
}

/// What one image produced.
#[derive(Debug, Clone)]
pub struct Prediction {
    /// Probability per label, in label order.
    pub probabilities: Vec<f32>,
    /// Index of the winning label.
    pub class: usize,
    /// The model input (for `input.npy`).
    pub input: InputTensor,
    /// The heatmap over the target grid, if any.
    pub cam: Option<Cam>,
}

fn softmax(z: &[f32]) -> Vec<f32> {
    let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let e: Vec<f32> = z.iter().map(|v| (v - m).exp()).collect();
    let s: f32 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// A package's graph as Carina runs it: checked against the manifest, with the tensors it
/// fetches on every run (probabilities or logits, the differentiated score, the Grad-CAM
/// target) made graph outputs.
pub struct ServingGraph {
    /// The decoded original graph.
    pub graph: OnnxGraph,
    /// The ONNX file with the fetched tensors added as outputs: what a serving engine loads.
    pub bytes: Vec<u8>,
    /// Tensors fetched on every run.
    pub fetch: Vec<String>,
    score: String,
    score_is_logit: bool,
    target: Option<String>,
}

impl ServingGraph {
    /// Reads and checks the ONNX file of `manifest` in `dir`.
    ///
    /// # Errors
    /// [`LoadError`] naming the file when it is unreadable or inconsistent with the manifest.
    pub fn plan(dir: &Path, manifest: &Manifest) -> Result<Self, LoadError> {
        let path = manifest.model_path(dir);
        let fail = |message: String| LoadError {
            path: path.clone(),
            message,
        };
        let bytes = std::fs::read(&path).map_err(|e| fail(format!("cannot read: {e}")))?;
        let g = OnnxGraph::decode(&bytes).map_err(|e| fail(e.to_string()))?;
        let input = manifest
            .input
            .as_ref()
            .ok_or_else(|| fail("no [input] in the manifest".into()))?;
        if !g.graph().input.iter().any(|i| i.name == input.name) {
            return Err(fail(format!("the graph has no input '{}'", input.name)));
        }
        for name in [&manifest.output.probabilities, &manifest.output.logits]
            .into_iter()
            .flatten()
        {
            if !g.has_tensor(name) {
                return Err(fail(format!(
                    "the graph has no tensor '{name}' (named in [output])"
                )));
            }
        }
        let (score, score_is_logit) = score_tensor(&g, manifest);
        let target = match &manifest.gradcam.target {
            Some(t) if g.has_tensor(t) => Some(t.clone()),
            Some(t) => {
                return Err(fail(format!(
                    "gradcam.target '{t}' is not a tensor of the graph"
                )))
            }
            None => g.find_pooling_input(&score),
        };
        let mut fetch: Vec<String> = Vec::new();
        for t in [
            manifest.output.probabilities.clone(),
            manifest.output.logits.clone(),
            Some(score.clone()),
            target.clone(),
        ]
        .into_iter()
        .flatten()
        {
            if !fetch.contains(&t) {
                fetch.push(t);
            }
        }
        let extra: Vec<&str> = fetch
            .iter()
            .map(String::as_str)
            .filter(|t| !g.is_output(t))
            .collect();
        let bytes = with_extra_outputs(&bytes, &extra);
        Ok(Self {
            graph: g,
            bytes,
            fetch,
            score,
            score_is_logit,
            target,
        })
    }
}

impl ImageModel {
    /// Loads the package in `dir` described by `manifest`. A model with a remote backend
    /// still needs its ONNX file: the graph is checked, one local CPU run plans the heatmap
    /// method, and the head weights compute Grad-CAM from the feature map the engine returns.
    ///
    /// # Errors
    /// [`LoadError`] naming the ONNX file when it is unreadable, inconsistent with the manifest or
    /// rejected by ONNX Runtime.
    pub fn load(
        dir: &Path,
        manifest: Manifest,
        env: &Environment,
        load: &LoadOptions,
    ) -> Result<Self, LoadError> {
        let opts = load.session;
        let path = manifest.model_path(dir);
        let fail = |message: String| LoadError {
            path: path.clone(),
            message,
        };
        let ServingGraph {
            graph: g,
            bytes: model_bytes,
            fetch,
            score,
            score_is_logit,
            target,
        } = ServingGraph::plan(dir, &manifest)?;
        let input = manifest
            .input
            .as_ref()
            .ok_or_else(|| fail("no [input] in the manifest".into()))?;
        let remote = manifest.backend.kind == BackendKind::KserveV2;
        let local_opts = if remote {
            // one CPU session, for the warm-up run only
            SessionOptions {
                provider: runtime::ExecutionProvider::Cpu,
                ..opts
            }
        } else {
            opts
        };
        let (session, provider) = runtime::session(env, &model_bytes, local_opts, &manifest.name)
            .map_err(|e| fail(e.to_string()))?;
        let mut sessions = vec![session];
        if !remote && provider == "CPUExecutionProvider" {
            let cpu = SessionOptions {
                provider: runtime::ExecutionProvider::Cpu,
                ..opts
            };
            for _ in 1..opts.cpu_sessions() {
                let (s, _) = runtime::session(env, &model_bytes, cpu, &manifest.name)
                    .map_err(|e| fail(e.to_string()))?;
                sessions.push(s);
            }
        }
        // The warm-up run (it plans the heatmap method) goes straight to the first session,
        // not through the engine's queue, where it would wait max_wait for a batch.
        let warm_in = warmup_input(input).map_err(|e| fail(e.to_string()))?;
        let warm_out = run_batch(
            &mut sessions[0],
            &input.name,
            &fetch,
            &[&FloatTensor {
                shape: warm_in.shape.to_vec(),
                data: warm_in.data,
            }],
        )
        .map_err(|e| fail(format!("warm-up run failed: {e}")))?
        .pop()
        .ok_or_else(|| fail("warm-up run gave no output".into()))?;
        let (backend, provider) = if remote {
            drop(sessions);
            let r = RemoteEngine::new(
                &manifest.backend,
                &load.outbound,
                &manifest.name,
                &input.name,
                fetch,
            )
            .map_err(fail)?;
            tracing::info!(model = %manifest.name, endpoint = r.endpoint(), "inference runs on a serving engine");
            (Backend::Remote(Box::new(r)), "kserve-v2")
        } else {
            let engine = Engine::start(
                sessions,
                input.name.clone(),
                fetch,
                load.batching,
                &manifest.name,
            );
            (Backend::Local(engine), provider)
        };
        let mut model = Self {
            layout: manifest.gradcam.layout,
            probs: manifest.output.probabilities.clone(),
            logits: manifest.output.logits.clone(),
            manifest,
            dir: dir.to_path_buf(),
            provider,
            backend,
            score,
            score_is_logit,
            target,
            cam: CamPlan::Unavailable(String::new()),
        };
        model.cam = model
            .plan_cam(&warm_out, &g, env, opts)
            .map_err(|e| fail(format!("warm-up run failed: {e}")))?;
        if let CamPlan::Unavailable(why) = &model.cam {
            tracing::warn!(model = %model.manifest.name, "no heatmap method: {why}");
        }
        Ok(model)
    }

    /// The method heatmaps will use.
    pub fn cam_method(&self) -> CamMethod {
        match self.cam {
            CamPlan::Exact(_) => CamMethod::GradCam,
            CamPlan::Recipro(_) => CamMethod::ReciproCam,
            CamPlan::Unavailable(_) => CamMethod::None,
        }
    }

    /// Batches run and samples answered by this model's engine so far (for a remote
    /// backend: calls, each one sample).
    pub fn batch_stats(&self) -> BatchStats {
        self.backend.stats()
    }

    /// The Grad-CAM target tensor.
    pub fn cam_target(&self) -> Option<&str> {
        self.target.as_deref()
    }

    /// Chooses the CAM plan from `out`, the outputs of the warm-up run.
    fn plan_cam(
        &self,
        out: &Outputs,
        g: &OnnxGraph,
        env: &Environment,
        opts: SessionOptions,
    ) -> Result<CamPlan, EngineError> {
        let Some(target) = self.target.clone() else {
            return Ok(CamPlan::Unavailable(
                "no target tensor: set [gradcam] target".into(),
            ));
        };
        let exact_err = match Head::compile(g, &target, &self.score) {
            Ok(head) => match verify_head(&head, out, &target, &self.score) {
                Ok(()) => return Ok(CamPlan::Exact(head)),
                Err(e) => e,
            },
            Err(e) => e.to_string(),
        };
        let nodes = g.path_nodes(&target, &self.score);
        let sub = extract_submodel(g, &nodes, &target, &[self.score.as_str()]);
        let cpu = SessionOptions {
            provider: runtime::ExecutionProvider::Cpu,
            ..opts
        };
        match runtime::session(env, &sub, cpu, "head") {
            Ok((mut s, _)) => {
                let a = &out[&target];
                match run_batch(&mut s, &target, std::slice::from_ref(&self.score), &[a]) {
                    Ok(_) => {
                        tracing::info!(model = %self.manifest.name, "exact Grad-CAM unavailable ({exact_err}); using ReciproCAM");
                        Ok(CamPlan::Recipro(Mutex::new(s)))
                    }
                    Err(e) => Ok(CamPlan::Unavailable(format!(
                        "{exact_err}; head sub-model failed: {e}"
                    ))),
                }
            }
            Err(e) => Ok(CamPlan::Unavailable(format!(
                "{exact_err}; head sub-model rejected: {e}"
            ))),
        }
    }

    /// Labels in output order.
    pub fn labels(&self) -> &[super::manifest::Label] {
        &self.manifest.labels
    }

    /// Preprocesses `img` (CPU; call off the async runtime).
    ///
    /// # Errors
    /// [`EngineError::Run`] when the model has no image input or the resizer refuses the image.
    pub fn prepare(&self, img: &image::DynamicImage) -> Result<InputTensor, EngineError> {
        let spec = self
            .manifest
            .input
            .as_ref()
            .ok_or_else(|| EngineError::Run("the model has no image input".into()))?;
        preprocess(img, spec).map_err(|e| EngineError::Run(e.to_string()))
    }

    /// Runs the model on a prepared input.
    ///
    /// # Errors
    /// [`EngineError`] from ONNX Runtime.
    pub async fn infer(&self, input: &InputTensor) -> Result<Outputs, EngineError> {
        self.backend
            .run(FloatTensor {
                shape: input.shape.to_vec(),
                data: input.data.clone(),
            })
            .await
    }

    /// Same as [`ImageModel::infer`] for threads outside the async runtime.
    ///
    /// # Errors
    /// [`EngineError`] from ONNX Runtime.
    pub fn infer_blocking(&self, input: &InputTensor) -> Result<Outputs, EngineError> {
        self.backend.run_blocking(FloatTensor {
            shape: input.shape.to_vec(),
            data: input.data.clone(),
        })
    }

    /// Probabilities, the winner and the heatmap from raw outputs (CPU; off the async runtime).
    ///
    /// # Errors
    /// [`EngineError::Run`] when expected outputs are missing or malformed.
    pub fn interpret(&self, input: InputTensor, out: &Outputs) -> Result<Prediction, EngineError> {
        let (probabilities, class) = self.classify(out)?;
        let cam = self.heatmap(out, class)?;
        Ok(Prediction {
            probabilities,
            class,
            input,
            cam,
        })
    }

    /// Probabilities in label order and the winning index, from raw outputs.
    ///
    /// # Errors
    /// [`EngineError::Run`] when the probability output is missing or has the wrong length.
    pub fn classify(&self, out: &Outputs) -> Result<(Vec<f32>, usize), EngineError> {
        let probabilities = match (&self.probs, &self.logits) {
            (Some(p), _) => out.get(p).map(|t| t.data.clone()),
            (None, Some(l)) => out.get(l).map(|t| softmax(&t.data)),
            (None, None) => None,
        }
        .ok_or_else(|| EngineError::Run("the probability output is missing".into()))?;
        if probabilities.len() != self.manifest.labels.len() {
            return Err(EngineError::Run(format!(
                "the model gave {} probabilities for {} labels",
                probabilities.len(),
                self.manifest.labels.len()
            )));
        }
        let class = probabilities
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &p)| {
                if p > best.1 {
                    (i, p)
                } else {
                    best
                }
            })
            .0;
        Ok((probabilities, class))
    }

    /// The heatmap for `class` from the outputs of a run (fetched target included).
    ///
    /// # Errors
    /// [`EngineError::Run`] when the head cannot be evaluated on these outputs.
    pub fn heatmap(&self, out: &Outputs, class: usize) -> Result<Option<Cam>, EngineError> {
        let Some(target) = &self.target else {
            return Ok(None);
        };
        let Some(a) = out.get(target) else {
            return Ok(None);
        };
        match &self.cam {
            CamPlan::Exact(head) => {
                let arr = ArrayD::from_shape_vec(IxDyn(&a.shape), a.data.clone())
                    .map_err(|e| EngineError::Run(e.to_string()))?;
                let values = head
                    .forward(arr)
                    .map_err(|e| EngineError::Run(e.to_string()))?;
                let grad = head
                    .gradient(&values, class)
                    .map_err(|e| EngineError::Run(e.to_string()))?;
                let g: Vec<f32> = grad.iter().copied().collect();
                Ok(gradcam::grad_cam(&a.data, &g, &a.shape, self.layout, class))
            }
            CamPlan::Recipro(session) => {
                let Some((shape, data)) = gradcam::reciprocam_batch(&a.data, &a.shape, self.layout)
                else {
                    return Ok(None);
                };
                let Some((_, h, w)) = gradcam::feature_dims(&a.shape, self.layout) else {
                    return Ok(None);
                };
                let batch = FloatTensor { shape, data };
                let mut s = session.lock().map_err(|_| EngineError::Stopped)?;
                let out = run_batch(&mut s, target, std::slice::from_ref(&self.score), &[&batch])?;
                let scores = out
                    .first()
                    .and_then(|o| o.get(&self.score))
                    .ok_or_else(|| EngineError::Run("head gave no score".into()))?;
                let classes = scores.shape.get(1).copied().unwrap_or(0);
                Ok(gradcam::reciprocam_map(
                    &scores.data,
                    classes,
                    h,
                    w,
                    class,
                    self.score_is_logit,
                ))
            }
            CamPlan::Unavailable(_) => Ok(None),
        }
    }
}

/// The warm-up input: a fixed gray pattern at the model's input size, preprocessed.
fn warmup_input(spec: &super::manifest::ImageInput) -> Result<InputTensor, EngineError> {
    let (h, w) = spec.size();
    let img = image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(w, h, |x, y| {
        image::Luma([(((x * 7 + y * 13) % 251) as u8).wrapping_mul(3)])
    }));
    preprocess(&img, spec).map_err(|e| EngineError::Run(e.to_string()))
}

/// The tensor differentiated for Grad-CAM: the logits when named, or the input of the final
/// Softmax, or the probabilities themselves.
fn score_tensor(g: &OnnxGraph, m: &Manifest) -> (String, bool) {
    if let Some(l) = &m.output.logits {
        return (l.clone(), true);
    }
    let probs = m.output.probabilities.clone().unwrap_or_default();
    match g.producer(&probs) {
        Some(n) if n.op_type == "Softmax" => (n.input.first().cloned().unwrap_or(probs), true),
        _ => (probs, false),
    }
}

fn verify_head(head: &Head, out: &Outputs, target: &str, score: &str) -> Result<(), String> {
    let a = out.get(target).ok_or("target not fetched")?;
    let want = out.get(score).ok_or("score not fetched")?;
    let arr = ArrayD::from_shape_vec(IxDyn(&a.shape), a.data.clone()).map_err(|e| e.to_string())?;
    let values = head.forward(arr).map_err(|e| e.to_string())?;
    let got = head.score(&values).ok_or("no score")?;
    if got.len() != want.data.len() {
        return Err(format!(
            "head gives {} scores, the model {}",
            got.len(),
            want.data.len()
        ));
    }
    let worst = got
        .iter()
        .zip(&want.data)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0f32, f32::max);
    if worst > 1e-3 {
        return Err(format!(
            "the Rust head differs from ONNX Runtime by {worst:.2e}"
        ));
    }
    Ok(())
}
