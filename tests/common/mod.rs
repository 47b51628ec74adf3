//! Shared helpers for integration tests: fixture paths and a process-wide model registry.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod server;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use carina::inference::{Batching, ExecutionProvider, LoadOptions, Registry, SessionOptions};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}

pub fn load_options() -> LoadOptions {
    LoadOptions {
        session: SessionOptions {
            provider: ExecutionProvider::Auto,
            intra_threads: 1,
            sessions: 1,
        },
        batching: Batching::immediate(4),
        onnxruntime: None,
        outbound: Default::default(),
    }
}

/// The fixture models (tiny-gap, tiny-maxpool, tiny-mlp-head), loaded once per test binary.
pub fn registry() -> Arc<Registry> {
    static REG: OnceLock<Arc<Registry>> = OnceLock::new();
    REG.get_or_init(|| {
        Arc::new(
            Registry::load(&fixtures().join("models"), &load_options())
                .expect("fixture models load"),
        )
    })
    .clone()
}

pub fn npy(path: impl Into<PathBuf>) -> (Vec<usize>, Vec<f32>) {
    let p = path.into();
    let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    carina::render::npy::decode_f32(&bytes).unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// [`registry`] from async code (loading blocks on warm-up runs).
pub async fn registry_async() -> Arc<Registry> {
    tokio::task::spawn_blocking(registry).await.unwrap()
}

/// Carina for one test, wired by the same [`carina::app::App::build`] as `carina serve`: a
/// fresh SQLite database in a temp folder (or a fresh PostgreSQL database when
/// `CARINA_TEST_DATABASE_URL` is set), the fixture models unless [`TestApp::with_models`] says
/// otherwise, no background workers: [`TestApp::run_jobs`] drains the queue.
pub struct TestApp {
    /// The wired app (its state: store, ingest, jobs, …).
    pub app: carina::app::App,
    /// The routes over it.
    pub router: axum::Router,
    /// The settings it was built from (data_dir is [`Self::dir`]).
    pub settings: carina::config::Settings,
    /// The data folder, removed when the test ends.
    pub dir: tempfile::TempDir,
}

/// What a [`TestApp`] is built from: settings for a test (loopback, no disk-space floor, the
/// Host `carina.test` allowed in links) that `configure` may change, and the models.
pub struct TestAppBuilder {
    settings: carina::config::Settings,
    models: Option<Arc<Registry>>,
    max_body: Option<usize>,
}

impl TestAppBuilder {
    /// Changes the settings before the app is built.
    pub fn configure(mut self, f: impl FnOnce(&mut carina::config::Settings)) -> Self {
        f(&mut self.settings);
        self
    }

    /// Uses `models` instead of the fixture models.
    pub fn with_models(mut self, models: Arc<Registry>) -> Self {
        self.models = Some(models);
        self
    }

    /// A body limit in bytes (settings count MiB; tests of the limit want less).
    pub fn max_body(mut self, bytes: usize) -> Self {
        self.max_body = Some(bytes);
        self
    }

    /// Builds the app.
    pub async fn build(self) -> TestApp {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = self.settings;
        settings.data_dir = dir.path().to_path_buf();
        if let Some(admin) = pg_url() {
            settings.database_url = Some(fresh_pg_database(&admin).await);
        }
        let models = match self.models {
            Some(m) => m,
            None => registry_async().await,
        };
        let mut app = carina::app::App::build(&settings, models).await.unwrap();
        if let Some(b) = self.max_body {
            app.state.max_body = b;
            app.state.fhir_max_body = app.state.fhir_max_body.min(b);
        }
        TestApp {
            router: carina::api::router(app.state.clone()),
            app,
            settings,
            dir,
        }
    }
}

impl TestApp {
    /// A builder with the test defaults.
    pub fn builder() -> TestAppBuilder {
        let mut settings = carina::config::Settings::default();
        settings.dicom.min_free_mb = 0;
        settings.allowed_hosts = vec!["carina.test".into()];
        TestAppBuilder {
            settings,
            models: None,
            max_body: None,
        }
    }

    /// The default test app.
    pub async fn spawn() -> Self {
        Self::builder().build().await
    }

    /// The handler state.
    pub fn state(&self) -> &carina::app::AppState {
        &self.app.state
    }

    /// The store.
    pub fn store(&self) -> &carina::store::Store {
        &self.app.state.store
    }

    /// The ingest service (the DIMSE listener's and STOW's way in).
    pub fn ingest(&self) -> carina::ingest::Ingest {
        self.app.state.ingest.clone()
    }

    /// Runs queued jobs until none is due (imaging analyses, ImagingStudy jobs, risk
    /// assessments); returns how many ran.
    pub async fn run_jobs(&self) -> usize {
        self.app.state.jobs.worker().run_until_idle().await
    }

    /// Runs the job workers in the background for the rest of the test (for requests that
    /// wait for the jobs they start, like a synchronous FHIR write).
    pub fn spawn_workers(&self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(
            self.app
                .state
                .jobs
                .worker()
                .run_until(std::future::pending()),
        )
    }

    /// Sends `req` through the router (no socket); status, headers and body bytes.
    pub async fn send(&self, req: Request<Body>) -> (StatusCode, HeaderMap, Vec<u8>) {
        send(&self.router, req).await
    }

    /// Serves the router on a loopback port (bound to port 0, kept) for real clients; the
    /// server stops when the handle is dropped or aborted.
    pub async fn serve_http(&self) -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = self.router.clone();
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        (addr, task)
    }
}

