//! Connecting as libpq would: the connection string, the password from
//! the URL, `PGPASSWORD` or a password file, and TLS with rustls as
//! `sslmode` asks.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::NoTls;

use super::conn::Conn;
use crate::backend::{BackendError, redact};

/// How `sslmode` asks the server to be checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// A connection string split into what tokio-postgres reads and what it
/// does not (`sslmode=verify-*`, `sslrootcert`, `passfile`, and the pool's
/// size, `pool_max_conns`, as pgx's pool reads it).
struct Parsed {
    config: tokio_postgres::Config,
    mode: SslMode,
    root_cert: Option<String>,
    pool: usize,
}

/// Connections one process keeps open to PostgreSQL at most, unless the
/// connection string says `pool_max_conns`. Writers of one product wait for
/// each other on its pool row in any case; this is enough to keep that row
/// busy while other requests read.
pub const POOL: usize = 8;

/// The most connections a process may be told to keep.
const MOST_POOL: usize = 256;

/// A PostgreSQL error in words: the server's message when it sent one
/// (`password authentication failed for user ...`), else the client's.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

pub(super) fn invalid(location: &str, why: impl std::fmt::Display) -> BackendError {
    BackendError::Unavailable(format!("{}: {why}", redact(location)))
}

fn parse(location: &str) -> std::result::Result<Parsed, BackendError> {
    let mut mode = SslMode::Prefer;
    let mut root_cert = None;
    let mut passfile = None;
    let mut pool = POOL;
    let mut take = |key: &str, value: &str| -> std::result::Result<bool, BackendError> {
        match key {
            "passfile" => {
                passfile = Some(value.to_string());
                Ok(true)
            }
            "sslmode" => {
                mode = match value {
                    "disable" => SslMode::Disable,
                    "allow" | "prefer" => SslMode::Prefer,
                    "require" => SslMode::Require,
                    "verify-ca" => SslMode::VerifyCa,
                    "verify-full" => SslMode::VerifyFull,
                    other => {
                        return Err(invalid(
                            location,
                            format!(
                                "sslmode {other:?} is not one of disable, prefer, require, verify-ca, verify-full"
                            ),
                        ));
                    }
                };
                Ok(true)
            }
            "sslrootcert" => {
                root_cert = Some(value.to_string());
                Ok(true)
            }
            "pool_max_conns" => {
                pool = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MOST_POOL).contains(n))
                    .ok_or_else(|| {
                        invalid(
                            location,
                            format!(
                                "pool_max_conns {value:?} is not a number from 1 to {MOST_POOL}"
                            ),
                        )
                    })?;
                Ok(true)
            }
            _ => Ok(false),
        }
    };
    let rest = if location.starts_with("postgres://") || location.starts_with("postgresql://") {
        let mut url = reqwest::Url::parse(location).map_err(|e| invalid(location, e))?;
        let mut kept = Vec::new();
        for (k, v) in url.query_pairs() {
            if !take(&k, &v)? {
                kept.push((k.into_owned(), v.into_owned()));
            }
        }
        url.set_query(None);
        if !kept.is_empty() {
            url.query_pairs_mut().extend_pairs(kept);
        }
        url.to_string()
    } else {
        let mut kept = Vec::new();
        for pair in location.split_whitespace() {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            if !take(k, v)? {
                kept.push(pair.to_string());
            }
        }
        kept.join(" ")
    };
    let mut config: tokio_postgres::Config = rest.parse().map_err(|e| invalid(location, e))?;
    if config.get_password().is_none() {
        let file = passfile
            .or_else(|| std::env::var("PGPASSFILE").ok())
            .map(std::path::PathBuf::from)
            .or_else(|| {
                let home = std::path::PathBuf::from(std::env::var_os("HOME")?);
                Some(home.join(".pgpass")).filter(|p| p.exists())
            });
        let password = std::env::var("PGPASSWORD").ok().or(match file {
            Some(path) => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| invalid(location, format!("passfile {}: {e}", path.display())))?;
                password_in(&text, &config)
            }
            None => None,
        });
        if let Some(password) = password {
            config.password(password);
        }
    }
    Ok(Parsed {
        config,
        mode,
        root_cert,
        pool,
    })
}

/// The password a libpq password file (`.pgpass`: lines of
/// `host:port:database:user:password`, `*` matching anything, `\:` and
/// `\\` escaped) gives for this connection: the first line that matches.
fn password_in(file: &str, config: &tokio_postgres::Config) -> Option<String> {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "localhost".to_string(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let user = config.get_user().unwrap_or_default().to_string();
    let database = config
        .get_dbname()
        .map_or_else(|| user.clone(), str::to_string);
    let wanted = [host, port, database, user];
    file.lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.trim().is_empty())
        .find_map(|line| {
            let mut fields = Vec::new();
            let mut field = String::new();
            let mut chars = line.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => field.extend(chars.next()),
                    ':' if fields.len() < 4 => fields.push(std::mem::take(&mut field)),
                    c => field.push(c),
                }
            }
            fields.push(field);
            let [h, p, d, u, password] = <[String; 5]>::try_from(fields).ok()?;
            [h, p, d, u]
                .iter()
                .zip(&wanted)
                .all(|(have, want)| have == "*" || have == want)
                .then_some(password)
        })
}

