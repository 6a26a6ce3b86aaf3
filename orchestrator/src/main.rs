//! The `orchestrator` binary: parse flags, set up logging, serve until SIGTERM or Ctrl-C.
//! `orchestrator healthcheck` instead checks a running one's `/health` (for a container
//! HEALTHCHECK, so the image needs no curl).

use std::process::ExitCode;

use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use servicekit_orchestrator::config::{Cli, Command, Config, HealthcheckArgs, LogFormat};
use servicekit_orchestrator::server;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // Container runtimes reserve exit status 2 of a health check (clap's usage error).
            if e.use_stderr() && std::env::args_os().skip(1).any(|a| a == "healthcheck") {
                return ExitCode::FAILURE;
            }
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    match cli.command {
        None => serve(cli.config),
        Some(Command::Healthcheck(args)) => healthcheck(&cli.config, &args),
    }
}

fn serve(config: Config) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("orchestrator: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        init_logging(config.log_format);
        let signal = match servicekit::signal::shutdown_signal() {
            Ok(signal) => signal,
            Err(e) => {
                tracing::error!(error = %e, "orchestrator.failed");
                return ExitCode::FAILURE;
            }
        };
        // A client library's error may quote the Valkey URL, password and all.
        let secrets = config.clone();
        let running = match server::start_with_signal(config, signal).await {
            Ok(running) => running,
            Err(e) => {
                let error = secrets.redact_secrets(&e.to_string());
                tracing::error!(%error, "orchestrator.failed");
                return ExitCode::FAILURE;
            }
        };
        running.wait().await;
        ExitCode::SUCCESS
    })
}

/// Largest /health answer read; the real one is a few hundred bytes.
const HEALTH_BODY_LIMIT: usize = 64 * 1024;

/// `orchestrator healthcheck`: one GET, one line of output, exit 0 (healthy) or 1.
fn healthcheck(config: &Config, args: &HealthcheckArgs) -> ExitCode {
    let url = match args.target(config.bind) {
        Ok(url) => url,
        Err(e) => {
            eprintln!("unhealthy: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("unhealthy: cannot start the tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let timeout = args.timeout();
    let outcome = runtime.block_on(async {
        tokio::time::timeout(timeout, check_health(&url))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
    });
    match outcome {
        Ok(()) => {
            println!("healthy: {url}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("unhealthy: {url}: {why}");
            ExitCode::FAILURE
        }
    }
}

/// GETs `url` and wants 200 with a JSON body whose `status` is `healthy`.
async fn check_health(url: &str) -> Result<(), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("bad URL: {e}"))?;
    let client = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http::<Empty<Bytes>>();
    let request = http::Request::get(uri)
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::USER_AGENT, "orchestrator-healthcheck")
        .body(Empty::new())
        .map_err(|e| format!("bad request: {e}"))?;
    let response = client
        .request(request)
        .await
        .map_err(|e| format!("request failed: {}", error_chain(&e)))?;
    let status = response.status();
    let body = Limited::new(response.into_body(), HEALTH_BODY_LIMIT)
        .collect()
        .await
        .map_err(|e| format!("HTTP {status}, body unreadable: {e}"))?
        .to_bytes();
    let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    let reported = json
        .as_ref()
        .and_then(|v| v.get("status"))
        .and_then(|s| s.as_str());
    if status == http::StatusCode::OK && reported == Some("healthy") {
        return Ok(());
    }
    let mut text = match &json {
        Some(v) => v.to_string(),
        None => String::from_utf8_lossy(&body).into_owned(),
    };
    text = text.replace(['\n', '\r'], " ");
    if text.len() > 300 {
        let mut end = 300;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push('…');
    }
    match reported {
        Some(reported) => Err(format!("HTTP {status}, status \"{reported}\": {text}")),
        None => Err(format!(
            "HTTP {status}, no JSON \"status\" in the answer: {text}"
        )),
    }
}

/// An error and its sources on one line ("connection refused" sits a few levels down).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let line = cause.to_string();
        if !text.contains(&line) {
            text.push_str(": ");
            text.push_str(&line);
        }
        source = cause.source();
    }
    text
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: a redirected log stays greppable.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(|| LossyStdout);
    match format {
        LogFormat::Pretty => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// Standard output that drops what it cannot write. A registry must keep serving (and obey
/// SIGTERM) when whoever reads its logs goes away; tracing-subscriber would otherwise report
/// the failed write on stderr, and panic if that is closed too.
struct LossyStdout;

impl std::io::Write for LossyStdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stdout().write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stdout().flush();
        Ok(())
    }
}
