//! Migrations both stores run as written, in their places in each one's
//! list ([`super::sqlite::schema::MIGRATIONS`], PostgreSQL's own).

/// A managed allocation's deletion policy, kept with its owner so that
/// `--prune` orphans what the operator would orphan; the same on both
/// stores. Existing allocations keep Revoke, what they were written with.
pub const DELETION_POLICY: &str = r#"
ALTER TABLE allocations ADD COLUMN deletion_policy TEXT NOT NULL DEFAULT 'Revoke'
    CHECK (deletion_policy IN ('Revoke', 'Orphan'));
"#;

/// The sessions table, the same on both stores.
pub const SESSIONS: &str = r#"
CREATE TABLE sessions (
    hash TEXT PRIMARY KEY,
    account TEXT NOT NULL,
    actor TEXT NOT NULL,
    role TEXT NOT NULL,
    csrf TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
"#;
