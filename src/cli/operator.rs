//! `licensor operator`: flags -> [`crate::operator::Config`], logging, run.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};

use super::{FAILED, Global, OK, Open, open_backend};
use crate::operator::reconcile::Settings;
use crate::operator::webhook::Webhook;
use crate::operator::{self, Config, Election};

#[derive(Args, Debug)]
pub struct OperatorArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "LICENSOR_WATCH_NAMESPACE")]
    pub namespace: Option<String>,
    /// How often every object is compared with the backend again, which
    /// corrects (or, with Observe, reports) out-of-band changes.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub resync: Duration,
    /// How often the account is read while objects wait for free seats
    /// (Stalled on InsufficientPool), so that seats freed outside the
    /// cluster (a raised total, released seats, a lowered allocation) wake
    /// them: one read for all of them, none while nothing waits.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub pool_poll: Duration,
    /// First retry delay after the backend failed; doubles up to --max-backoff.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub backoff: Duration,
    /// Longest retry delay after repeated backend failures.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub max_backoff: Duration,
    /// Objects reconciled at once.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,
    /// Address of /metrics, /healthz and /readyz (beside `licensor serve`'s
    /// 127.0.0.1:8080 on one host).
    #[arg(long, default_value = "0.0.0.0:8081", env = "LICENSOR_LISTEN")]
    pub listen: SocketAddr,
    /// Elect a leader on a Lease so that several replicas are safe.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,
    /// Name of the Lease.
    #[arg(long, default_value = "licensor-operator")]
    pub lease_name: String,
    /// The operator's own namespace: its Lease, and the Secrets that
    /// LicenseAccounts name.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    /// How long a lease holds without renewal; a standby takes over after it.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// Identity in the Lease (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Serve the admission webhook (HTTPS) here; it adds the cleanup
    /// finalizer to new objects as they are created, which saves the
    /// operator a write per object. Needs --webhook-cert-dir.
    #[arg(long, env = "LICENSOR_WEBHOOK_LISTEN", requires = "webhook_cert_dir")]
    pub webhook_listen: Option<SocketAddr>,
    /// Directory holding the webhook's tls.crt and tls.key (PEM), such as a
    /// mounted kubernetes.io/tls Secret; a renewed pair is picked up.
    #[arg(long, env = "LICENSOR_WEBHOOK_CERT_DIR", requires = "webhook_listen")]
    pub webhook_cert_dir: Option<std::path::PathBuf>,
    /// Serve both admission webhooks here for a cluster whose API server
    /// can reach this machine (a local control plane, kind or k3d on this
    /// host): makes a throwaway certificate, registers webhook
    /// configurations named licensor-local with `url: https://ADDR/...`,
    /// and removes them at exit. In a cluster, the chart's webhooks
    /// (--webhook-listen) instead.
    #[arg(long, value_name = "ADDR", conflicts_with_all = ["webhook_listen", "webhook_cert_dir"])]
    pub local_webhooks: Option<SocketAddr>,
    /// What the validating webhook does with a DedicatedLicense that can
    /// never succeed as written (unknown organization or product, another
    /// manager's allocation): deny it, or admit it with a warning.
    #[arg(long, value_enum, default_value = "deny", env = "LICENSOR_ADMISSION")]
    pub admission: crate::operator::admission::Mode,
    /// The admission webhook warns when a DedicatedLicense's until has
    /// passed, or comes sooner than this.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration, env = "LICENSOR_EXPIRY_WARNING")]
    pub expiry_warning: Duration,
    /// Log format.
    #[arg(long, value_enum, default_value = "text", env = "LICENSOR_LOG_FORMAT")]
    pub log_format: LogFormat,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

pub async fn run(g: &Global, args: &OperatorArgs) -> u8 {
    init_logging(args.log_format);
    if args.lease_duration < Duration::from_secs(2) {
        eprintln!("error: --lease-duration must be at least 2s");
        return FAILED;
    }
    let backend = match open_backend(g, Open::Serve) {
        Ok(b) => Arc::from(b),
        Err(e) => {
            tracing::error!("{e}");
            return FAILED;
        }
    };
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let lease_secs = args.lease_duration.as_secs();
    let config = Config {
        namespace: args.namespace.clone(),
        own_namespace: args.lease_namespace.clone(),
        settings: Settings {
            instance: g.instance.clone(),
            resync: args.resync,
            pool_poll: args.pool_poll.max(Duration::from_millis(100)),
            backoff_base: args.backoff,
            backoff_cap: args.max_backoff.max(args.backoff),
        },
        concurrency: args.concurrency,
        listen: args.listen,
        election: args.leader_elect.then(|| Election {
            lease_name: args.lease_name.clone(),
            namespace: args.lease_namespace.clone(),
            identity,
            duration: args.lease_duration,
            // Renew when a third of the lease is left.
            renew_before: Duration::from_secs((lease_secs / 3).max(1)),
        }),
        webhook: args
            .webhook_listen
            .zip(args.webhook_cert_dir.clone())
            .map(|(listen, cert_dir)| Webhook { listen, cert_dir }),
        local_webhooks: args.local_webhooks,
        admission: args.admission,
        expiry_warning: args.expiry_warning,
    };
    tracing::info!(
        backend = %crate::backend::redact(&g.backend),
        instance = %g.instance,
        namespace = config.namespace.as_deref().unwrap_or("(all)"),
        resync = ?args.resync,
        "starting the operator"
    );
    match operator::run(config, backend).await {
        Ok(()) => {
            tracing::info!("stopped");
            OK
        }
        Err(e) => {
            tracing::error!("{e}");
            FAILED
        }
    }
}

fn default_identity() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "licensor".into());
    format!("{host}-{}", std::process::id())
}

pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    use std::io::IsTerminal;
    // Colours only for a person at a terminal, never in a redirected log.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // A second initialisation (tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
