//! Plans and apply results for people (text, markdown) and machines (json).
//! Rendering is pure: status and audit return strings; a plan, which can
//! hold 100,000 changes, is written straight into the writer it is given
//! (stdout for the commands), never held a second time as text.

use std::fmt::Write;
use std::io;

use chrono::{DateTime, Utc};

use super::Format;
use crate::backend::AuditEntry;
use crate::backend::store::TokenInfo;
use crate::domain::{Action, Allocation, PoolView, Snapshot};
use crate::plan::{Change, Outcome, Plan};

/// Whether the plan is a preview or the record of an apply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Plan,
    Apply,
}

pub fn print_plan(plan: &Plan, format: Format, mode: Mode, location: &str) {
    let mut out = io::BufWriter::with_capacity(1 << 16, io::stdout().lock());
    let written = write_plan(&mut out, plan, format, mode, location).and_then(|()| {
        use io::Write as _;
        out.flush()
    });
    if let Err(e) = written {
        eprintln!("error: writing the plan to stdout: {e}");
    }
}

/// Writes a plan in `format`.
pub fn write_plan(
    out: &mut impl io::Write,
    plan: &Plan,
    format: Format,
    mode: Mode,
    location: &str,
) -> io::Result<()> {
    match format {
        Format::Json => json(out, plan),
        Format::Text => text(out, plan, mode, location),
        Format::Markdown => markdown(out, plan, mode),
    }
}

/// The JSON contract of DESIGN §4.
pub fn json(out: &mut impl io::Write, plan: &Plan) -> io::Result<()> {
    serde_json::to_writer_pretty(&mut *out, plan)?;
    writeln!(out)
}

struct Counts {
    planned: usize,
    applied: usize,
    refused: usize,
    failed: usize,
    unchanged: usize,
}

fn counts(plan: &Plan) -> Counts {
    let n = |o: Outcome| plan.changes.iter().filter(|c| c.outcome == o).count();
    Counts {
        planned: n(Outcome::Planned),
        applied: n(Outcome::Applied),
        refused: n(Outcome::Refused),
        failed: n(Outcome::Failed),
        unchanged: n(Outcome::Unchanged),
    }
}

fn summary(plan: &Plan, mode: Mode) -> String {
    let c = counts(plan);
    let head = match mode {
        Mode::Plan => format!("{} to change", c.planned),
        Mode::Apply => format!("{} applied", c.applied),
    };
    let mut s = format!("{head}, {} refused", c.refused);
    if c.failed > 0 {
        let _ = write!(s, ", {} failed", c.failed);
    }
    let _ = write!(s, ", {} unchanged", c.unchanged);
    s
}

fn symbol(c: &Change) -> char {
    match (c.outcome, c.action) {
        (Outcome::Refused | Outcome::Failed, _) => '!',
        (Outcome::Unchanged, _) => '=',
        (_, Action::Create) => '+',
        (_, Action::Revoke | Action::Orphan) => '-',
        _ => '~',
    }
}

fn outcome_str(o: Outcome) -> &'static str {
    match o {
        Outcome::Planned => "planned",
        Outcome::Applied => "applied",
        Outcome::Refused => "refused",
        Outcome::Failed => "failed",
        Outcome::Unchanged => "unchanged",
    }
}

/// Changes worth showing one by one: everything but quiet in-sync ones
/// (a temporary allocation in sync is shown: when it ends is news).
fn shown(plan: &Plan) -> impl Iterator<Item = &Change> {
    plan.changes
        .iter()
        .filter(|c| c.outcome != Outcome::Unchanged || !c.diff.is_empty() || c.expiry.is_some())
}

/// When a temporary allocation's count ends, in words, as of the plan.
fn ending(c: &Change, plan: &Plan) -> Option<String> {
    c.expiry.as_ref().map(|e| e.expiry().describe(plan.at))
}

