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

/// Tokens with a lifecycle (DESIGN §10): an expiry, when each was last
/// used, and a name unique in its account (a name used twice before gets
/// its hash's first 8 digits added, the oldest-by-hash keeping it). A
/// session names the token it was opened with, so a revoked or expired
/// token ends it; sessions from before name none and end. Token records of
/// the audit log name their token in `subject`.
pub const TOKEN_LIFECYCLE: &str = r#"
ALTER TABLE tokens ADD COLUMN expires_at TEXT;
ALTER TABLE tokens ADD COLUMN last_used TEXT;
UPDATE tokens SET name = name || '-' || substr(hash, 1, 8)
    WHERE EXISTS (SELECT 1 FROM tokens t
                  WHERE t.account = tokens.account AND t.name = tokens.name AND t.hash < tokens.hash);
CREATE UNIQUE INDEX tokens_name ON tokens(account, name);
DELETE FROM sessions;
ALTER TABLE sessions ADD COLUMN token TEXT NOT NULL DEFAULT '';
CREATE INDEX sessions_token ON sessions(token);
ALTER TABLE audit ADD COLUMN subject TEXT;
"#;

/// A managed allocation's expiry (DESIGN §11), kept with its owner as its
/// deletion policy is, so that the page and `licensor status` show it beside
/// the allocation: both columns or neither. Existing allocations have none.
pub const EXPIRY: &str = r#"
ALTER TABLE allocations ADD COLUMN expires_at TEXT;
ALTER TABLE allocations ADD COLUMN then_count BIGINT
    CHECK ((expires_at IS NULL) = (then_count IS NULL) AND (then_count IS NULL OR then_count BETWEEN 0 AND 1000000));
"#;