/// How many connections the pool for `location` keeps at most.
pub fn pool_size(location: &str) -> std::result::Result<usize, BackendError> {
    Ok(parse(location)?.pool)
}

/// What a pool of connections to `location` opens each with.
pub fn opener(location: &str) -> super::conn::Opener {
    let location = location.to_string();
    Box::new(move || connect(&location))
}

/// Connects as `location` says, TLS included.
pub fn connect(location: &str) -> std::result::Result<Conn, BackendError> {
    let Parsed {
        mut config,
        mode,
        root_cert,
        ..
    } = parse(location)?;
    let failed = |e: tokio_postgres::Error| invalid(location, describe(&e));
    // The connection's own runtime: it runs while a call waits on it.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| invalid(location, e))?;
    if mode == SslMode::Disable {
        config.ssl_mode(tokio_postgres::config::SslMode::Disable);
        let (client, connection) = runtime.block_on(config.connect(NoTls)).map_err(failed)?;
        runtime.spawn(connection);
        return Ok(Conn::new(client, runtime));
    }
    let roots = match &root_cert {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path)
                .map_err(|e| invalid(location, format!("sslrootcert {path}: {e}")))?
            {
                let cert =
                    cert.map_err(|e| invalid(location, format!("sslrootcert {path}: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| invalid(location, format!("sslrootcert {path}: {e}")))?;
            }
            Some(Arc::new(roots))
        }
        None => None,
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, roots) {
        (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
            return Err(invalid(
                location,
                "sslmode verify-ca and verify-full need sslrootcert=<CA file>",
            ));
        }
        (SslMode::VerifyFull, Some(roots)) => {
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| invalid(location, e))?
        }
        // libpq: with a root certificate, require checks the chain as verify-ca does.
        (SslMode::VerifyCa | SslMode::Require, Some(roots)) => Arc::new(Lenient {
            chain: Some(
                rustls::client::WebPkiServerVerifier::builder_with_provider(
                    roots,
                    provider.clone(),
                )
                .build()
                .map_err(|e| invalid(location, e))?,
            ),
            algorithms: provider.signature_verification_algorithms,
        }),
        _ => Arc::new(Lenient {
            chain: None,
            algorithms: provider.signature_verification_algorithms,
        }),
    };
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(location, e))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.ssl_mode(if mode == SslMode::Prefer {
        tokio_postgres::config::SslMode::Prefer
    } else {
        tokio_postgres::config::SslMode::Require
    });
    let (client, connection) = runtime
        .block_on(config.connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls)))
        .map_err(failed)?;
    runtime.spawn(connection);
    Ok(Conn::new(client, runtime))
}

/// What `sslmode` prefer, require and verify-ca check of the server's
/// certificate, as libpq does: the handshake's signature always; the chain
/// to the root certificate when there is one (verify-ca, and require with
/// a root certificate); never the host name (verify-full is rustls's own
/// verifier). Without a root certificate the connection is encrypted and
/// the handshake signed, but whom it reaches is not checked.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_strings_are_read_like_libpq() {
        let p = parse("postgres://u:pw@db.example:5433/licenses?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x").unwrap();
        assert_eq!(
            (p.mode, p.root_cert.as_deref()),
            (SslMode::VerifyFull, Some("/ca.pem"))
        );
        assert_eq!(p.config.get_dbname(), Some("licenses"));
        assert_eq!(p.config.get_password(), Some(&b"pw"[..]));
        let p = parse("host=127.0.0.1 port=5432 user=u dbname=d sslmode=require").unwrap();
        assert_eq!(p.mode, SslMode::Require);
        assert_eq!(parse("postgresql://u@h/d").unwrap().mode, SslMode::Prefer);
        assert_eq!(p.pool, POOL);
        let p = parse("postgres://u@h/d?pool_max_conns=2&sslmode=require").unwrap();
        assert_eq!((p.pool, p.mode), (2, SslMode::Require));
        let e = parse("postgres://u:hunter2@h/d?pool_max_conns=0")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("pool_max_conns \"0\" is not a number from 1 to 256")
                && !e.contains("hunter2"),
            "{e}"
        );
        let e = parse("postgres://u:hunter2@h/d?sslmode=sometimes")
            .err()
            .unwrap();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn a_password_file_is_read_like_libpq() {
        let file = "# comment\nother:5432:*:u:wrong\ndb.example:*:licenses:u:p\\:w\nx:1:2:3\n";
        let config: tokio_postgres::Config =
            "postgres://u@db.example:5433/licenses".parse().unwrap();
        assert_eq!(password_in(file, &config).as_deref(), Some("p:w"));
        let other: tokio_postgres::Config = "postgres://u@db.example/elsewhere".parse().unwrap();
        assert_eq!(password_in(file, &other), None);
    }
}
