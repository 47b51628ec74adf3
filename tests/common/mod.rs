//! Shared helpers for integration tests: fixture paths and a process-wide model registry.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod server;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use carina::inference::{ExecutionProvider, LoadOptions, Registry, SessionOptions};

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
        max_batch: 4,
        onnxruntime: None,
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

/// The real router with the fixture models and a fresh SQLite store in a temp folder.
pub async fn app(max_body: usize) -> (axum::Router, tempfile::TempDir) {
    let (r, d, _) = app_with_ingest(max_body).await;
    (r, d)
}

/// [`app`] plus its ingest service (to run the analysis worker or the DIMSE SCP).
pub async fn app_with_ingest(
    max_body: usize,
) -> (axum::Router, tempfile::TempDir, carina::ingest::Ingest) {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let models = registry_async().await;
    let ingest = carina::ingest::Ingest::new(store.clone(), models.clone(), Vec::new(), 0, None);
    let state = carina::app::AppState::new(models, store, None, max_body, ingest.clone())
        .unwrap()
        .with_outbound(
            carina::outbound::Outbound::with_configured(&[]).unwrap(),
            vec!["carina.test".into()],
        );
    (carina::api::router(state), dir, ingest)
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