pub fn text(out: &mut impl io::Write, plan: &Plan, mode: Mode, location: &str) -> io::Result<()> {
    let verb = match mode {
        Mode::Plan => "Plan",
        Mode::Apply => "Apply",
    };
    writeln!(out, "{verb} against {location}: {}", summary(plan, mode))?;
    for c in shown(plan) {
        writeln!(
            out,
            "\n{} {}  {} {}  {} -> {}  {}  {}{}",
            symbol(c),
            c.resource,
            c.organization,
            c.product,
            c.from,
            c.to,
            c.action.as_str(),
            outcome_str(c.outcome),
            c.reason.map(|r| format!(" {r}")).unwrap_or_default()
        )?;
        writeln!(out, "    {}", c.message)?;
        if let Some(ending) = ending(c, plan) {
            writeln!(out, "    {ending}")?;
        }
        for line in c.diff.lines() {
            writeln!(out, "    {line}")?;
        }
    }
    if !plan.pools.is_empty() {
        writeln!(out, "\nPools:")?;
        for (before, after) in pool_pairs(plan) {
            writeln!(
                out,
                "  {:<16} total {:>7}  dedicated {:>15}  shared in use {:>7}  free {:>15}{}",
                after.product,
                after.total,
                moved(before.map(|b| b.dedicated), after.dedicated),
                after.shared_in_use,
                moved(before.map(|b| b.free), after.free),
                if after.is_over_committed() {
                    "  OverCommitted"
                } else {
                    ""
                }
            )?;
        }
    }
    Ok(())
}

fn pool_pairs(plan: &Plan) -> Vec<(Option<&PoolView>, &PoolView)> {
    plan.pools
        .iter()
        .map(|after| {
            let before = plan
                .pools_before
                .iter()
                .find(|b| b.product == after.product);
            (before, after)
        })
        .collect()
}

fn moved(before: Option<i64>, after: i64) -> String {
    match before {
        Some(b) if b != after => format!("{b} -> {after}"),
        _ => after.to_string(),
    }
}

