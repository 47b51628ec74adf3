//! The durable job queue, on the test database (SQLite, or PostgreSQL when
//! CARINA_TEST_DATABASE_URL is set): leases, expiry, retries with backoff, dead letters,
//! de-duplication, concurrent claims, and the `/v1/jobs` API. Time moves by the queue's
//! injectable clock: no test sleeps through a lease or a backoff.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use carina::store::{Clock, JobKind, JobState, NewJob, Source, Store};
use http_body_util::BodyExt;
use tower::ServiceExt;

fn job(subject: &str, dedupe: Option<&str>, max_attempts: i64) -> NewJob {
    NewJob {
        kind: JobKind::Risk,
        subject: subject.into(),
        payload: serde_json::json!({"n": subject}),
        dedupe: dedupe.map(str::to_string),
        max_attempts,
    }
}

async fn fresh() -> (Store, tempfile::TempDir) {
    let (store, _, dir) = fresh_with_clock().await;
    (store, dir)
}

async fn fresh_with_clock() -> (Store, Clock, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let clock = Clock::default();
    let store = common::store(dir.path()).await.with_clock(clock.clone());
    (store, clock, dir)
}

#[tokio::test]
async fn lease_expiry_retry_backoff_and_dead_letter() {
    let (store, clock, _d) = fresh_with_clock().await;
    let id = store
        .enqueue(&job("a", Some("k:a"), 2))
        .await
        .unwrap()
        .unwrap();
    // the same key enqueues nothing
    assert_eq!(
        store.enqueue(&job("a", Some("k:a"), 2)).await.unwrap(),
        None
    );

    let lease = Duration::from_secs(60);
    let got = store.claim_jobs("w1", 10, lease).await.unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].id.as_str(), got[0].attempts), (id.as_str(), 1));
    // leased: nobody else gets it
    assert!(store.claim_jobs("w2", 10, lease).await.unwrap().is_empty());
    // the lease expires (w1 "crashed"): w2 takes it over, and w1 can no longer finish it
    clock.advance(Duration::from_secs(61));
    let got = store.claim_jobs("w2", 10, lease).await.unwrap();
    assert_eq!((got.len(), got[0].attempts), (1, 2));
    assert!(!store
        .finish_job(&id, "w1", &serde_json::json!({}))
        .await
        .unwrap());
    // a failed last attempt is a dead letter with the reason
    let st = store
        .fail_job(&id, "w2", "boom", true, Duration::from_millis(10))
        .await
        .unwrap();
    assert_eq!(st, Some(JobState::Dead));
    let j = store.job(&id).await.unwrap().unwrap();
    assert_eq!(
        (j.state.as_str(), j.last_error.as_deref()),
        ("dead", Some("boom"))
    );

    // a retryable failure with attempts left is queued again, not before its backoff
    let id2 = store.enqueue(&job("b", None, 3)).await.unwrap().unwrap();
    let got = store.claim_jobs("w1", 10, lease).await.unwrap();
    assert_eq!(got[0].id, id2);
    let st = store
        .fail_job(&id2, "w1", "flaky", true, Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(st, Some(JobState::Queued));
    clock.advance(Duration::from_secs(29));
    assert!(
        store.claim_jobs("w1", 10, lease).await.unwrap().is_empty(),
        "backoff"
    );
    clock.advance(Duration::from_secs(2));
    let got = store.claim_jobs("w1", 10, lease).await.unwrap();
    assert_eq!((got.len(), got[0].attempts), (1, 2));
    assert!(store
        .finish_job(&id2, "w1", &serde_json::json!({"ok": 1}))
        .await
        .unwrap());
    let j = store.job(&id2).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Done);
    assert_eq!(j.result, Some(serde_json::json!({"ok": 1})));

    // a fatal failure is dead at once; a released job is queued again, its attempt not counted
    let id3 = store.enqueue(&job("c", None, 5)).await.unwrap().unwrap();
    store.claim_jobs("w1", 10, lease).await.unwrap();
    assert!(store.release_job(&id3, "w1").await.unwrap());
    let j = store.job(&id3).await.unwrap().unwrap();
    assert_eq!((j.state, j.attempts), (JobState::Queued, 0));
    store.claim_jobs("w1", 10, lease).await.unwrap();
    let st = store
        .fail_job(&id3, "w1", "bad input", false, Duration::from_millis(10))
        .await
        .unwrap();
    assert_eq!(st, Some(JobState::Dead));

    // a job whose worker died on its last allowed attempt becomes dead, not claimable forever
    let id4 = store.enqueue(&job("d", None, 1)).await.unwrap().unwrap();
    store.claim_jobs("w1", 10, lease).await.unwrap();
    clock.advance(Duration::from_secs(61));
    assert!(store.claim_jobs("w2", 10, lease).await.unwrap().is_empty());
    let j = store.job(&id4).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Dead);
    assert!(j.last_error.unwrap().contains("lease expired"));

    // ... and when it was an instance's analysis, the instance says failed and why, rather
    // than pending with nothing left to run it
    let ix = carina::dicom::InstanceIndex {
        sop_instance_uid: "1.2.826.0.1.3680043.8.498.7".into(),
        study_uid: "1.2.826.0.1.3680043.8.498.8".into(),
        series_uid: "1.2.826.0.1.3680043.8.498.9".into(),
        ..Default::default()
    };
    let analyse = NewJob {
        kind: JobKind::Analyse,
        subject: ix.sop_instance_uid.clone(),
        payload: serde_json::json!({}),
        dedupe: None,
        max_attempts: 1,
    };
    let (_, id5) = store
        .insert_instance(
            &ix,
            1,
            Source::Stow,
            "pending",
            Some("routed"),
            None,
            Some((&analyse, None)),
        )
        .await
        .unwrap();
    let claimed = store.claim_jobs("w1", 10, lease).await.unwrap();
    assert_eq!(
        claimed
            .iter()
            .map(|j| Some(j.id.clone()))
            .collect::<Vec<_>>(),
        vec![id5]
    );
    clock.advance(Duration::from_secs(61));
    assert!(store.claim_jobs("w2", 10, lease).await.unwrap().is_empty());
    let st = store
        .instance_status(&ix.sop_instance_uid)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(st.analysis_state, "failed");
    assert!(st
        .analysis_reason
        .unwrap_or_default()
        .contains("lease expired"));

    // pruning removes jobs finished longer than `keep` ago on the queue's clock, never dead
    // ones
    let day = Duration::from_secs(86_400);
    assert_eq!(store.prune_jobs(day).await.unwrap(), 0);
    clock.advance(day + Duration::from_secs(5));
    assert_eq!(store.prune_jobs(day).await.unwrap(), 1, "the one done job");
    assert!(store.job(&id2).await.unwrap().is_none());
    assert!(
        store.job(&id).await.unwrap().is_some(),
        "dead jobs are kept"
    );

    let counts = store.job_counts().await.unwrap();
    let dead = counts
        .iter()
        .find(|(k, s, _)| k == "risk" && s == "dead")
        .map(|c| c.2);
    assert_eq!(dead, Some(3));
}

