//! The signals a server is asked to stop with: SIGTERM (what Docker and Kubernetes send) and
//! Ctrl-C. Pass the future to [`RegistrationLayer::shutdown_on`](crate::RegistrationLayer::shutdown_on).

use std::future::Future;

/// A future that completes on SIGTERM or Ctrl-C.
///
/// The handlers are installed when this function is called, not when the future is first
/// polled, so a SIGTERM that arrives while the server is still starting is not lost. Fails
/// only when the process cannot install a signal handler.
///
/// ```no_run
/// # async fn run() -> std::io::Result<()> {
/// let stop = servicekit::signal::shutdown_signal()?;
/// stop.await; // SIGTERM or Ctrl-C
/// # Ok(()) }
/// ```
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    #[cfg(unix)]
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    Ok(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = term.recv() => tracing::info!(signal = "SIGTERM", "shutdown.requested"),
            _ = interrupt.recv() => tracing::info!(signal = "SIGINT", "shutdown.requested"),
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!(signal = "Ctrl-C", "shutdown.requested");
        }
    })
}
