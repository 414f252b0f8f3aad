//! `licensor serve`: the license platform HTTP API over a store (the
//! embedded file or PostgreSQL).

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use super::operator::{LogFormat, init_logging};
use super::{FAILED, Global, OK, Open, open_store};
use crate::server::{self, Config};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080", env = "LICENSOR_LISTEN")]
    pub listen: SocketAddr,
    /// Requests per second over all clients before 429 (0: no limit).
    #[arg(long, default_value_t = 0)]
    pub rate_limit: u32,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    pub max_body: usize,
    /// Longest a request may take before 503.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Serve over TLS with this certificate chain (PEM; read again when it
    /// changes), with --tls-key.
    #[arg(long, requires = "tls_key", env = "LICENSOR_TLS_CERT")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, requires = "tls_cert", env = "LICENSOR_TLS_KEY")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value = "text", env = "LICENSOR_LOG_FORMAT")]
    pub log_format: LogFormat,
}

pub async fn run(g: &Global, args: &ServeArgs) -> u8 {
    init_logging(args.log_format);
    let store = match open_store(g, Open::Serve) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::error!("{e}");
            return FAILED;
        }
    };
    let config = Config {
        listen: args.listen,
        rate_limit: NonZeroU32::new(args.rate_limit),
        max_body: args.max_body,
        timeout: args.timeout,
        tls: args.tls_cert.clone().zip(args.tls_key.clone()),
        account: g.account.clone(),
    };
    match server::run(store, config).await {
        Ok(()) => OK,
        Err(e) => {
            tracing::error!("cannot serve on {} (--listen): {e}", args.listen);
            FAILED
        }
    }
}
