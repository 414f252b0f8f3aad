//! The audit log as CSV (`GET .../audit?format=csv`, `licensor backend
//! audit -o csv`): a header row, then one row per record, oldest first,
//! written a page at a time so a long log is never held whole.
//!
//! A spreadsheet takes a cell that starts with `=`, `+`, `-` or `@` (or a
//! tab or carriage return) for a formula; names come from the people who
//! write them, so such a text field is written with a leading apostrophe,
//! which spreadsheets show as text. Numbers are never negative and are
//! written as they are.

use std::borrow::Cow;

use super::AuditEntry;

/// The columns, in order: the JSON field names of [`AuditEntry`].
pub const COLUMNS: [&str; 13] = [
    "id",
    "time",
    "actor",
    "action",
    "organization",
    "product",
    "from",
    "to",
    "rehomed",
    "displaced",
    "manager",
    "idempotencyKey",
    "subject",
];

/// The header row.
pub fn header() -> Vec<u8> {
    written(|w| w.write_record(COLUMNS))
}

/// The rows of `entries`.
pub fn rows(entries: &[AuditEntry]) -> Vec<u8> {
    written(|w| {
        entries.iter().try_for_each(|e| {
            let text = |s: &str| inert(s).into_owned();
            let optional = |s: &Option<String>| s.as_deref().map(text).unwrap_or_default();
            w.write_record([
                e.id.to_string(),
                text(&e.time),
                text(&e.actor),
                e.action.as_str().to_string(),
                optional(&e.organization),
                optional(&e.product),
                e.from.to_string(),
                e.to.to_string(),
                e.rehomed.to_string(),
                e.displaced.to_string(),
                optional(&e.manager),
                optional(&e.idempotency_key),
                optional(&e.subject),
            ])
        })
    })
}

/// A text field as a spreadsheet will not run it.
pub fn inert(field: &str) -> Cow<'_, str> {
    if field.starts_with(['=', '+', '-', '@', '\t', '\r']) {
        Cow::Owned(format!("'{field}"))
    } else {
        Cow::Borrowed(field)
    }
}

/// What `write` puts through a CSV writer into memory (which cannot fail).
fn written(write: impl FnOnce(&mut csv::Writer<Vec<u8>>) -> csv::Result<()>) -> Vec<u8> {
    let mut w = csv::Writer::from_writer(Vec::new());
    let _ = write(&mut w);
    w.into_inner().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::AuditAction;

    #[test]
    fn what_a_spreadsheet_would_run_is_written_as_text() {
        for field in ["=1+1", "+cmd", "-2", "@SUM(A1)", "\tx", "\rx"] {
            assert_eq!(inert(field), format!("'{field}"));
        }
        for field in ["qa-team", "token:ci", "", "a=b"] {
            assert_eq!(inert(field), field);
        }
    }

    #[test]
    fn a_row_quotes_what_needs_quoting() {
        let entry = AuditEntry {
            id: 7,
            time: "2026-12-07T12:00:00Z".into(),
            actor: "token:=HYPERLINK(\"x\")".into(),
            action: AuditAction::Increase,
            organization: Some("qa, team".into()),
            product: Some("TestOps".into()),
            from: 5,
            to: 10,
            rehomed: 0,
            displaced: 0,
            manager: None,
            idempotency_key: None,
            subject: None,
        };
        assert_eq!(
            String::from_utf8(header()).unwrap(),
            "id,time,actor,action,organization,product,from,to,rehomed,displaced,manager,idempotencyKey,subject\n"
        );
        assert_eq!(
            String::from_utf8(rows(&[entry])).unwrap(),
            "7,2026-12-07T12:00:00Z,\"token:=HYPERLINK(\"\"x\"\")\",increase,\"qa, team\",TestOps,5,10,0,0,,,\n"
        );
    }
}
