//! The store on PostgreSQL: the same pipeline and the same rules as the
//! embedded file, over a server that several processes and machines share.
//!
//! Contract:
//! - **Connection.** A `postgres://` or `postgresql://` URL, or libpq-style
//!   `key=value` parameters. The password comes from the URL, or else from
//!   `PGPASSWORD`, or else from a libpq password file (`passfile=`,
//!   `PGPASSFILE`, `~/.pgpass`). `sslmode` follows libpq: `disable`, `prefer` (the
//!   default), `require` (encrypted, not verified), `verify-ca` (the chain
//!   must lead to `sslrootcert`), and `verify-full` (that, and the host name
//!   too). TLS is rustls. A location is never shown with its password.
//! - **Concurrency (R10).** Every write is one READ COMMITTED transaction
//!   that locks its product's pool row (`SELECT ... FOR UPDATE`) before it
//!   reads anything else, and then takes the next value of the account's
//!   sequence, which locks the account row. Two writers of one pool
//!   therefore run one after the other, each deciding on rows committed
//!   before it, so their own increases can never over-commit the pool. A
//!   row lock was chosen over SERIALIZABLE because a refusal must report
//!   the real state of the pool; SERIALIZABLE would answer a conflict that
//!   the client then has to retry.
//! - **Migrations.** Versioned in `licensor_schema` and applied under a
//!   transaction-scoped advisory lock, so processes starting together apply
//!   each migration exactly once. A database whose schema is newer than this
//!   licensor is refused before anything is written.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use postgres::{Client, GenericClient, NoTls, Row, Statement};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::audit::{AuditAction, AuditRecord};
use super::rows::{AccountRows, Result, Storage, now};
use crate::backend::{AuditEntry, BackendError, redact};
use crate::domain::{Allocation, Pool, Snapshot};

/// Schema migrations, applied in order; `licensor_schema.version` counts
/// those applied.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE accounts (
    id TEXT PRIMARY KEY,
    -- The sequence every version and pool revision is drawn from.
    revision BIGINT NOT NULL DEFAULT 0
);
CREATE TABLE products (
    account TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    name TEXT NOT NULL,
    total BIGINT NOT NULL CHECK (total >= 0),
    shared_in_use BIGINT NOT NULL DEFAULT 0 CHECK (shared_in_use >= 0),
    dedicated BIGINT NOT NULL DEFAULT 0 CHECK (dedicated >= 0),
    revision BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (account, name)
);
CREATE TABLE organizations (
    account TEXT NOT NULL REFERENCES accounts(id) ON DELETE CASCADE,
    id TEXT NOT NULL,
    name TEXT,
    PRIMARY KEY (account, id)
);
CREATE TABLE allocations (
    account TEXT NOT NULL,
    organization TEXT NOT NULL,
    product TEXT NOT NULL,
    dedicated BIGINT NOT NULL CHECK (dedicated >= 0),
    in_use BIGINT NOT NULL CHECK (in_use >= 0),
    managed_by TEXT,
    version BIGINT NOT NULL,
    PRIMARY KEY (account, organization, product),
    FOREIGN KEY (account, organization) REFERENCES organizations(account, id) ON DELETE CASCADE,
    FOREIGN KEY (account, product) REFERENCES products(account, name) ON DELETE CASCADE
);
CREATE TABLE audit (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account TEXT NOT NULL,
    time TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    organization TEXT,
    product TEXT,
    from_count BIGINT NOT NULL,
    to_count BIGINT NOT NULL,
    rehomed BIGINT NOT NULL DEFAULT 0,
    displaced BIGINT NOT NULL DEFAULT 0,
    manager TEXT,
    idempotency_key TEXT
);
CREATE INDEX audit_account ON audit(account, id);
CREATE TABLE idempotency (
    account TEXT NOT NULL,
    key TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    response TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (account, key)
);
CREATE TABLE tokens (
    hash TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    role TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at TEXT NOT NULL
);
"#];

/// The advisory lock migrations run under (an arbitrary constant of ours).
const MIGRATION_LOCK: i64 = 0x6c69_6365_6e73_6f72;

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
/// does not (`sslmode=verify-*`, `sslrootcert`, `passfile`).
struct Parsed {
    config: postgres::Config,
    mode: SslMode,
    root_cert: Option<String>,
}

/// A PostgreSQL error in words: the server's message when it sent one
/// (`password authentication failed for user ...`), else the client's.
pub fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => match std::error::Error::source(e) {
            Some(source) => format!("{e}: {source}"),
            None => e.to_string(),
        },
    }
}