/// A pull-request comment: a summary table, the diffs folded, the pools.
pub fn markdown(out: &mut impl io::Write, plan: &Plan, mode: Mode) -> io::Result<()> {
    let title = match mode {
        Mode::Plan => "licensor plan",
        Mode::Apply => "licensor apply",
    };
    writeln!(out, "### {title}: {}\n", summary(plan, mode))?;
    let rows: Vec<&Change> = shown(plan).collect();
    if rows.is_empty() {
        writeln!(out, "No changes: the backend matches the manifests.\n")?;
    } else {
        writeln!(
            out,
            "| | Resource | Organization | Product | From | To | Action | Outcome | Reason | Message |"
        )?;
        writeln!(out, "|---|---|---|---|---:|---:|---|---|---|---|")?;
        for c in &rows {
            writeln!(
                out,
                "| {} | `{}` | {} | {} | {} | {} | {} | {} | {} | {} |",
                match symbol(c) {
                    '!' => "❌",
                    '+' => "➕",
                    '-' => "➖",
                    '=' => "⏸️",
                    _ => "✏️",
                },
                c.resource,
                cell(&c.organization),
                cell(&c.product),
                c.from,
                c.to,
                c.action.as_str(),
                outcome_str(c.outcome),
                c.reason.map(|r| format!("`{r}`")).unwrap_or_default(),
                match ending(c, plan) {
                    Some(ending) => format!("{}<br>⏳ {ending}", cell(&c.message)),
                    None => cell(&c.message),
                }
            )?;
        }
        writeln!(out)?;
        for c in rows.iter().filter(|c| !c.diff.is_empty()) {
            writeln!(
                out,
                "<details><summary><code>{}</code>: {} {} → {} ({})</summary>\n\n```diff\n{}```\n</details>\n",
                c.resource,
                c.action.as_str(),
                c.from,
                c.to,
                outcome_str(c.outcome),
                c.diff
            )?;
        }
    }
    if !plan.pools.is_empty() {
        writeln!(out, "#### Pools\n")?;
        writeln!(
            out,
            "| Product | Total | Dedicated | Shared in use | Free |"
        )?;
        writeln!(out, "|---|---:|---:|---:|---:|")?;
        for (before, after) in pool_pairs(plan) {
            writeln!(
                out,
                "| {} | {} | {} | {} | {}{} |",
                cell(&after.product),
                after.total,
                moved(before.map(|b| b.dedicated), after.dedicated).replace("->", "→"),
                after.shared_in_use,
                moved(before.map(|b| b.free), after.free).replace("->", "→"),
                if after.is_over_committed() {
                    " ⚠️ over-committed"
                } else {
                    ""
                }
            )?;
        }
    }
    Ok(())
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// A temporary allocation's end as `status` shows it at `now`; `-` for
/// none.
fn expiry_cell(a: &Allocation, now: DateTime<Utc>) -> String {
    a.expiry
        .map_or_else(|| "-".to_string(), |e| e.describe(now))
}

/// `licensor status` as text, at `now` (an expiry says how far off it is).
pub fn status_text(snapshot: &Snapshot, location: &str, now: DateTime<Utc>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "Backend {location}\n");
    let _ = writeln!(
        s,
        "{:<16} {:>9} {:>10} {:>14} {:>9}",
        "PRODUCT", "TOTAL", "DEDICATED", "SHARED-IN-USE", "FREE"
    );
    for p in &snapshot.pools {
        let v = PoolView::from(p);
        let _ = writeln!(
            s,
            "{:<16} {:>9} {:>10} {:>14} {:>9}{}",
            v.product,
            v.total,
            v.dedicated,
            v.shared_in_use,
            v.free,
            if v.is_over_committed() {
                "  OverCommitted"
            } else {
                ""
            }
        );
    }
    // The EXPIRY column is there when some allocation is temporary; the
    // managers are padded to the longest then.
    let temporary = snapshot.allocations.iter().any(|a| a.expiry.is_some());
    let manager = |a: &Allocation| a.managed_by.as_deref().unwrap_or("-").to_string();
    let width = match temporary {
        true => snapshot
            .allocations
            .iter()
            .map(|a| manager(a).len())
            .max()
            .unwrap_or(0),
        false => 0,
    };
    let expiry = |text: String| match temporary {
        true => format!("  {text}"),
        false => String::new(),
    };
    let _ = writeln!(
        s,
        "\n{:<24} {:<16} {:>9} {:>7}  {:<width$}{}",
        "ORGANIZATION",
        "PRODUCT",
        "DEDICATED",
        "IN-USE",
        "MANAGED-BY",
        expiry("EXPIRY".into())
    );
    for a in &snapshot.allocations {
        let _ = writeln!(
            s,
            "{:<24} {:<16} {:>9} {:>7}  {:<width$}{}",
            a.organization,
            a.product,
            a.dedicated,
            a.in_use,
            manager(a),
            expiry(expiry_cell(a, now))
        );
    }
    s
}

/// `licensor status -o markdown`: the pools and the allocations as tables.
pub fn status_markdown(snapshot: &Snapshot, location: &str, now: DateTime<Utc>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "### licensor status: {}\n", cell(location));
    let _ = writeln!(s, "| Product | Total | Dedicated | Shared in use | Free |");
    let _ = writeln!(s, "|---|---:|---:|---:|---:|");
    for p in &snapshot.pools {
        let v = PoolView::from(p);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {}{} |",
            cell(&v.product),
            v.total,
            v.dedicated,
            v.shared_in_use,
            v.free,
            if v.is_over_committed() {
                " ⚠️ over-committed"
            } else {
                ""
            }
        );
    }
    let temporary = snapshot.allocations.iter().any(|a| a.expiry.is_some());
    let expiry = |text: String| match temporary {
        true => format!(" {text} |"),
        false => String::new(),
    };
    let _ = writeln!(
        s,
        "\n| Organization | Product | Dedicated | In use | Managed by |{}",
        expiry("Expiry".into())
    );
    let _ = writeln!(s, "|---|---|---:|---:|---|{}", expiry("---".into()));
    for a in &snapshot.allocations {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |{}",
            cell(&a.organization),
            cell(&a.product),
            a.dedicated,
            a.in_use,
            a.managed_by
                .as_deref()
                .map(|m| format!("`{}`", cell(m)))
                .unwrap_or_else(|| "-".into()),
            expiry(expiry_cell(a, now))
        );
    }
    s
}

