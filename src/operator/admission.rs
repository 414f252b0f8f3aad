//! The validating admission webhook (`/validate`): feedback at `kubectl
//! apply` time, decided by the planner on a read of the backend, the same
//! way the operator's pass decides.
//!
//! Contract:
//! - **Deny** what can never succeed as written: an organization or product
//!   the account does not have, an allocation another manager holds
//!   (`Conflict`, naming it). With [`Mode::Warn`] these are warnings too.
//! - **Warn**, with the numbers, on what depends on the moment: a raise
//!   beyond the free seats, a lower count below the seats in use, a revoke
//!   that would displace users, an over-committed pool. The object is
//!   created; the operator reports the outcome in its status.
//! - **Never block the cluster**: a backend that is down or slower than the
//!   timeout allows the request with a warning that the check was skipped;
//!   an update that leaves `spec` as it was (finalizers, labels, status
//!   writers, an object being deleted) and an object that is only observed
//!   are allowed without a look.
//! - Reads only (`sideEffects: None`), so a server-side dry run is answered
//!   the same and leaves nothing behind.

use std::sync::Arc;
use std::time::Duration;

use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, Operation};

use super::metrics::Metrics;
use crate::backend::Backend;
use crate::domain::{Reason, ReasonClass};
use crate::plan::Desired;
use crate::resource::{DedicatedLicenseSpec, ManagementPolicy};

/// The path the validating webhook configuration names.
pub const PATH: &str = "/validate";

/// What becomes of a finding that can never succeed as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Refuse the request (the default).
    Deny,
    /// Admit it with a warning: Git stays the only gate.
    Warn,
}

/// The validating webhook's view of the backend.
#[derive(Clone)]
pub struct Validator {
    pub backend: Arc<dyn Backend>,
    /// The instance part of `managedBy`.
    pub instance: String,
    pub mode: Mode,
    /// Longest wait for the backend before the check is skipped.
    pub timeout: Duration,
    /// Warn of a `spec.until` sooner than this, or past.
    pub expiry_warning: Duration,
    /// Counts the reads of the whole account (for the closest names).
    pub metrics: Arc<Metrics>,
    /// The cluster's accounts and Namespaces, for the tenant rule.
    pub accounts: Arc<super::accounts::Accounts>,
}

/// What admission found: denial (if any) and warnings.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Findings {
    pub deny: Option<String>,
    pub warnings: Vec<String>,
}

/// Reasons that can never succeed as written: the object must change (or
/// its namespace may not ask for it at all).
fn never_succeeds(reason: Reason) -> bool {
    matches!(reason.class(), ReasonClass::AsWritten | ReasonClass::Access)
}

/// Reasons that depend on the moment: seats free up, users leave.
fn depends_on_the_moment(reason: Reason) -> bool {
    reason.class() == ReasonClass::OfTheMoment
}

impl Validator {
    /// Answers one validating AdmissionReview request.
    pub async fn review(&self, request: &AdmissionRequest<DynamicObject>) -> AdmissionResponse {
        let findings = self.findings(request).await;
        let mut response = AdmissionResponse::from(request);
        if !findings.warnings.is_empty() {
            response.warnings = Some(findings.warnings);
        }
        match findings.deny {
            Some(message) => response.deny(message),
            None => response,
        }
    }

    async fn findings(&self, request: &AdmissionRequest<DynamicObject>) -> Findings {
        if !matches!(request.operation, Operation::Create | Operation::Update) {
            return Findings::default();
        }
        let Some(object) = request.object.as_ref() else {
            return Findings::default();
        };
        // An object being deleted, and an update that leaves the spec as it
        // was, are never judged: no answer here can block a deletion or the
        // operator's own writes.
        if object.metadata.deletion_timestamp.is_some() {
            return Findings::default();
        }
        let spec_of = |o: &DynamicObject| o.data.get("spec").cloned();
        if request.operation == Operation::Update
            && request.old_object.as_ref().and_then(spec_of) == spec_of(object)
        {
            return Findings::default();
        }
        // An object the schema refuses is left to the schema's message.
        let Some(spec) =
            spec_of(object).and_then(|s| serde_json::from_value::<DedicatedLicenseSpec>(s).ok())
        else {
            return Findings::default();
        };
        if spec.management_policy != ManagementPolicy::Manage {
            return Findings::default();
        }
        let namespace = request.namespace.clone().unwrap_or_default();
        let name = object
            .metadata
            .name
            .clone()
            .unwrap_or_else(|| request.name.clone());
        // Judged as if it were written, paused or not: it will be once
        // the pause ends.
        let desired = Desired {
            hold: None,
            ..spec.clone().desired(
                &self.instance,
                &namespace,
                &name,
                &Default::default(),
                String::new(),
                &self.accounts.directory(),
            )
        };
        let mut findings = match tokio::time::timeout(self.timeout, self.judge(&desired)).await {
            Ok(Ok(findings)) => findings,
            Ok(Err(e)) => skipped(&e.to_string()),
            Err(_) => skipped(&format!("no answer within {:?}", self.timeout)),
        };
        findings.warnings.extend(expiry_warning(
            &spec,
            self.expiry_warning,
            chrono::Utc::now(),
        ));
        findings
    }