fn invalid(location: &str, why: impl std::fmt::Display) -> BackendError {
    BackendError::Unavailable(format!("{}: {why}", redact(location)))
}

fn parse(location: &str) -> std::result::Result<Parsed, BackendError> {
    let mut mode = SslMode::Prefer;
    let mut root_cert = None;
    let mut passfile = None;
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
    let mut config: postgres::Config = rest.parse().map_err(|e| invalid(location, e))?;
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
    })
}

/// The password a libpq password file (`.pgpass`: lines of
/// `host:port:database:user:password`, `*` matching anything, `\:` and
/// `\\` escaped) gives for this connection: the first line that matches.
fn password_in(file: &str, config: &postgres::Config) -> Option<String> {
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
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

/// Connects as `location` says, TLS included.
pub fn connect(location: &str) -> std::result::Result<Client, BackendError> {
    let Parsed {
        mut config,
        mode,
        root_cert,
    } = parse(location)?;
    let failed = |e: postgres::Error| invalid(location, describe(&e));
    if mode == SslMode::Disable {
        config.ssl_mode(postgres::config::SslMode::Disable);
        return config.connect(NoTls).map_err(failed);
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
        (SslMode::VerifyCa | SslMode::Require, Some(roots)) => Arc::new(ChainOnly(
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| invalid(location, e))?,
        )),
        _ => Arc::new(EncryptOnly(provider.clone())),
    };
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid(location, e))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.ssl_mode(if mode == SslMode::Prefer {
        postgres::config::SslMode::Prefer
    } else {
        postgres::config::SslMode::Require
    });
    config
        .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
        .map_err(failed)
}