/// `licensor backend audit` as text: one line per record, oldest first.
pub fn audit_text(entries: &[AuditEntry]) -> String {
    let mut s = String::new();
    for e in entries {
        let _ = writeln!(
            s,
            "{} {} {} {} {} -> {} rehomed {} displaced {} manager {} key {}",
            e.time,
            e.actor,
            e.action,
            about(e),
            e.from,
            e.to,
            e.rehomed,
            e.displaced,
            e.manager.as_deref().unwrap_or("-"),
            e.idempotency_key.as_deref().unwrap_or("-")
        );
    }
    s
}

/// What a record is about: its organization and product, or the token a
/// token's record names.
fn about(e: &AuditEntry) -> String {
    match &e.subject {
        Some(token) => format!("token {token}"),
        None => format!(
            "{}/{}",
            e.organization.as_deref().unwrap_or("-"),
            e.product.as_deref().unwrap_or("-")
        ),
    }
}

/// `licensor backend audit -o markdown`: the audit log as a table.
pub fn audit_markdown(entries: &[AuditEntry]) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "### licensor audit: {} records\n", entries.len());
    let _ = writeln!(
        s,
        "| Time | Actor | Action | Organization | Product | From | To | Rehomed | Displaced | Manager | Token |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---:|---:|---:|---:|---|---|");
    let or_dash = |v: Option<&str>| v.map(cell).unwrap_or_else(|| "-".into());
    for e in entries {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            e.time,
            cell(&e.actor),
            e.action,
            or_dash(e.organization.as_deref()),
            or_dash(e.product.as_deref()),
            e.from,
            e.to,
            e.rehomed,
            e.displaced,
            or_dash(e.manager.as_deref()),
            or_dash(e.subject.as_deref())
        );
    }
    s
}

/// The cells of `token list`: name, role, created, expires, last used.
fn token_cells(t: &TokenInfo) -> [&str; 5] {
    [
        &t.name,
        t.role.as_str(),
        &t.created,
        t.expires.as_deref().unwrap_or("never"),
        t.last_used.as_deref().unwrap_or("never"),
    ]
}

/// Said when an account has no tokens, in every format.
fn no_tokens(account: &str) -> String {
    format!(
        "account {account} has no tokens; `licensor token create --role Viewer --name NAME` makes one\n"
    )
}

/// `licensor token list`: the tokens as a table (never a token or its
/// hash), or a line saying there are none.
pub fn tokens_text(account: &str, tokens: &[TokenInfo]) -> String {
    if tokens.is_empty() {
        return no_tokens(account);
    }
    let header = ["NAME", "ROLE", "CREATED", "EXPIRES", "LAST USED"];
    let width: Vec<usize> = (0..header.len())
        .map(|i| {
            tokens
                .iter()
                .map(|t| token_cells(t)[i].chars().count())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: [&str; 5]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        format!("{}\n", padded.join("  ").trim_end())
    };
    let mut out = line(header);
    for t in tokens {
        out.push_str(&line(token_cells(t)));
    }
    out
}

/// `licensor token list -o markdown`: the tokens as a table.
pub fn tokens_markdown(account: &str, tokens: &[TokenInfo]) -> String {
    if tokens.is_empty() {
        return no_tokens(account);
    }
    let mut s = format!("### licensor tokens of account {}\n\n", cell(account));
    let _ = writeln!(s, "| Name | Role | Created | Expires | Last used |");
    let _ = writeln!(s, "|---|---|---|---|---|");
    for t in tokens {
        let cells: Vec<String> = token_cells(t).iter().map(|c| cell(c)).collect();
        let _ = writeln!(s, "| {} |", cells.join(" | "));
    }
    s
}
