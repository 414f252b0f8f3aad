//! One backend client per `LicenseAccount` (DESIGN §9): the operator's own
//! `--backend` for `default` and for every account that names no backend of
//! its own, and a client of its own for each account that does, with the
//! credentials of the Secret it names in the operator's namespace.
//!
//! Contract:
//! - [`Backends::of`] answers the backend an object's account is served on,
//!   or why not (the account is not there, its Secret is missing, its client
//!   could not be made); never another account's backend.
//! - [`Backends::keep`] reads each account's Secrets every [`EVERY`] and
//!   makes its client again only when its backend or its credentials
//!   changed, so a token rotated in its Secret is used within [`EVERY`],
//!   without a restart. Accounts that fail never hold up the others.
//! - Each account's status says whether its backend answers with these
//!   credentials (Ready), or why not (Stalled, with the reason: Forbidden
//!   for refused credentials, UnknownAccount, BackendUnavailable, Invalid
//!   for malformed tenants), and the products its account holds. It is
//!   written only when it changes.
//! - Every change of a client is told on [`Backends::changed`], so the
//!   objects of that account are passed again.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, ResourceExt};
use tokio::sync::watch;

use super::accounts::Accounts;
use super::metrics::Metrics;
use super::snapshot;
use crate::backend::http::{Ca, HttpBackend, Retry};
use crate::backend::local::StoreBackend;
use crate::backend::{Backend, BackendError};
use crate::domain::{Reason, Refusal};
use crate::licenseaccount::{
    AccountBackend, DEFAULT_ACCOUNT, Directory, LicenseAccount, LicenseAccountStatus, SecretKeyRef,
};

/// How often each account's Secrets are read again (and its status
/// checked): the longest a rotated token waits to be used.
pub const EVERY: Duration = Duration::from_secs(5);
/// Longest wait for one answer of an account's platform API.
const TIMEOUT: Duration = Duration::from_secs(10);
/// The field manager of the accounts' status.
const MANAGER: &str = "licensor-operator";

/// An account's backend, and the read of it that its objects share.
pub struct Served {
    pub backend: Arc<dyn Backend>,
    pub snapshot: Arc<snapshot::Shared>,
    /// Drawn once per client, never again in this process.
    id: usize,
}

