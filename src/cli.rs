//! Command line: `carina serve | predict | models`. Parsing and the offline commands; the server
//! itself is assembled in `main`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::analysis::pipeline::{self, Analysis};
use crate::config::Settings;
use crate::imaging::MediaType;
use crate::inference::{
    Batching, ExecutionProvider, ImageModel, LoadOptions, Registry, SessionOptions,
};
use crate::render::npy;

/// Carina: AI models in hospital workflows (demo models, not for clinical use).
#[derive(Debug, Parser)]
#[command(name = "carina", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server.
    Serve(Common),
    /// Run the analysis pipeline offline on DICOM/PNG/JPEG files.
    Predict(PredictArgs),
    /// List the loaded models.
    Models(Common),
    /// Write the ONNX file a serving engine (Triton, KServe, MLServer) should load for a model
    /// package with `[backend] kind = "kserve-v2"`: the package's graph with every tensor
    /// Carina fetches (probabilities or logits, the Grad-CAM feature map) made an output.
    ExportServing(ExportArgs),
}

/// `carina export-serving` arguments.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The model package folder (holding `model.toml`).
    pub package: PathBuf,
    /// Where to write the ONNX file.
    #[arg(long)]
    pub out: PathBuf,
}

/// Flags shared by every command (each also settable in `carina.toml` and as `CARINA_*`).
#[derive(Debug, Args, Clone)]
pub struct Common {
    /// Config file (default: ./carina.toml when present).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// HTTP listen address (default 127.0.0.1:8080; another address needs [auth] or auth.mode = "none").
    #[arg(long)]
    pub http: Option<std::net::SocketAddr>,
    /// Data folder (default ./data).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Model packages folder (default ./models).
    #[arg(long)]
    pub models: Option<PathBuf>,
    /// Execution provider: auto, cuda or cpu.
    #[arg(long, value_enum)]
    pub execution_provider: Option<ExecutionProvider>,
    /// DIMSE C-ECHO/C-STORE listen address, e.g. 0.0.0.0:11112 (off by default).
    #[arg(long)]
    pub dimse: Option<std::net::SocketAddr>,
    /// DICOM AE title (default CARINA).
    #[arg(long)]
    pub ae_title: Option<String>,
    /// Database: postgres://user@host/db (shared by replicas) or sqlite://FILE (default: SQLite
    /// carina.db in the data folder).
    #[arg(long)]
    pub database_url: Option<String>,
}

/// `carina predict` arguments.
#[derive(Debug, Args)]
pub struct PredictArgs {
    /// Common flags.
    #[command(flatten)]
    pub common: Common,
    /// Input files.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Folder for `<stem>.bundle.json`, `.overlay.png`, `.cam.npy`, `.input.npy`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Model name (default: the first image model).
    #[arg(long)]
    pub model: Option<String>,
    /// Files processed at once (default: number of cores).
    #[arg(long)]
    pub jobs: Option<usize>,
}

impl Common {
    /// Settings from file and environment, then these flags.
    ///
    /// # Errors
    /// On an invalid config file or variable.
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let mut s = Settings::load(self.config.as_deref())?;
        if let Some(v) = self.http {
            s.http = v;
        }
        if let Some(v) = &self.data_dir {
            s.data_dir = v.clone();
        }
        if let Some(v) = &self.models {
            s.models = v.clone();
        }
        if let Some(v) = self.execution_provider {
            s.execution_provider = v;
        }
        if let Some(v) = self.dimse {
            s.dicom.dimse = Some(v);
        }
        if let Some(v) = &self.ae_title {
            s.dicom.ae_title = v.clone();
        }
        if let Some(v) = &self.database_url {
            s.database_url = Some(v.clone());
        }
        Ok(s)
    }
}

/// Load options from settings.
pub fn load_options(s: &Settings) -> LoadOptions {
    LoadOptions {
        session: SessionOptions {
            provider: s.execution_provider,
            intra_threads: s.intra_threads,
            sessions: s.sessions_per_model,
        },
        batching: Batching {
            max_batch: s.max_batch,
            max_wait: Duration::from_micros(s.max_wait_us),
        },
        onnxruntime: s.onnxruntime.clone(),
        outbound: s.outbound.clone(),
    }
}

/// `carina models`: one JSON document on stdout.
///
/// # Errors
/// When models cannot be loaded.
pub fn models(common: &Common) -> anyhow::Result<()> {
    let s = common.settings()?;
    let reg = Registry::load(&s.models, &load_options(&s))?;
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({"models": reg.describe()}))?
    );
    Ok(())
}