    /// Plans the one object on a read of its pool, organization and
    /// allocation (the whole account when a name is unknown, for the
    /// closest names), as the operator's pass does.
    async fn judge(&self, desired: &Desired) -> Result<Findings, crate::backend::BackendError> {
        // Who may ask is decided here, without the backend.
        if let Some(refusal) = &desired.denied {
            return Ok(self.finding(refusal.reason, &refusal.message));
        }
        let snapshot = self
            .backend
            .observe(&desired.organization, &desired.product)
            .await?;
        let planned = super::plan_one(
            desired,
            &snapshot,
            self.backend.as_ref(),
            &self.instance,
            &self.metrics,
        )
        .await;
        let mut findings = Findings::default();
        for change in &planned.changes {
            if let Some(reason) = change.reason {
                let found = self.finding(reason, &change.message);
                findings.deny = found.deny.or(findings.deny);
                findings.warnings.extend(found.warnings);
            }
        }
        if let Some(pool) = planned
            .pools_before
            .iter()
            .find(|p| p.product == desired.product)
            && pool.is_over_committed()
        {
            findings.warnings.push(format!(
                "licensor: OverCommitted: the {} pool hands out {} seats more than its total of {} ({} dedicated, {} shared in use)",
                pool.product, pool.over_committed(), pool.total, pool.dedicated, pool.shared_in_use
            ));
        }
        Ok(findings)
    }
}

impl Validator {
    /// What a refusal for `reason` is at admission: a denial (a warning in
    /// [`Mode::Warn`]) when it can never succeed as written, a warning when
    /// it depends on the moment.
    fn finding(&self, reason: Reason, message: &str) -> Findings {
        let message = format!("licensor: {reason}: {message}");
        match (never_succeeds(reason), self.mode) {
            (true, Mode::Deny) => Findings {
                deny: Some(message),
                warnings: Vec::new(),
            },
            (true, Mode::Warn) => Findings {
                deny: None,
                warnings: vec![message],
            },
            (false, _) if depends_on_the_moment(reason) => Findings {
                deny: None,
                warnings: vec![message],
            },
            (false, _) => Findings::default(),
        }
    }
}

/// A warning for a `spec.until` that has passed (the count is thenCount
/// from the start) or comes within `margin` of `now`.
fn expiry_warning(
    spec: &DedicatedLicenseSpec,
    margin: Duration,
    now: chrono::DateTime<chrono::Utc>,
) -> Option<String> {
    let e = spec.expiry()?;
    let until = e.until_text();
    let then = e.then_count;
    if e.passed(now) {
        return Some(format!(
            "licensor: until {until} has passed: this object asks for thenCount {then}, not count {}",
            spec.count
        ));
    }
    let left = e.until - now;
    (left.to_std().is_ok_and(|left| left < margin)).then(|| {
        format!(
            "licensor: until {until} is in {}, sooner than {}: count {} becomes {then} then",
            crate::domain::expiry::span(left),
            humantime::format_duration(margin),
            spec.count
        )
    })
}

/// Allowed, with a warning that the backend was not consulted.
fn skipped(why: &str) -> Findings {
    Findings {
        deny: None,
        warnings: vec![format!(
            "licensor: the check against the license backend was skipped ({why}); the object's status will say whether it applies"
        )],
    }
}

/// The uid of the reviews the tests send.
#[cfg(test)]
pub(crate) const REVIEW_UID: &str = "705ab4f5-6393-11e8-b7cc-42010a800002";