/// Sends `req` through `router` (tower `oneshot`, no socket); status, headers and body bytes.
pub async fn send(router: &axum::Router, req: Request<Body>) -> (StatusCode, HeaderMap, Vec<u8>) {
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let res = router.clone().oneshot(req).await.unwrap();
    let (status, headers) = (res.status(), res.headers().clone());
    let body = res.into_body().collect().await.unwrap().to_bytes().to_vec();
    (status, headers, body)
}

/// `GET uri` with the test Host (`carina.test`, allowed in links).
pub fn get(uri: &str) -> Request<Body> {
    Request::get(uri)
        .header(axum::http::header::HOST, "carina.test")
        .body(Body::empty())
        .unwrap()
}

/// `POST uri` of `body` as `content_type`, with the test Host.
pub fn post(uri: &str, content_type: &str, body: Vec<u8>) -> Request<Body> {
    Request::post(uri)
        .header(axum::http::header::CONTENT_TYPE, content_type)
        .header(axum::http::header::HOST, "carina.test")
        .body(Body::from(body))
        .unwrap()
}

/// The real router with the fixture models and a fresh store in a temp folder.
pub async fn app(max_body: usize) -> (axum::Router, tempfile::TempDir) {
    let (r, d, _) = app_with_ingest(max_body).await;
    (r, d)
}

/// [`app`] plus its ingest service (to run the DIMSE SCP).
pub async fn app_with_ingest(
    max_body: usize,
) -> (axum::Router, tempfile::TempDir, carina::ingest::Ingest) {
    let t = test_app(max_body).await;
    (t.router, t.dir, t.app.state.ingest)
}

/// [`TestApp`] with a body limit of `max_body` bytes.
pub async fn test_app(max_body: usize) -> TestApp {
    TestApp::builder().max_body(max_body).build().await
}

/// A fresh store for one test, blobs in `dir`. The database is SQLite in `dir`, or, when
/// `CARINA_TEST_DATABASE_URL` names a PostgreSQL server (`postgres://user@host:port/db`), a new
/// database `carina_test_<random>` created on it: the same tests run on both.
pub async fn store(dir: &std::path::Path) -> carina::store::Store {
    match pg_url() {
        None => carina::store::Store::open(dir).await.unwrap(),
        Some(admin) => {
            let url = fresh_pg_database(&admin).await;
            carina::store::Store::connect(Some(&url), dir)
                .await
                .unwrap()
        }
    }
}

/// The PostgreSQL server the tests use, when set.
pub fn pg_url() -> Option<String> {
    std::env::var("CARINA_TEST_DATABASE_URL")
        .ok()
        .filter(|u| u.starts_with("postgres"))
}

/// Creates an empty database on the server of `admin` and returns its URL.
pub async fn fresh_pg_database(admin: &str) -> String {
    use sqlx::Connection;
    let name = format!("carina_test_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(admin).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&mut conn)
        .await
        .unwrap();
    let base = admin.rsplit_once('/').map_or(admin, |(b, _)| b);
    format!("{base}/{name}")
}

pub fn sample(name: &str) -> Vec<u8> {
    std::fs::read(root().join(name)).unwrap()
}

/// Runs both external FHIR R4 validators (official JSON schema, fhir.resources 6.4.0) on
/// `files` and fails the test with their report when either refuses one.
pub fn validate_fhir(files: &[&std::path::Path]) {
    use std::process::Command;
    let node = Command::new("node")
        .arg("tests/fhir/validate.mjs")
        .args(files)
        .current_dir(root())
        .output();
    let node = node.expect("node runs (scripts/setup.sh --test installs the validator)");
    assert!(
        node.status.success(),
        "R4 JSON schema: {}{}",
        String::from_utf8_lossy(&node.stdout),
        String::from_utf8_lossy(&node.stderr)
    );
    let py = Command::new(root().join(".venv/bin/python"))
        .arg("tests/fhir/validate_fhir_resources.py")
        .args(files)
        .current_dir(root())
        .output();
    let py = py.expect(".venv exists (scripts/setup.sh --test)");
    assert!(
        py.status.success(),
        "fhir.resources: {}{}",
        String::from_utf8_lossy(&py.stdout),
        String::from_utf8_lossy(&py.stderr)
    );
}