/// `sslmode=require` (and `prefer`) without a root certificate: the
/// connection is encrypted and the handshake signed, but whom it reaches is
/// not checked, as in libpq.
#[derive(Debug)]
struct EncryptOnly(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for EncryptOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to the root certificate; the
/// host name is not compared.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
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
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// Whether the database holds a licensor store (its schema table).
pub fn holds_a_store(
    client: &mut Client,
    location: &str,
) -> std::result::Result<bool, BackendError> {
    client
        .query_one("SELECT to_regclass('licensor_schema') IS NOT NULL", &[])
        .map(|r| r.get(0))
        .map_err(|e| invalid(location, describe(&e)))
}

/// Applies the migrations the database lacks, under the advisory lock;
/// refuses one whose schema is newer than this licensor.
pub fn migrate(client: &mut Client, location: &str) -> std::result::Result<(), BackendError> {
    let failed = |e: postgres::Error| invalid(location, describe(&e));
    let mut tx = client.transaction().map_err(failed)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .map_err(failed)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS licensor_schema (version INTEGER NOT NULL)")
        .map_err(failed)?;
    let version: i32 = tx
        .query_opt("SELECT version FROM licensor_schema", &[])
        .map_err(failed)?
        .map_or(0, |r| r.get(0));
    if version as usize > MIGRATIONS.len() {
        return Err(invalid(
            location,
            format!(
                "schema version {version} is newer than this licensor ({}); upgrade licensor",
                MIGRATIONS.len()
            ),
        ));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.batch_execute(sql).map_err(failed)?;
        let applied = (i + 1) as i32;
        tx.execute("DELETE FROM licensor_schema", &[])
            .map_err(failed)?;
        tx.execute(
            "INSERT INTO licensor_schema (version) VALUES ($1)",
            &[&applied],
        )
        .map_err(failed)?;
    }
    tx.commit().map_err(failed)
}

/// One connection and the statements prepared on it: a statement is
/// parsed once per connection, not at every call (that would be a second
/// round trip for each).
pub struct Conn {
    pub client: Client,
    statements: HashMap<String, Statement>,
}

impl Conn {
    pub fn new(client: Client) -> Conn {
        Conn {
            client,
            statements: HashMap::new(),
        }
    }

    /// A transaction, and the statement cache beside it.
    pub fn begin(
        &mut self,
    ) -> std::result::Result<
        (postgres::Transaction<'_>, &mut HashMap<String, Statement>),
        postgres::Error,
    > {
        Ok((self.client.transaction()?, &mut self.statements))
    }
}

/// The storage interface over a transaction. `locking` (write
/// transactions) locks the pool row a request is decided on.
pub struct Pg<'s, C> {
    client: RefCell<C>,
    statements: RefCell<&'s mut HashMap<String, Statement>>,
    locking: bool,
}

impl<'s, C: GenericClient> Pg<'s, C> {
    pub fn reads(client: C, statements: &'s mut HashMap<String, Statement>) -> Self {
        Pg {
            client: RefCell::new(client),
            statements: RefCell::new(statements),
            locking: false,
        }
    }

    pub fn writes(client: C, statements: &'s mut HashMap<String, Statement>) -> Self {
        Pg {
            client: RefCell::new(client),
            statements: RefCell::new(statements),
            locking: true,
        }
    }

    pub fn into_inner(self) -> C {
        self.client.into_inner()
    }

    /// The prepared statement for `sql`, prepared now if it is new.
    fn statement(&self, sql: &str) -> Result<Statement> {
        let mut cache = self.statements.borrow_mut();
        if let Some(s) = cache.get(sql) {
            return Ok(s.clone());
        }
        let prepared = self
            .client
            .borrow_mut()
            .prepare(sql)
            .map_err(|e| BackendError::Unavailable(format!("the store: {}", describe(&e))))?;
        cache.insert(sql.to_string(), prepared.clone());
        Ok(prepared)
    }

    fn query(
        &self,
        sql: &str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Vec<Row>> {
        let statement = self.statement(sql)?;
        self.client
            .borrow_mut()
            .query(&statement, params)
            .map_err(|e| BackendError::Unavailable(format!("the store: {}", describe(&e))))
    }

    fn execute(&self, sql: &str, params: &[&(dyn postgres::types::ToSql + Sync)]) -> Result<u64> {
        let statement = self.statement(sql)?;
        self.client
            .borrow_mut()
            .execute(&statement, params)
            .map_err(|e| BackendError::Unavailable(format!("the store: {}", describe(&e))))
    }
}

fn pool_row(r: &Row) -> Pool {
    Pool {
        product: r.get(0),
        total: r.get(1),
        dedicated: r.get(2),
        shared_in_use: r.get(3),
        revision: r.get(4),
    }
}

fn allocation_row(r: &Row) -> Allocation {
    Allocation {
        organization: r.get(0),
        product: r.get(1),
        dedicated: r.get(2),
        in_use: r.get(3),
        managed_by: r.get(4),
        version: r.get(5),
    }
}

impl<C: GenericClient> Storage for Pg<'_, C> {
    fn pool(&self, account: &str, product: &str) -> Result<Option<Pool>> {
        let sql = if self.locking {
            "SELECT name, total, dedicated, shared_in_use, revision FROM products WHERE account = $1 AND name = $2 FOR UPDATE"
        } else {
            "SELECT name, total, dedicated, shared_in_use, revision FROM products WHERE account = $1 AND name = $2"
        };
        Ok(self
            .query(sql, &[&account, &product])?
            .first()
            .map(pool_row))
    }

    fn organization_exists(&self, account: &str, organization: &str) -> Result<bool> {
        Ok(!self
            .query(
                "SELECT 1 FROM organizations WHERE account = $1 AND id = $2",
                &[&account, &organization],
            )?
            .is_empty())
    }

    fn allocation(
        &self,
        account: &str,
        organization: &str,
        product: &str,
    ) -> Result<Option<Allocation>> {
        Ok(self
            .query(
                "SELECT organization, product, dedicated, in_use, managed_by, version FROM allocations
                 WHERE account = $1 AND organization = $2 AND product = $3",
                &[&account, &organization, &product],
            )?
            .first()
            .map(allocation_row))
    }

    fn next_revision(&self, account: &str) -> Result<i64> {
        self.query(
            "UPDATE accounts SET revision = revision + 1 WHERE id = $1 RETURNING revision",
            &[&account],
        )?
        .first()
        .map(|r| r.get(0))
        .ok_or_else(|| BackendError::Unavailable(format!("the store has no account {account:?}")))
    }

    fn save_pool(&self, account: &str, p: &Pool) -> Result<()> {
        self.execute(
            "UPDATE products SET total = $3, dedicated = $4, shared_in_use = $5, revision = $6
             WHERE account = $1 AND name = $2",
            &[
                &account,
                &p.product,
                &p.total,
                &p.dedicated,
                &p.shared_in_use,
                &p.revision,
            ],
        )
        .map(drop)
    }

    fn save_allocation(&self, account: &str, a: &Allocation) -> Result<()> {
        self.execute(
            "INSERT INTO allocations (account, organization, product, dedicated, in_use, managed_by, version)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (account, organization, product) DO UPDATE SET
               dedicated = excluded.dedicated, in_use = excluded.in_use,
               managed_by = excluded.managed_by, version = excluded.version",
            &[
                &account,
                &a.organization,
                &a.product,
                &a.dedicated,
                &a.in_use,
                &a.managed_by,
                &a.version,
            ],
        )
        .map(drop)
    }

    fn remove_allocation(&self, account: &str, organization: &str, product: &str) -> Result<()> {
        self.execute(
            "DELETE FROM allocations WHERE account = $1 AND organization = $2 AND product = $3",
            &[&account, &organization, &product],
        )
        .map(drop)
    }

    fn insert_organization(&self, account: &str, id: &str, name: Option<&str>) -> Result<()> {
        self.execute(
            "INSERT INTO organizations (account, id, name) VALUES ($1, $2, $3)",
            &[&account, &id, &name],
        )
        .map(drop)
    }

    fn insert_pool(&self, account: &str, p: &Pool) -> Result<()> {
        self.execute(
            "INSERT INTO products (account, name, total, shared_in_use, dedicated, revision)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &account,
                &p.product,
                &p.total,
                &p.shared_in_use,
                &p.dedicated,
                &p.revision,
            ],
        )
        .map(drop)
    }

    fn clear_account(&self, account: &str) -> Result<()> {
        // The account row, locked first, serializes seeds of one account.
        self.execute(
            "INSERT INTO accounts (id) VALUES ($1) ON CONFLICT DO NOTHING",
            &[&account],
        )?;
        self.query(
            "SELECT 1 FROM accounts WHERE id = $1 FOR UPDATE",
            &[&account],
        )?;
        for table in ["allocations", "organizations", "products"] {
            self.execute(
                &format!("DELETE FROM {table} WHERE account = $1"),
                &[&account],
            )?;
        }
        Ok(())
    }

    fn insert_audit(&self, account: &str, actor: &str, r: &AuditRecord<'_>) -> Result<()> {
        self.execute(
            "INSERT INTO audit (account, time, actor, action, organization, product, from_count, to_count, rehomed, displaced, manager, idempotency_key)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            &[
                &account,
                &now(),
                &actor,
                &r.action.as_str(),
                &r.organization,
                &r.product,
                &r.from,
                &r.to,
                &r.rehomed,
                &r.displaced,
                &r.manager,
                &r.idempotency_key,
            ],
        )
        .map(drop)
    }

    fn remembered(&self, account: &str, key: &str) -> Result<Option<(String, String)>> {
        Ok(self
            .query(
                "SELECT request_hash, response FROM idempotency WHERE account = $1 AND key = $2",
                &[&account, &key],
            )?
            .first()
            .map(|r| (r.get(0), r.get(1))))
    }

    fn remember(&self, account: &str, key: &str, request_hash: &str, answer: &str) -> Result<()> {
        self.execute(
            "INSERT INTO idempotency (account, key, request_hash, response, created_at) VALUES ($1, $2, $3, $4, $5)",
            &[&account, &key, &request_hash, &answer, &now()],
        )
        .map(drop)
    }

    fn accounts(&self) -> Result<Vec<String>> {
        Ok(self
            .query("SELECT id FROM accounts ORDER BY id", &[])?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    fn token(&self, hash: &str) -> Result<Option<(String, String, String)>> {
        Ok(self
            .query(
                "SELECT account, role, name FROM tokens WHERE hash = $1",
                &[&hash],
            )?
            .first()
            .map(|r| (r.get(0), r.get(1), r.get(2))))
    }

    fn insert_token(&self, hash: &str, account: &str, role: &str, name: &str) -> Result<()> {
        self.execute(
            "INSERT INTO tokens (hash, account, role, name, created_at) VALUES ($1, $2, $3, $4, $5)",
            &[&hash, &account, &role, &name, &now()],
        )
        .map(drop)
    }

    fn expire_keys(&self, cutoff: &str) -> Result<usize> {
        self.execute("DELETE FROM idempotency WHERE created_at < $1", &[&cutoff])
            .map(|n| n as usize)
    }

    fn snapshot(&self, account: &str) -> Result<Snapshot> {
        let pools = self
            .query(
                "SELECT name, total, dedicated, shared_in_use, revision FROM products WHERE account = $1 ORDER BY name",
                &[&account],
            )?
            .iter()
            .map(pool_row)
            .collect();
        let organizations = self
            .query(
                "SELECT id FROM organizations WHERE account = $1 ORDER BY id",
                &[&account],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let allocations = self
            .query(
                "SELECT organization, product, dedicated, in_use, managed_by, version FROM allocations WHERE account = $1 ORDER BY organization, product",
                &[&account],
            )?
            .iter()
            .map(allocation_row)
            .collect();
        Ok(Snapshot {
            pools,
            organizations,
            allocations,
        })
    }

    fn audit_entries(&self, account: &str) -> Result<Vec<AuditEntry>> {
        self.query(
            "SELECT id, time, actor, action, organization, product, from_count, to_count,
                    rehomed, displaced, manager, idempotency_key
             FROM audit WHERE account = $1 ORDER BY id",
            &[&account],
        )?
        .iter()
        .map(|r| {
            let action: String = r.get(3);
            Ok(AuditEntry {
                id: r.get(0),
                time: r.get(1),
                actor: r.get(2),
                action: AuditAction::parse(&action).ok_or_else(|| {
                    BackendError::Unavailable(format!("unknown audit action {action:?}"))
                })?,
                organization: r.get(4),
                product: r.get(5),
                from: r.get(6),
                to: r.get(7),
                rehomed: r.get(8),
                displaced: r.get(9),
                manager: r.get(10),
                idempotency_key: r.get(11),
            })
        })
        .collect()
    }

    fn export(&self, account: &str) -> Result<AccountRows> {
        let revision = self
            .query("SELECT revision FROM accounts WHERE id = $1", &[&account])?
            .first()
            .map(|r| r.get(0))
            .unwrap_or(0);
        let snapshot = self.snapshot(account)?;
        let organizations = self
            .query(
                "SELECT id, name FROM organizations WHERE account = $1 ORDER BY id",
                &[&account],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let tokens = self
            .query(
                "SELECT hash, role, name, created_at FROM tokens WHERE account = $1 ORDER BY hash",
                &[&account],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        let keys = self
            .query(
                "SELECT key, request_hash, response, created_at FROM idempotency WHERE account = $1 ORDER BY key",
                &[&account],
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        Ok(AccountRows {
            id: account.to_string(),
            revision,
            pools: snapshot.pools,
            organizations,
            allocations: snapshot.allocations,
            audit: self.audit_entries(account)?,
            tokens,
            keys,
        })
    }

    fn drop_account(&self, account: &str) -> Result<()> {
        self.clear_account(account)?;
        for table in ["idempotency", "tokens", "audit"] {
            self.execute(
                &format!("DELETE FROM {table} WHERE account = $1"),
                &[&account],
            )?;
        }
        self.execute("DELETE FROM accounts WHERE id = $1", &[&account])
            .map(drop)
    }

    fn import(&self, a: &AccountRows) -> Result<()> {
        let id = a.id.as_str();
        self.execute(
            "INSERT INTO accounts (id, revision) VALUES ($1, $2)",
            &[&id, &a.revision],
        )?;
        for p in &a.pools {
            self.insert_pool(id, p)?;
        }
        for (org, name) in &a.organizations {
            self.insert_organization(id, org, name.as_deref())?;
        }
        for al in &a.allocations {
            self.save_allocation(id, al)?;
        }
        for e in &a.audit {
            self.execute(
                "INSERT INTO audit (id, account, time, actor, action, organization, product, from_count, to_count, rehomed, displaced, manager, idempotency_key)
                 OVERRIDING SYSTEM VALUE
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
                &[
                    &e.id,
                    &id,
                    &e.time,
                    &e.actor,
                    &e.action.as_str(),
                    &e.organization,
                    &e.product,
                    &e.from,
                    &e.to,
                    &e.rehomed,
                    &e.displaced,
                    &e.manager,
                    &e.idempotency_key,
                ],
            )?;
        }
        // Later audit rows are numbered after the copied ones.
        self.query(
            "SELECT setval(pg_get_serial_sequence('audit', 'id'), GREATEST((SELECT max(id) FROM audit), 1))",
            &[],
        )?;
        for (hash, role, name, created) in &a.tokens {
            self.execute(
                "INSERT INTO tokens (hash, account, role, name, created_at) VALUES ($1, $2, $3, $4, $5)",
                &[hash, &id, role, name, created],
            )?;
        }
        for (key, request_hash, answer, created) in &a.keys {
            self.execute(
                "INSERT INTO idempotency (account, key, request_hash, response, created_at) VALUES ($1, $2, $3, $4, $5)",
                &[&id, key, request_hash, answer, created],
            )?;
        }
        Ok(())
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
        let e = parse("postgres://u:hunter2@h/d?sslmode=sometimes")
            .err()
            .unwrap();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }

    #[test]
    fn a_password_file_is_read_like_libpq() {
        let file = "# comment\nother:5432:*:u:wrong\ndb.example:*:licenses:u:p\\:w\nx:1:2:3\n";
        let config: postgres::Config = "postgres://u@db.example:5433/licenses".parse().unwrap();
        assert_eq!(password_in(file, &config).as_deref(), Some("p:w"));
        let other: postgres::Config = "postgres://u@db.example/elsewhere".parse().unwrap();
        assert_eq!(password_in(file, &other), None);
    }
}