impl Served {
    pub fn new(backend: Arc<dyn Backend>, snapshot: Arc<snapshot::Shared>) -> Served {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        Served {
            backend,
            snapshot,
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Which client this is: accounts served on one backend share its
    /// pools, and a client made anew is never taken for the one before.
    pub fn id(&self) -> usize {
        self.id
    }
}

/// The client of one account that names a backend of its own.
struct Connected {
    /// Of the backend spec and the credentials it was made with.
    fingerprint: u64,
    served: Result<Arc<Served>, Refusal>,
}

/// Every account's client.
pub struct Backends {
    own: Arc<Served>,
    others: RwLock<BTreeMap<String, Connected>>,
    changed: watch::Sender<u64>,
    metrics: Arc<Metrics>,
    /// How long a shared read of an account is used.
    ttl: Duration,
}

impl Backends {
    /// The operator's own backend serves `default` and every account that
    /// names no backend of its own.
    pub fn new(own: Arc<Served>, metrics: Arc<Metrics>, ttl: Duration) -> Backends {
        Backends {
            own,
            others: RwLock::default(),
            changed: watch::Sender::new(0),
            metrics,
            ttl,
        }
    }

    /// The operator's own backend.
    pub fn own(&self) -> &Arc<Served> {
        &self.own
    }

    /// Told after every change of a client.
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Every account with a backend of its own that is connected, and
    /// `default` on the operator's own: what the LicensePools show.
    pub fn served(&self) -> Vec<(String, Arc<Served>)> {
        let others = self.others.read().unwrap_or_else(|p| p.into_inner());
        let mut served = vec![(DEFAULT_ACCOUNT.to_string(), self.own.clone())];
        served.extend(others.iter().filter_map(|(name, c)| {
            let s = c.served.as_ref().ok()?;
            (name != DEFAULT_ACCOUNT).then(|| (name.clone(), s.clone()))
        }));
        served
    }

    /// The backend `account` is served on, by the accounts of `directory`.
    pub fn of(&self, account: &str, directory: &Directory) -> Result<Arc<Served>, Refusal> {
        let Some(found) = directory.accounts.get(account) else {
            return match account {
                DEFAULT_ACCOUNT => Ok(self.own.clone()),
                _ => Err(directory.unknown(account)),
            };
        };
        if found.spec.backend.is_none() {
            return Ok(self.own.clone());
        }
        let others = self.others.read().unwrap_or_else(|p| p.into_inner());
        match others.get(account) {
            Some(c) => c.served.clone(),
            None => Err(Refusal::new(
                Reason::BackendUnavailable,
                format!("LicenseAccount {account}: its backend is not connected yet"),
            )),
        }
    }

    /// Keeps every account's client and status, until dropped.
    pub async fn keep(self: Arc<Self>, client: Client, namespace: String, accounts: Arc<Accounts>) {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
        let statuses: Api<LicenseAccount> = Api::all(client);
        let mut changes = accounts.changed();
        let mut every = tokio::time::interval(EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                changed = changes.changed() => if changed.is_err() { return },
            }
            let directory = accounts.directory();
            // Each account on its own: a slow backend holds up no other.
            let checks = directory.accounts.values().map(|account| async {
                let name = account.name_any();
                let health = self.connect(&name, account, &secrets, &namespace).await;
                write_status(&statuses, account, health).await;
            });
            futures::future::join_all(checks).await;
            self.forget_all_but(&directory);
        }
    }

    /// Makes `name`'s client again if its backend or its credentials
    /// changed, and says whether its backend answers.
    async fn connect(
        &self,
        name: &str,
        account: &LicenseAccount,
        secrets: &Api<Secret>,
        namespace: &str,
    ) -> Health {
        if let Err(fault) = account.tenants().check() {
            return Err((
                Reason::Invalid,
                format!("malformed tenants, so nothing is allowed: {fault}"),
            ));
        }
        let Some(spec) = &account.spec.backend else {
            return probe(&self.own.backend).await;
        };
        let credentials = read_credentials(spec, secrets, namespace).await;
        let fingerprint = fingerprint(spec, &credentials);
        let current = {
            let others = self.others.read().unwrap_or_else(|p| p.into_inner());
            others
                .get(name)
                .filter(|c| c.fingerprint == fingerprint)
                .map(|c| c.served.clone())
        };
        let served = match current {
            Some(served) => served,
            None => {
                let served = match credentials {
                    Ok((token, ca)) => self.client(name, spec, token, ca).await,
                    Err(why) => Err(why),
                };
                tracing::info!(
                    account = name,
                    connected = served.is_ok(),
                    "the account's backend client was made anew"
                );
                self.others
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(
                        name.to_string(),
                        Connected {
                            fingerprint,
                            served: served.clone(),
                        },
                    );
                self.changed.send_modify(|n| *n += 1);
                served
            }
        };
        match served {
            Ok(served) => probe(&served.backend).await,
            Err(refusal) => Err((refusal.reason, refusal.message)),
        }
    }

    /// A client for `spec` with these credentials.
    async fn client(
        &self,
        name: &str,
        spec: &AccountBackend,
        token: Option<String>,
        ca: Option<Ca>,
    ) -> Result<Arc<Served>, Refusal> {
        let unavailable = |m: String| {
            Refusal::new(
                Reason::BackendUnavailable,
                format!("LicenseAccount {name}: {m}"),
            )
        };
        let backend: Arc<dyn Backend> = if spec.url.starts_with("http") {
            let account = spec.account.as_deref().ok_or_else(|| {
                Refusal::new(
                    Reason::Invalid,
                    format!(
                        "LicenseAccount {name}: a platform API backend needs spec.backend.account"
                    ),
                )
            })?;
            let http = HttpBackend::new(
                &spec.url,
                account,
                token.as_deref(),
                TIMEOUT,
                Retry::default(),
                ca,
            )
            .map_err(|e| unavailable(e.to_string()))?;
            Arc::new(http)
        } else {
            let url = postgres_url(name, &spec.url, token.as_deref(), ca)?;
            let store = tokio::task::spawn_blocking(move || {
                crate::backend::store::Store::connect_when_up(&url, false)
            })
            .await
            .map_err(|e| unavailable(e.to_string()))?
            .map_err(|e| unavailable(e.to_string()))?;
            Arc::new(StoreBackend::new(store, spec.account.as_deref(), None))
        };
        let snapshot = Arc::new(snapshot::Shared::new(
            backend.clone(),
            self.metrics.clone(),
            self.ttl,
        ));
        Ok(Arc::new(Served::new(backend, snapshot)))
    }

    /// Drops the clients of accounts that are gone (their objects stall
    /// with UnknownAccount; nothing is revoked).
    fn forget_all_but(&self, directory: &Directory) {
        let mut others = self.others.write().unwrap_or_else(|p| p.into_inner());
        let before = others.len();
        others.retain(|name, _| {
            directory
                .accounts
                .get(name)
                .is_some_and(|a| a.spec.backend.is_some())
        });
        if others.len() != before {
            drop(others);
            self.changed.send_modify(|n| *n += 1);
        }
    }
}

/// An account's token (or password) and CA (named for messages, PEM).
type Credentials = (Option<String>, Option<Ca>);

/// Whether an account's backend answers, and with which products; or the
/// reason and message why not.
type Health = Result<Vec<String>, (Reason, String)>;

/// One read of the account, as its objects' passes would make it.
async fn probe(backend: &Arc<dyn Backend>) -> Health {
    match backend.snapshot().await {
        Ok(s) => Ok(s.pools.into_iter().map(|p| p.product).collect()),
        Err(BackendError::Unauthorized(m)) => Err((
            Reason::Forbidden,
            format!("the backend refused the credentials: {m}; check the Secret"),
        )),
        Err(e) => Err((
            e.reason().unwrap_or(Reason::BackendUnavailable),
            format!("backend {}: {e}", backend.location()),
        )),
    }
}

/// The token and the CA an account's Secrets hold; an error that names
/// what is missing.
async fn read_credentials(
    spec: &AccountBackend,
    secrets: &Api<Secret>,
    namespace: &str,
) -> Result<Credentials, Refusal> {
    let token = match &spec.credentials_secret_ref {
        Some(r) => {
            let bytes = read_key(secrets, r, namespace).await?;
            let token = String::from_utf8(bytes).map_err(|_| {
                Refusal::new(
                    Reason::Invalid,
                    format!("Secret {namespace}/{} key {} is not text", r.name, r.key),
                )
            })?;
            Some(token.trim().to_string())
        }
        None => None,
    };
    let ca = match &spec.ca_secret_ref {
        Some(r) => Some(Ca {
            name: format!("Secret {namespace}/{} key {}", r.name, r.key),
            pem: read_key(secrets, r, namespace).await?,
        }),
        None => None,
    };
    Ok((token, ca))
}

async fn read_key(
    secrets: &Api<Secret>,
    r: &SecretKeyRef,
    namespace: &str,
) -> Result<Vec<u8>, Refusal> {
    let missing = |what: String| Refusal::new(Reason::BackendUnavailable, what);
    let secret = secrets
        .get_opt(&r.name)
        .await
        .map_err(|e| missing(format!("reading Secret {namespace}/{}: {e}", r.name)))?
        .ok_or_else(|| missing(format!("Secret {namespace}/{} is not there", r.name)))?;
    secret
        .data
        .and_then(|mut d| d.remove(&r.key))
        .map(|b| b.0)
        .ok_or_else(|| {
            missing(format!(
                "Secret {namespace}/{} has no key {}",
                r.name, r.key
            ))
        })
}

/// Of what a client is made from; never shown.
fn fingerprint(spec: &AccountBackend, credentials: &Result<Credentials, Refusal>) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    serde_json::to_string(spec).unwrap_or_default().hash(&mut h);
    match credentials {
        Ok((token, ca)) => (token, ca).hash(&mut h),
        Err(r) => r.message.hash(&mut h),
    }
    h.finish()
}

