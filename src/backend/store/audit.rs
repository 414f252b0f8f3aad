//! The audit log (R11): one record per change, written in the change's own
//! transaction, so a change and its record stand or fall together. Actions
//! are an enum, so a misspelt one cannot reach the log. A record is
//! written as an [`AuditRecord`] and read back as an
//! [`crate::api::AuditEntry`]; no other type holds one.

use std::borrow::Cow;

pub use crate::api::AuditAction;

/// One change to record: what, on which allocation or pool, the numbers,
/// the manager and the idempotency key. The actor and the time are added
/// when it is written. It borrows its strings from the change, and owns
/// them when it must outlive it ([`AuditRecord::into_owned`]: PostgreSQL
/// gathers the records of a transaction into one statement).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord<'a> {
    pub action: AuditAction,
    pub organization: Option<Cow<'a, str>>,
    pub product: Option<Cow<'a, str>>,
    pub from: i64,
    pub to: i64,
    pub rehomed: i64,
    pub displaced: i64,
    pub manager: Option<Cow<'a, str>>,
    pub idempotency_key: Option<Cow<'a, str>>,
    /// A token record's token: its name and role.
    pub subject: Option<Cow<'a, str>>,
}

impl<'a> AuditRecord<'a> {
    /// A record of `action` with no subject and no numbers yet.
    pub fn new(action: AuditAction) -> Self {
        AuditRecord {
            action,
            organization: None,
            product: None,
            from: 0,
            to: 0,
            rehomed: 0,
            displaced: 0,
            manager: None,
            idempotency_key: None,
            subject: None,
        }
    }

    /// A token created, revoked or expired: `subject` names it and its role.
    pub fn token(action: AuditAction, name: &str, role: crate::domain::Role) -> Self {
        AuditRecord {
            subject: Some(Cow::Owned(format!("{name} ({})", role.as_str()))),
            ..AuditRecord::new(action)
        }
    }

    /// A change of one organization's allocation, `from` -> `to`.
    pub fn allocation(
        action: AuditAction,
        organization: &'a str,
        product: &'a str,
        (from, to): (i64, i64),
    ) -> Self {
        AuditRecord {
            organization: Some(organization.into()),
            product: Some(product.into()),
            from,
            to,
            ..AuditRecord::new(action)
        }
    }

    /// The record with its strings its own.
    pub fn into_owned(self) -> AuditRecord<'static> {
        let own = |s: Option<Cow<'a, str>>| s.map(|s| Cow::Owned(s.into_owned()));
        AuditRecord {
            organization: own(self.organization),
            product: own(self.product),
            manager: own(self.manager),
            idempotency_key: own(self.idempotency_key),
            subject: own(self.subject),
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Action;

    #[test]
    fn actions_round_trip_through_their_names() {
        for a in AuditAction::ALL {
            assert_eq!(AuditAction::parse(a.as_str()), Some(a));
            assert_eq!(serde_json::to_value(a).unwrap(), a.as_str());
        }
        assert_eq!(
            AuditAction::of(Action::None, true),
            Some(AuditAction::Adopt)
        );
        assert_eq!(AuditAction::of(Action::None, false), None);
    }
}