/// `carina export-serving`: writes the serving graph, prints what it holds as JSON.
///
/// # Errors
/// When the package is unreadable or inconsistent, or the file cannot be written.
pub fn export_serving(args: &ExportArgs) -> anyhow::Result<()> {
    let manifest = crate::inference::Manifest::load(&args.package.join("model.toml"))?;
    let plan = crate::inference::model::ServingGraph::plan(&args.package, &manifest)?;
    std::fs::write(&args.out, &plan.bytes)
        .map_err(|e| anyhow::anyhow!("{}: {e}", args.out.display()))?;
    let input = manifest.input.as_ref().map(|i| (&i.name, &i.shape));
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "model": manifest.backend.model.as_deref().unwrap_or(&manifest.name),
            "file": args.out,
            "input": input.map(|(name, shape)| json!({"name": name, "shape": shape, "datatype": "FP32"})),
            "outputs": plan.fetch,
        }))?
    );
    Ok(())
}

/// `carina predict`: one JSON line per file on stdout, in input order; files into `--out`.
/// Exits non-zero when any file failed.
///
/// # Errors
/// When models cannot be loaded or `--out` cannot be created; per-file failures are reported
/// as JSON lines and counted.
pub fn predict(args: &PredictArgs) -> anyhow::Result<usize> {
    let s = args.common.settings()?;
    let reg = Registry::load(&s.models, &load_options(&s))?;
    let model = reg
        .image_model(args.model.as_deref())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no image model named '{}'",
                args.model.as_deref().unwrap_or("(default)")
            )
        })?
        .clone();
    if let Some(out) = &args.out {
        std::fs::create_dir_all(out)?;
    }
    let jobs = args
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .max(1);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Vec<std::sync::Mutex<Option<serde_json::Value>>> = args
        .files
        .iter()
        .map(|_| std::sync::Mutex::new(None))
        .collect();
    std::thread::scope(|scope| {
        for _ in 0..jobs.min(args.files.len()) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(file) = args.files.get(i) else { break };
                let line = predict_one(&model, file, args.out.as_deref());
                if let Ok(mut slot) = results[i].lock() {
                    *slot = Some(line);
                }
            });
        }
    });
    let mut failed = 0;
    for r in results {
        let line = r
            .into_inner()
            .ok()
            .flatten()
            .unwrap_or_else(|| json!({"error": "not processed"}));
        failed += usize::from(line.get("error").is_some());
        println!("{line}");
    }
    Ok(failed)
}

fn predict_one(model: &Arc<ImageModel>, file: &Path, out: Option<&Path>) -> serde_json::Value {
    let name = file.display().to_string();
    let run = || -> anyhow::Result<serde_json::Value> {
        let bytes = std::fs::read(file)?;
        let media = MediaType::sniff(&bytes)
            .ok_or_else(|| anyhow::anyhow!("not a PNG, JPEG or DICOM Part 10 file"))?;
        let a = pipeline::analyse_blocking(model, &bytes, media, &|_| None)?;
        if let Some(dir) = out {
            write_outputs(&a, file, dir)?;
        }
        Ok(json!({
            "file": name,
            "model": format!("{} {}", a.model.manifest.name, a.model.manifest.version),
            "label": a.label_key(),
            "probabilities": a.probabilities_json(),
            "cam_method": a.cam_method().as_str(),
        }))
    };
    run().unwrap_or_else(|e| json!({"file": name, "error": e.to_string()}))
}

fn write_outputs(a: &Analysis, file: &Path, dir: &Path) -> anyhow::Result<()> {
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
    std::fs::write(
        dir.join(format!("{stem}.bundle.json")),
        serde_json::to_vec_pretty(&a.bundle)?,
    )?;
    if let Some(png) = &a.overlay_png {
        std::fs::write(dir.join(format!("{stem}.overlay.png")), png)?;
    }
    if let Some(cam) = &a.prediction.cam {
        std::fs::write(
            dir.join(format!("{stem}.cam.npy")),
            npy::encode_f32(&[cam.h, cam.w], &cam.data),
        )?;
    }
    let input = &a.prediction.input;
    std::fs::write(
        dir.join(format!("{stem}.input.npy")),
        npy::encode_f32(&input.shape, &input.data),
    )?;
    Ok(())
}