#[tokio::test]
async fn concurrent_workers_claim_each_job_once() {
    let (store, _d) = fresh().await;
    let n = 120;
    for i in 0..n {
        store
            .enqueue(&job(&format!("s{i}"), None, 3))
            .await
            .unwrap();
    }
    let mut tasks = Vec::new();
    for w in 0..6 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let owner = format!("worker-{w}");
            let mut mine = Vec::new();
            loop {
                let got = store
                    .claim_jobs(&owner, 3, Duration::from_secs(30))
                    .await
                    .unwrap();
                if got.is_empty() {
                    break;
                }
                for j in got {
                    assert!(store
                        .finish_job(&j.id, &owner, &serde_json::json!({}))
                        .await
                        .unwrap());
                    mine.push(j.id);
                }
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let unique: HashSet<&String> = all.iter().collect();
    assert_eq!(all.len(), n, "every job claimed");
    assert_eq!(unique.len(), n, "no job claimed twice");
    let done = store
        .jobs(Some(JobState::Done), Some(JobKind::Risk), None, 1000, 0)
        .await
        .unwrap();
    assert_eq!(done.len(), n);
    assert!(done.iter().all(|j| j.attempts == 1));
}

#[tokio::test]
async fn jobs_api_lists_by_state_and_shows_one() {
    let (app, dir, ingest) = common::app_with_ingest(1 << 20).await;
    let _ = dir;
    let store = ingest.store().clone();
    let id = store.enqueue(&job("x", None, 3)).await.unwrap().unwrap();
    let get = |uri: String| {
        let app = app.clone();
        async move {
            let r = app
                .oneshot(Request::get(uri).body(Body::empty()).unwrap())
                .await
                .unwrap();
            let status = r.status();
            let body = r.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_default(),
            )
        }
    };
    let (s, v) = get(format!("/v1/jobs/{id}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        (v["state"].as_str(), v["kind"].as_str()),
        (Some("queued"), Some("risk"))
    );
    let (s, v) = get("/v1/jobs?state=queued".into()).await;
    assert_eq!(s, StatusCode::OK);
    assert!(v["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|j| j["id"] == id.as_str()));
    let (_, v) = get("/v1/jobs?state=done".into()).await;
    assert!(v["jobs"].as_array().unwrap().is_empty());
    let (s, v) = get("/v1/jobs?state=nonsense".into()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(v["resourceType"], "OperationOutcome");
    let (_, v) = get("/v1/jobs?kind=risk".into()).await;
    assert_eq!(v["jobs"].as_array().unwrap().len(), 1);
    let (s, _) = get("/v1/jobs?kind=test".into()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "an unknown kind");
    let (s, _) = get("/v1/jobs/no-such-job".into()).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    // an analysis, so inference and Grad-CAM are measured
    let jpg = std::fs::read(common::fixtures().join("images/hannover_4d98e1de.jpg")).unwrap();
    let r = app
        .clone()
        .oneshot(
            Request::post("/v1/analyze")
                .header("content-type", "image/jpeg")
                .body(Body::from(jpg))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // the queue depth is in /metrics
    let r = app
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let text =
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(
        text.contains("carina_jobs{kind=\"risk\",state=\"queued\"} 1"),
        "{text}"
    );
    assert!(
        text.contains(
            "carina_http_requests_total{method=\"GET\",route=\"/v1/jobs/{id}\",status=\"200\"}"
        ),
        "{text}"
    );
    for family in [
        "carina_inference_duration_seconds_count{model=",
        "carina_inference_batch_size_count{model=",
        "carina_gradcam_duration_seconds_count{model=",
        "carina_http_request_duration_seconds_bucket{method=\"POST\",route=\"/v1/analyze\",le=\"+Inf\"} 1",
    ] {
        assert!(text.contains(family), "{family} in\n{text}");
    }
}

#[tokio::test]
async fn an_attempt_past_its_deadline_is_retried_and_pending_keys_allow_one_queued_job() {
    let (store, _d) = fresh().await;
    // one pending job per key: a second enqueue while queued is deduplicated ...
    let first = store
        .enqueue(&job("p1", Some("pending:risk:p1"), 3))
        .await
        .unwrap();
    assert!(first.is_some());
    assert!(store
        .enqueue(&job("p1", Some("pending:risk:p1"), 3))
        .await
        .unwrap()
        .is_none());
    // ... and once the worker has claimed it, a new write queues the next run. The handler
    // hangs: the attempt ends at the deadline and goes back to the queue with the reason.
    let hang: carina::jobs::Handler = std::sync::Arc::new(|_job| {
        Box::pin(async {
            std::future::pending::<()>().await;
            Ok(serde_json::json!({}))
        })
    });
    let settings = carina::jobs::JobSettings {
        deadline: Duration::from_secs(1),
        backoff: Duration::from_secs(3600),
        concurrency: 1,
        ..carina::jobs::JobSettings::default()
    };
    let wake = std::sync::Arc::new(tokio::sync::Notify::new());
    let worker = carina::jobs::Worker::new(store.clone(), settings, hang, wake);
    // one attempt, ended by its deadline; its retry waits out the backoff
    assert_eq!(worker.run_until_idle().await, 1);
    let id = first.unwrap();
    let j = store.job(&id).await.unwrap().unwrap();
    assert_eq!((j.state, j.attempts), (JobState::Queued, 1));
    assert!(j.last_error.unwrap().contains("deadline"));
    assert!(
        store
            .enqueue(&job("p1", Some("pending:risk:p1"), 3))
            .await
            .unwrap()
            .is_some(),
        "the claimed job no longer holds the pending key"
    );
}

/// The SQLite and PostgreSQL migrations define the same tables with the same columns (a column
/// added to one dialect only would break the other store at run time).
#[tokio::test]
async fn sqlite_and_postgres_migrations_define_the_same_tables_and_columns() {
    use sqlx::{Connection, Row};
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Store::open(dir.path()).await.unwrap();
    let admin =
        common::pg_url().unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let pg_url = common::fresh_pg_database(&admin).await;
    let pg = Store::connect(Some(&pg_url), dir.path()).await.unwrap();
    drop((sqlite, pg));
    let db = dir.path().join("carina.db");
    let mut lite = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    let mut lite_cols = std::collections::BTreeSet::new();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM sqlite_master WHERE type = 'table' \
         AND name NOT LIKE 'sqlite_%' AND name <> '_sqlx_migrations'",
    )
    .fetch_all(&mut lite)
    .await
    .unwrap();
    for t in &tables {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!("PRAGMA table_info({t})")))
            .fetch_all(&mut lite)
            .await
            .unwrap();
        for r in rows {
            lite_cols.insert((t.clone(), r.get::<String, _>("name")));
        }
    }
    let mut pgc = sqlx::PgConnection::connect(&pg_url).await.unwrap();
    let pg_cols: std::collections::BTreeSet<(String, String)> = sqlx::query(
        "SELECT table_name::text AS t, column_name::text AS c FROM information_schema.columns \
         WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations'",
    )
    .fetch_all(&mut pgc)
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get("t"), r.get("c")))
    .collect();
    assert!(tables.len() >= 5, "the migrations made tables: {tables:?}");
    let only_lite: Vec<_> = lite_cols.difference(&pg_cols).collect();
    let only_pg: Vec<_> = pg_cols.difference(&lite_cols).collect();
    assert!(
        only_lite.is_empty() && only_pg.is_empty(),
        "SQLite only: {only_lite:?}\nPostgreSQL only: {only_pg:?}"
    );
}