/// A PostgreSQL URL with the Secret's password in it, and the CA in a file
/// of its own (`sslrootcert`) when one is given.
fn postgres_url(
    name: &str,
    url: &str,
    password: Option<&str>,
    ca: Option<Ca>,
) -> Result<String, Refusal> {
    let invalid = |m: &str| Refusal::new(Reason::Invalid, format!("LicenseAccount {name}: {m}"));
    let mut parsed = reqwest::Url::parse(url).map_err(|e| invalid(&format!("backend URL: {e}")))?;
    if parsed.password().is_some() {
        return Err(invalid(
            "the backend URL carries a password; put it in the credentials Secret",
        ));
    }
    if let Some(password) = password {
        parsed
            .set_password(Some(password))
            .map_err(|()| invalid("the backend URL cannot carry a password"))?;
    }
    if let Some(Ca { pem, .. }) = ca {
        // A new file of the operator's own, never one someone else placed.
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let unique = crate::backend::store::random_hex().map_err(|e| invalid(&e.to_string()))?;
        let path = std::env::temp_dir().join(format!("licensor-ca-{name}-{unique}.pem"));
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| f.write_all(&pem))
            .map_err(|e| invalid(&format!("writing the CA: {e}")))?;
        parsed
            .query_pairs_mut()
            .append_pair("sslrootcert", &path.display().to_string());
    }
    Ok(parsed.to_string())
}

