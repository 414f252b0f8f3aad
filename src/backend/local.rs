//! A store this process opens itself (the embedded SQLite file, or a
//! PostgreSQL database) as a [`Backend`]: [`Store`] for one account, with
//! the caller's role (a token's, or local access as the Account Admin), its
//! calls run off the async threads.

use std::sync::Arc;

use async_trait::async_trait;

use super::store::off_thread;
pub use super::store::{Principal, Store};
use super::{AuditEntry, Backend, BackendError, Fixture, Written};
use crate::domain::{AllocationWrite, PoolView, Reason, Refusal, SeatChange, Snapshot};

/// A store as a [`Backend`] for one account.
#[derive(Clone)]
pub struct StoreBackend {
    store: Arc<Store>,
    account: Option<String>,
    principal: Principal,
    token: Option<String>,
}

impl StoreBackend {
    /// A store opened by the caller ([`Store::open`], [`Store::connect`]).
    pub fn new(store: Store, account: Option<&str>, token: Option<&str>) -> StoreBackend {
        StoreBackend {
            store: Arc::new(store),
            account: account.map(str::to_string),
            principal: Principal::local(),
            token: token.map(str::to_string),
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The account and the principal acting on it.
    fn session(&self) -> Result<(String, Principal), BackendError> {
        let account = self.store.resolve_account(self.account.as_deref())?;
        let principal = match &self.token {
            Some(t) => self.store.authenticate(&account, t)?,
            None => self.principal.clone(),
        };
        Ok((account, principal))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store, String, Principal) -> Result<T, BackendError> + Send + 'static,
    ) -> Result<T, BackendError> {
        let this = self.clone();
        off_thread(move || {
            let (account, principal) = this.session()?;
            f(&this.store, account, principal)
        })
        .await
    }
}

#[async_trait]
impl Backend for StoreBackend {
    fn location(&self) -> String {
        self.store.describe()
    }

    async fn snapshot(&self) -> Result<Snapshot, BackendError> {
        self.blocking(|s, account, _| s.snapshot(&account)).await
    }

    async fn observe(&self, organization: &str, product: &str) -> Result<Snapshot, BackendError> {
        let (o, p) = (organization.to_string(), product.to_string());
        self.blocking(move |s, account, _| s.observe(&account, &o, &p))
            .await
    }

    async fn write(&self, write: &AllocationWrite) -> Result<Written, BackendError> {
        let write = write.clone();
        self.blocking(move |s, account, who| s.write(&account, &who, &write, false))
            .await
    }

    async fn release(
        &self,
        organization: &str,
        product: &str,
        manager: &str,
    ) -> Result<(), BackendError> {
        let (o, p, m) = (
            organization.to_string(),
            product.to_string(),
            manager.to_string(),
        );
        self.blocking(move |s, account, who| s.release(&account, &who, &o, &p, &m))
            .await
    }

    async fn set_total(&self, product: &str, total: i64) -> Result<PoolView, BackendError> {
        let product = product.to_string();
        self.blocking(move |s, account, who| s.set_total(&account, &who, &product, total))
            .await
            .map(|pool| PoolView::from(&pool))
    }

    async fn seats(
        &self,
        organization: &str,
        product: &str,
        change: SeatChange,
    ) -> Result<(), BackendError> {
        let (o, p) = (organization.to_string(), product.to_string());
        self.blocking(move |s, account, who| s.seats(&account, &who, &o, &p, change))
            .await
    }

    async fn seed(&self, fixture: &Fixture) -> Result<(), BackendError> {
        if let Some(a) = &self.account
            && *a != fixture.account
        {
            return Err(Refusal::new(
                Reason::Invalid,
                format!(
                    "the fixture is for account {:?}, not {a:?}",
                    fixture.account
                ),
            )
            .into());
        }
        let fixture = fixture.clone();
        let this = self.clone();
        off_thread(move || {
            let who = match &this.token {
                Some(t) => this.store.authenticate(&fixture.account, t)?,
                None => this.principal.clone(),
            };
            this.store.seed(&who, &fixture)
        })
        .await
    }

    async fn audit_page(&self, after: i64, limit: i64) -> Result<Vec<AuditEntry>, BackendError> {
        self.blocking(move |s, account, _| s.audit_page(&account, after, limit))
            .await
    }
}
