//! The cluster's `LicenseAccount`s and the labels of its Namespaces, kept
//! from watches: what the tenant rule reads ([`Directory`]) for the
//! reconcile pass and the admission webhook alike.
//!
//! Contract: [`Accounts::directory`] answers the latest whole picture at
//! once, never a half-applied one (each change builds a new one and swaps
//! it in). Before the first lists arrive, and in a cluster without the
//! `LicenseAccount` CRD, it is empty: every object is on `default` with no
//! tenants, as before accounts existed. Every change is told on
//! [`Accounts::changed`], so objects are passed again (a tenant change
//! never writes by itself: a pass does, or refuses).

use std::sync::{Arc, RwLock};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::watch;

use crate::licenseaccount::{Directory, LicenseAccount};

/// The accounts and Namespaces as last seen.
pub struct Accounts {
    current: RwLock<Arc<Directory>>,
    changed: watch::Sender<u64>,
}

impl Default for Accounts {
    fn default() -> Self {
        Accounts {
            current: RwLock::default(),
            changed: watch::Sender::new(0),
        }
    }
}

impl Accounts {
    /// The accounts and Namespaces now.
    pub fn directory(&self) -> Arc<Directory> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Told (with a count) after every change.
    pub fn changed(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Swaps in a new picture and tells whoever listens.
    pub fn set(&self, directory: Directory) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(directory);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Watches `LicenseAccount`s and Namespaces (their metadata only) and
    /// keeps the picture, until dropped.
    pub async fn keep(self: Arc<Self>, client: Client) {
        let (accounts, accounts_writer) = reflector::store::<LicenseAccount>();
        let (namespaces, namespaces_writer) = reflector::store::<PartialObjectMeta<Namespace>>();
        let account_events = reflector::reflector(
            accounts_writer,
            watcher(
                Api::<LicenseAccount>::all(client.clone()),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .map(|_| ());
        let namespace_events = reflector::reflector(
            namespaces_writer,
            // Metadata only: the labels are all the rule reads.
            watcher(
                Api::<PartialObjectMeta<Namespace>>::all(client),
                watcher::Config::default(),
            ),
        )
        .default_backoff()
        .map(|event| logged(event, "Namespaces"));
        let mut events = std::pin::pin!(futures::stream::select(account_events, namespace_events));
        while events.next().await.is_some() {
            self.set(picture(&accounts, &namespaces));
        }
    }
}

/// A watch that fails (no LicenseAccount CRD installed, no permission) is
/// retried with backoff; what it last listed stays, and it says why.
fn logged<T>(event: Result<T, watcher::Error>, what: &str) {
    if let Err(e) = event {
        tracing::warn!("watching {what} for the tenant rule: {e}; retrying");
    }
}

/// The directory of what the stores hold now.
fn picture(
    accounts: &Store<LicenseAccount>,
    namespaces: &Store<PartialObjectMeta<Namespace>>,
) -> Directory {
    Directory {
        accounts: accounts
            .state()
            .iter()
            .map(|a| (a.name_any(), (**a).clone()))
            .collect(),
        namespaces: namespaces
            .state()
            .iter()
            .map(|n| (n.name_any(), n.labels().clone()))
            .collect(),
    }
}