/// A review of the DedicatedLicense `qa` in the namespace `licenses`, as
/// the API server sends it for `operation` (CREATE, UPDATE, DELETE), for
/// the tests of the validator and of the webhook that answers it.
#[cfg(test)]
pub(crate) fn review_of(
    operation: &str,
    object: serde_json::Value,
    old: Option<serde_json::Value>,
) -> kube::core::admission::AdmissionReview<DynamicObject> {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": REVIEW_UID,
            "kind": {"group": "licensor.dev", "version": "v1alpha1", "kind": "DedicatedLicense"},
            "resource": {"group": "licensor.dev", "version": "v1alpha1", "resource": "dedicatedlicenses"},
            "name": "qa", "namespace": "licenses", "operation": operation,
            "userInfo": {"username": "admin"},
            "object": object, "oldObject": old, "dryRun": false
        }
    }))
    .expect("a review")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::http::{HttpBackend, Retry};
    use serde_json::{Value, json};

    /// A backend nobody answers at: any call to it ends in "skipped".
    fn validator() -> Validator {
        let backend = HttpBackend::new(
            "http://127.0.0.1:9",
            "acme",
            None,
            Duration::from_millis(200),
            Retry::default(),
            None,
        )
        .unwrap();
        Validator {
            backend: Arc::new(backend),
            instance: "default".into(),
            mode: Mode::Deny,
            timeout: Duration::from_millis(500),
            expiry_warning: Duration::from_secs(3600),
            metrics: Arc::default(),
            accounts: Arc::default(),
        }
    }

    fn object(count: i64, extra: Value) -> Value {
        let mut o = json!({
            "apiVersion": "licensor.dev/v1alpha1", "kind": "DedicatedLicense",
            "metadata": {"name": "qa", "namespace": "licenses"},
            "spec": {"organization": "qa-team", "product": "TestOps", "count": count},
        });
        if let (Some(o), Some(extra)) = (o.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                o.insert(k.clone(), v.clone());
            }
        }
        o
    }

    fn request(
        operation: &str,
        object: Value,
        old: Option<Value>,
    ) -> AdmissionRequest<DynamicObject> {
        review_of(operation, object, old).try_into().unwrap()
    }

    #[tokio::test]
    async fn what_leaves_the_spec_alone_is_never_judged() {
        let v = validator();
        // Labels, finalizers, status: the spec is as it was.
        let labelled = object(
            5,
            json!({"metadata": {"name": "qa", "namespace": "licenses", "labels": {"a": "b"}}}),
        );
        let r = request("UPDATE", labelled, Some(object(5, json!({}))));
        assert_eq!(v.findings(&r).await, Findings::default());
        // An object being deleted.
        let deleting = object(
            9,
            json!({"metadata": {"name": "qa", "namespace": "licenses", "deletionTimestamp": "2026-01-01T00:00:00Z"}}),
        );
        let r = request("UPDATE", deleting, Some(object(5, json!({}))));
        assert_eq!(v.findings(&r).await, Findings::default());
        // Observe never writes.
        let mut observed = object(9, json!({}));
        observed["spec"]["managementPolicy"] = json!("Observe");
        assert_eq!(
            v.findings(&request("CREATE", observed, None)).await,
            Findings::default()
        );
        // A delete.
        assert_eq!(
            v.findings(&request("DELETE", object(5, json!({})), None))
                .await,
            Findings::default()
        );
    }

    #[tokio::test]
    async fn what_the_tenants_forbid_is_denied_without_the_backend_and_warned_in_warn_mode() {
        let account: crate::licenseaccount::LicenseAccount = serde_yaml::from_str(
            "{apiVersion: licensor.dev/v1alpha1, kind: LicenseAccount, metadata: {name: default},
              spec: {tenants: [{namespaceSelector: {matchLabels: {team: qa}}, organizations: [qa-team], maxCount: 4}]}}",
        )
        .unwrap();
        let accounts = Arc::new(crate::operator::accounts::Accounts::default());
        accounts.set(crate::licenseaccount::Directory {
            accounts: [("default".to_string(), account)].into(),
            namespaces: [(
                "licenses".to_string(),
                [("team".to_string(), "qa".to_string())].into(),
            )]
            .into(),
        });
        let v = Validator {
            accounts,
            ..validator()
        };
        // Over the ceiling: denied, and the backend (down) was not asked.
        let response = v
            .review(&request("CREATE", object(5, json!({})), None))
            .await;
        assert!(!response.allowed);
        assert_eq!(
            response.result.message,
            "licensor: Forbidden: namespace licenses may not manage 5 TestOps licenses for organization qa-team on account default: its tenant entries allow organizations qa-team; count up to 4"
        );
        assert!(response.warnings.is_none(), "no check was skipped");
        // An account that is not there.
        let elsewhere = object(
            3,
            json!({"spec": {"organization": "qa-team", "product": "TestOps", "count": 3, "accountRef": "nope"}}),
        );
        let response = v.review(&request("CREATE", elsewhere, None)).await;
        assert!(
            response
                .result
                .message
                .starts_with("licensor: UnknownAccount: there is no LicenseAccount nope")
        );
        // Warn mode admits it and says why.
        let v = Validator {
            mode: Mode::Warn,
            ..v
        };
        let response = v
            .review(&request("CREATE", object(5, json!({})), None))
            .await;
        assert!(response.allowed);
        assert_eq!(response.warnings.unwrap_or_default().len(), 1);
    }

    #[tokio::test]
    async fn a_backend_that_cannot_be_read_allows_with_a_warning() {
        let v = validator();
        let r = request("CREATE", object(5, json!({})), None);
        let response = v.review(&r).await;
        assert!(response.allowed);
        let warnings = response.warnings.unwrap_or_default();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("check against the license backend was skipped"),
            "{warnings:?}"
        );
        // A changed spec on update is judged too.
        let r = request("UPDATE", object(6, json!({})), Some(object(5, json!({}))));
        assert_eq!(v.findings(&r).await.warnings.len(), 1);
    }
}
