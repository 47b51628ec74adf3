//! `carina`: settings → telemetry → models → [`App::build`] → run: the HTTP server, the DIMSE
//! listener, the job workers and the export queue, stopped by one shutdown signal (or an
//! offline command).

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use carina::api;
use carina::app::App;
use carina::cli::{self, Cli, Command, Common};
use carina::inference::Registry;
use carina::ingest::dimse;

fn main() -> ExitCode {
    // JSON lines by default (CARINA_LOG_FORMAT=text for people); spans carry request and job
    // ids; nothing logged names a patient.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,ort=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var("CARINA_LOG_FORMAT").is_ok_and(|v| v.eq_ignore_ascii_case("text")) {
        builder.init();
    } else {
        builder
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .init();
    }
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Serve(common) => serve(common),
        Command::Models(common) => cli::models(common),
        Command::ExportServing(args) => cli::export_serving(args),
        Command::Predict(args) => cli::predict(args).and_then(|failed| match failed {
            0 => Ok(()),
            n => Err(anyhow::anyhow!("{n} file(s) failed")),
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("carina: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(common: &Common) -> anyhow::Result<()> {
    let settings = common.settings()?;
    settings.check_security().map_err(anyhow::Error::msg)?;
    carina::analysis::cpu::limit_cpu_work(settings.cpu_workers);
    // Models load (and warm up) before the async runtime exists: loading blocks.
    let models = Arc::new(Registry::load(
        &settings.models,
        &cli::load_options(&settings),
    )?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        if let Some(addr) = &settings.audit.syslog {
            carina::audit::set_feed(carina::audit::Syslog::start(addr.clone()));
            tracing::info!("audit events are also sent to the syslog collector");
        }
        let App { state, exporter } = App::build(&settings, models).await?;
        tracing::info!(database = ?state.store.dialect(), "store open");
        let ingest = state.ingest.clone();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |rx: tokio::sync::watch::Receiver<bool>| async move {
            let mut rx = rx;
            let _ = rx.wait_for(|v| *v).await;
        };
        let jobs = state.jobs.settings();
        let grace = jobs.grace + std::time::Duration::from_secs(5);
        let worker = {
            let w = state.jobs.worker();
            tracing::info!(owner = %jobs.owner, workers = jobs.concurrency, "job workers started");
            tokio::spawn(w.run(stop_rx.clone()))
        };
        tokio::spawn(exporter.run(stopped(stop_rx.clone())));
        if let Some(addr) = settings.dicom.dimse {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            tracing::info!(addr = %listener.local_addr()?, ae_title = %settings.dicom.ae_title, "DIMSE SCP listening");
            tokio::spawn(dimse::serve(
                listener,
                settings.scp_options(),
                ingest,
                stopped(stop_rx.clone()),
            ));
        }
        let listener = tokio::net::TcpListener::bind(settings.http).await?;
        tracing::info!(addr = %listener.local_addr()?, "carina listening");
        api::serve::serve(listener, api::router(state.clone()), &settings.http_limits, async move {
            shutdown().await;
            let _ = stop_tx.send(true);
        })
        .await?;
        // no new requests now; workers finish their jobs or release the leases
        let _ = tokio::time::timeout(grace, worker).await;
        state.store.close().await;
        tracing::info!("carina stopped");
        Ok(())
    })
}

async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { () = ctrl_c => {}, () = term => {} }
    tracing::info!("shutdown signal received");
}