/// Writes an account's status when it changed.
async fn write_status(api: &Api<LicenseAccount>, account: &LicenseAccount, health: Health) {
    let previous = account.status.clone().unwrap_or_default();
    let next = status(
        &previous,
        account.metadata.generation,
        health,
        Timestamp::now(),
    );
    if same(&previous, &next) {
        return;
    }
    let body = serde_json::json!({
        "apiVersion": crate::resource::API_VERSION, "kind": "LicenseAccount", "status": next,
    });
    if let Err(e) = api
        .patch_status(
            &account.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
    {
        tracing::warn!(account = %account.name_any(), "writing the LicenseAccount's status: {e}");
    }
}

/// The same status, whenever each condition last moved.
fn same(a: &LicenseAccountStatus, b: &LicenseAccountStatus) -> bool {
    let conditions = |s: &LicenseAccountStatus| -> Vec<[String; 4]> {
        s.conditions
            .iter()
            .map(|c| {
                [
                    c.type_.clone(),
                    c.status.clone(),
                    c.reason.clone(),
                    c.message.clone(),
                ]
            })
            .collect()
    };
    (a.observed_generation, &a.products) == (b.observed_generation, &b.products)
        && conditions(a) == conditions(b)
}

/// An account's status after a check: Ready True and Stalled False with
/// its products, or Ready False and Stalled True with the reason. A
/// condition that keeps its status keeps the time it last moved.
pub fn status(
    previous: &LicenseAccountStatus,
    generation: Option<i64>,
    health: Health,
    now: Timestamp,
) -> LicenseAccountStatus {
    let (ready, stalled, reason, message, products) = match health {
        Ok(products) => (
            "True",
            "False",
            "Connected".to_string(),
            format!(
                "the backend answers with these credentials; {} products",
                products.len()
            ),
            products,
        ),
        Err((reason, message)) => (
            "False",
            "True",
            reason.as_str().to_string(),
            message,
            previous.products.clone(),
        ),
    };
    let condition = |type_: &str, status: &str| {
        let since = previous
            .conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map_or(Time(now), |c| c.last_transition_time.clone());
        Condition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: reason.clone(),
            message: message.clone(),
            last_transition_time: since,
            observed_generation: generation,
        }
    };
    LicenseAccountStatus {
        observed_generation: generation,
        conditions: vec![condition("Ready", ready), condition("Stalled", stalled)],
        products,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_says_ready_with_the_products_or_stalled_with_the_reason() {
        let t0 = Timestamp::from_second(1_000).unwrap();
        let t1 = Timestamp::from_second(2_000).unwrap();
        let ready = status(&Default::default(), Some(3), Ok(vec!["TestOps".into()]), t0);
        assert_eq!(ready.products, ["TestOps"]);
        assert_eq!(
            ready
                .conditions
                .iter()
                .map(|c| (c.type_.as_str(), c.status.as_str()))
                .collect::<Vec<_>>(),
            [("Ready", "True"), ("Stalled", "False")]
        );
        let again = status(&ready, Some(3), Ok(vec!["TestOps".into()]), t1);
        assert!(same(&ready, &again), "nothing moved: nothing to write");
        assert_eq!(again.conditions[0].last_transition_time, Time(t0));
        let refused = status(
            &again,
            Some(3),
            Err((Reason::Forbidden, "check the Secret".into())),
            t1,
        );
        assert_eq!(refused.conditions[0].reason, "Forbidden");
        assert_eq!(refused.conditions[1].status, "True");
        assert_eq!(refused.conditions[1].last_transition_time, Time(t1));
        assert_eq!(refused.products, ["TestOps"], "what it last held");
    }

    #[test]
    fn a_postgres_password_comes_from_the_secret_never_the_url() {
        assert_eq!(
            postgres_url(
                "a",
                "postgres://licensor@db:5432/licenses",
                Some("s3cr/t"),
                None
            )
            .unwrap(),
            "postgres://licensor:s3cr%2Ft@db:5432/licenses"
        );
        let err = postgres_url(
            "a",
            "postgres://licensor:inline@db/licenses",
            Some("x"),
            None,
        )
        .unwrap_err();
        assert!(
            err.message.contains("put it in the credentials Secret"),
            "{err:?}"
        );
    }
}
