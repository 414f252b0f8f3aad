//! Rows a transaction writes one by one, sent as one statement per table:
//! the allocations it saves and its audit records. A batch of writes saves
//! an allocation and adds an audit record for each write; gathered, that is
//! two statements for the batch instead of two for every write.
//!
//! The rows of a table are gathered in a place kept in the connection's
//! queue ([`Conn::reserve`]) and made into their statement just before the
//! queue goes out ([`Gathered::fill`]). Each new row moves the place to the
//! end of the queue, so the statement runs after everything queued before
//! its last row (a seed's organizations before their allocations). A
//! statement that must see the rows gathered so far (a removal, the clearing
//! of an account) makes them into statements first ([`Gathered::fill`]):
//! they keep their place, and the rows that come later gather anew after it.
//!
//! Audit records are numbered in the order they were added (`WITH
//! ORDINALITY ... ORDER BY`), as they would be one statement each.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::Hash;

use super::conn::{Conn, Param, Request};
use crate::backend::store::audit::AuditRecord;
use crate::domain::{Allocation, Expiry};

/// Upserts the gathered allocations; the last row of a key wins (a
/// statement may not change one row twice, so a key is gathered once).
const SAVE_ALLOCATIONS: &str =
    "INSERT INTO allocations (account, organization, product, dedicated, in_use, managed_by, version, deletion_policy, expires_at, then_count)
     SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::text[], $7::bigint[], $8::text[], $9::text[], $10::bigint[])
     ON CONFLICT (account, organization, product) DO UPDATE SET
       dedicated = excluded.dedicated, in_use = excluded.in_use,
       managed_by = excluded.managed_by, version = excluded.version,
       deletion_policy = excluded.deletion_policy,
       expires_at = excluded.expires_at, then_count = excluded.then_count";

/// Inserts the gathered audit records, numbered in the order given.
const INSERT_AUDIT: &str =
    "INSERT INTO audit (account, time, actor, action, organization, product, from_count, to_count, rehomed, displaced, manager, idempotency_key, subject)
     SELECT a, t, w, x, o, p, f, c, r, d, m, k, s
     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                 $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[], $11::text[], $12::text[],
                 $13::text[])
          WITH ORDINALITY AS u(a, t, w, x, o, p, f, c, r, d, m, k, s, n)
     ORDER BY n";

/// One audit record as it is written: its account, time and actor added.
pub type AuditRow = (String, String, String, AuditRecord<'static>);

/// Rows of one table gathered in one place of the queue; a row added under
/// the key of one before it takes that one's place.
struct Gathering<T, K> {
    /// The round trip and the place in the queue ([`Conn::reserve`]).
    place: (u64, usize),
    rows: Vec<T>,
    /// Where the row of each key is in `rows`.
    keys: HashMap<K, usize>,
}

impl<T, K: Eq + Hash> Gathering<T, K> {
    /// Adds a row (in the place of the row of the same `key`, if any), and
    /// moves the place to the end of the queue.
    fn add(gathering: &mut Option<Gathering<T, K>>, conn: &mut Conn, row: T, key: Option<K>) {
        let place = conn.reserve();
        let g = match gathering {
            Some(g) if g.place.0 == place.0 => {
                conn.fill(g.place, Request::Nothing);
                g.place = place;
                g
            }
            // None yet, or its round trip went (filled, as every trip is).
            _ => gathering.insert(Gathering {
                place,
                rows: Vec::new(),
                keys: HashMap::new(),
            }),
        };
        match key.map(|k| g.keys.entry(k)) {
            Some(Entry::Occupied(at)) => g.rows[*at.get()] = row,
            Some(Entry::Vacant(at)) => {
                at.insert(g.rows.len());
                g.rows.push(row);
            }
            None => g.rows.push(row),
        }
    }
}

/// An allocation's key: account, organization, product.
type AllocationKey = (String, String, String);

/// The rows a transaction has gathered and not yet made into statements.
#[derive(Default)]
pub struct Gathered {
    allocations: Option<Gathering<(String, Allocation), AllocationKey>>,
    audit: Option<Gathering<AuditRow, ()>>,
}

impl Gathered {
    pub fn save_allocation(&mut self, conn: &mut Conn, account: &str, a: &Allocation) {
        let key = (
            account.to_string(),
            a.organization.clone(),
            a.product.clone(),
        );
        let row = (account.to_string(), a.clone());
        Gathering::add(&mut self.allocations, conn, row, Some(key));
    }

    pub fn insert_audit(&mut self, conn: &mut Conn, row: AuditRow) {
        Gathering::add(&mut self.audit, conn, row, None);
    }

    /// Makes everything gathered into statements, in their places: before
    /// the queue goes out, or before a statement that must see the rows.
    /// Rows added later gather anew, after what is queued next.
    pub fn fill(&mut self, conn: &mut Conn) -> Result<(), tokio_postgres::Error> {
        if let Some(g) = self.allocations.take() {
            let params = allocation_columns(&g.rows);
            let statement = conn.statement(SAVE_ALLOCATIONS)?;
            conn.fill(g.place, Request::Execute(statement, params));
        }
        if let Some(g) = self.audit.take() {
            let params = audit_columns(&g.rows);
            let statement = conn.statement(INSERT_AUDIT)?;
            conn.fill(g.place, Request::Execute(statement, params));
        }
        Ok(())
    }

    /// Forgets what is gathered (the transaction is given up).
    pub fn discard(&mut self) {
        *self = Gathered::default();
    }
}

/// One column of the rows, as an array parameter.
fn column<T, V>(rows: &[T], f: impl Fn(&T) -> V) -> Param
where
    Vec<V>: tokio_postgres::types::ToSql + Sync + Send + 'static,
{
    Box::new(rows.iter().map(f).collect::<Vec<V>>())
}

fn allocation_columns(rows: &[(String, Allocation)]) -> Vec<Param> {
    vec![
        column(rows, |(account, _)| account.clone()),
        column(rows, |(_, a)| a.organization.clone()),
        column(rows, |(_, a)| a.product.clone()),
        column(rows, |(_, a)| a.dedicated),
        column(rows, |(_, a)| a.in_use),
        column(rows, |(_, a)| a.managed_by.clone()),
        column(rows, |(_, a)| a.version),
        column(rows, |(_, a)| a.deletion_policy.as_str().to_string()),
        column(rows, |(_, a)| a.expiry.as_ref().map(Expiry::until_stored)),
        column(rows, |(_, a)| a.expiry.map(|e| e.then_count)),
    ]
}

fn audit_columns(rows: &[AuditRow]) -> Vec<Param> {
    vec![
        column(rows, |(account, ..)| account.clone()),
        column(rows, |(_, time, ..)| time.clone()),
        column(rows, |(_, _, actor, _)| actor.clone()),
        column(rows, |(.., r)| r.action.as_str().to_string()),
        column(rows, |(.., r)| {
            r.organization.as_deref().map(str::to_string)
        }),
        column(rows, |(.., r)| r.product.as_deref().map(str::to_string)),
        column(rows, |(.., r)| r.from),
        column(rows, |(.., r)| r.to),
        column(rows, |(.., r)| r.rehomed),
        column(rows, |(.., r)| r.displaced),
        column(rows, |(.., r)| r.manager.as_deref().map(str::to_string)),
        column(rows, |(.., r)| {
            r.idempotency_key.as_deref().map(str::to_string)
        }),
        column(rows, |(.., r)| r.subject.as_deref().map(str::to_string)),
    ]
}
