//! When a long-running command stops: at SIGTERM (what Kubernetes sends a
//! pod) or Ctrl-C. `licensor serve` and the operator both wait here, then
//! finish what is in flight.

/// Returns once SIGTERM or Ctrl-C arrives.
pub async fn requested() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
