//! A loaded image model: manifest + session engine + the Grad-CAM plan chosen at load time.
//! The plan is exact Grad-CAM when the head compiles and its Rust forward pass reproduces ONNX
//! Runtime's scores; otherwise ReciproCAM on a head sub-model; otherwise no map (with a reason).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use ndarray::{ArrayD, IxDyn};
use ort::environment::Environment;
use ort::session::Session;

use super::engine::{run_batch, Engine, EngineError, FloatTensor, Outputs};
use super::gradcam::{self, Cam, CamMethod};
use super::head::Head;
use super::manifest::{Layout, Manifest};
use super::onnx::{extract_submodel, with_extra_outputs, OnnxGraph};
use super::preprocess::{preprocess, InputTensor};
use super::runtime::{self, SessionOptions};

/// A model that could not be loaded: names the file and the problem.
#[derive(Debug, thiserror::Error)]
#[error("{}: {message}", path.display())]
pub struct LoadError {
    /// The file at fault.
    pub path: PathBuf,
    /// What is wrong.
    pub message: String,
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
    /// Provider running the session.
    pub provider: &'static str,
    engine: Engine,
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

impl ImageModel {
    /// Loads the package in `dir` described by `manifest`.
    ///
    /// # Errors
    /// [`LoadError`] naming the ONNX file when it is unreadable, inconsistent with the manifest or
    /// rejected by ONNX Runtime.
    pub fn load(
        dir: &Path,
        manifest: Manifest,
        env: &Environment,
        opts: SessionOptions,
        max_batch: usize,
    ) -> Result<Self, LoadError> {
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
        let (score, score_is_logit) = score_tensor(&g, &manifest);
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
        let model_bytes = with_extra_outputs(&bytes, &extra);
        let (session, provider) = runtime::session(env, &model_bytes, opts, &manifest.name)
            .map_err(|e| fail(e.to_string()))?;
        let mut sessions = vec![session];
        if provider == "CPUExecutionProvider" {
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
        let engine = Engine::start(
            sessions,
            input.name.clone(),
            fetch,
            max_batch,
            &manifest.name,
        );
        let mut model = Self {
            layout: manifest.gradcam.layout,
            probs: manifest.output.probabilities.clone(),
            logits: manifest.output.logits.clone(),
            manifest,
            dir: dir.to_path_buf(),
            provider,
            engine,
            score,
            score_is_logit,
            target,
            cam: CamPlan::Unavailable(String::new()),
        };
        model.cam = model
            .plan_cam(&g, env, opts)
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

    /// The Grad-CAM target tensor.
    pub fn cam_target(&self) -> Option<&str> {
        self.target.as_deref()
    }

    /// Chooses the CAM plan with one warm-up run on a fixed pattern.
    fn plan_cam(
        &self,
        g: &OnnxGraph,
        env: &Environment,
        opts: SessionOptions,
    ) -> Result<CamPlan, EngineError> {
        let Some(target) = self.target.clone() else {
            return Ok(CamPlan::Unavailable(
                "no target tensor: set [gradcam] target".into(),
            ));
        };
        let input = self.warmup_input();
        let out = self.engine.run_blocking(FloatTensor {
            shape: input.shape.to_vec(),
            data: input.data,
        })?;
        let exact_err = match Head::compile(g, &target, &self.score) {
            Ok(head) => match verify_head(&head, &out, &target, &self.score) {
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

    fn warmup_input(&self) -> InputTensor {
        let spec = self.manifest.input.as_ref();
        let (h, w) = spec.map_or((1, 1), |s| s.size());
        let img = image::DynamicImage::ImageLuma8(image::GrayImage::from_fn(w, h, |x, y| {
            image::Luma([(((x * 7 + y * 13) % 251) as u8).wrapping_mul(3)])
        }));
        match spec {
            Some(s) => preprocess(&img, s),
            None => InputTensor {
                shape: [1, 1, 1, 1],
                data: vec![0.0],
                geometry: super::preprocess::Geometry {
                    input_w: 1,
                    input_h: 1,
                    left: 0,
                    top: 0,
                    content_w: 1,
                    content_h: 1,
                },
            },
        }
    }

    /// Labels in output order.
    pub fn labels(&self) -> &[super::manifest::Label] {
        &self.manifest.labels
    }

    /// Preprocesses `img` (CPU; call off the async runtime).
    pub fn prepare(&self, img: &image::DynamicImage) -> Option<InputTensor> {
        self.manifest.input.as_ref().map(|s| preprocess(img, s))
    }

    /// Runs the model on a prepared input.
    ///
    /// # Errors
    /// [`EngineError`] from ONNX Runtime.
    pub async fn infer(&self, input: &InputTensor) -> Result<Outputs, EngineError> {
        self.engine
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
        self.engine.run_blocking(FloatTensor {
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
