//! The page's HTML (maud escapes every value it is given). Every figure is
//! text; the bars repeat it for the eye, with the same words for a screen
//! reader.

use base64::Engine;
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};
use serde::{Deserialize, Serialize};

use super::{AUDIT_PAGE, AuditQuery, role_name};
use crate::api::{AuditAction, AuditEntry, Problem, Written};
use crate::backend::store::Session;
use crate::domain::{Allocation, MAX_COUNT, PoolView, Reason, Role, Snapshot};
use crate::history::{History, Range};

/// What a form just did, shown above the account after the form's
/// redirect (carried in a cookie of its own, shown once).
#[derive(Debug, Serialize, Deserialize)]
pub enum Outcome {
    /// Organization, product, and what the store wrote.
    Written(String, String, Written),
    /// Why not, and what was typed, to show again in its box.
    Refused(Problem, Option<Typed>),
}

/// A count as it was typed into one allocation's box.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Typed {
    pub organization: String,
    pub product: String,
    pub count: String,
}

impl Outcome {
    pub fn to_cookie(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
    }

    /// The outcome a cookie carries; `None` for anything else.
    pub fn from_cookie(value: &str) -> Option<Outcome> {
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(value)
            .ok()?;
        serde_json::from_slice(&json).ok()
    }

    fn typed_for(&self, a: &Allocation) -> Option<&str> {
        match self {
            Outcome::Refused(_, Some(t))
                if t.organization == a.organization && t.product == a.product =>
            {
                Some(&t.count)
            }
            _ => None,
        }
    }
}

/// A refusal of a form in the page's words where the API's name a field
/// the page does not have.
pub fn in_page_words(
    mut p: Problem,
    (organization, product): &(String, String),
    creating: bool,
) -> Problem {
    match p.reason {
        Some(Reason::WouldDisplaceUsers) => {
            p.detail = format!(
                "{} — revoke it with ← Revoke, which asks before displacing anyone",
                p.detail
                    .split("; set allowUserDisplacement")
                    .next()
                    .unwrap_or(&p.detail)
            );
        }
        _ if creating && p.expected_version == Some(0) => {
            p.detail = format!(
                "{organization} already holds {product} licenses; change them with Edit in its row"
            );
        }
        _ => {}
    }
    p
}

/// 1000000 as 1,000,000.
pub fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("−{out}") } else { out }
}

/// A table's header row, a column a name.
pub(super) fn header_row<'a>(names: impl IntoIterator<Item = &'a str>) -> Markup {
    html! { thead { tr { @for name in names { th scope="col" { (name) } } } } }
}

/// `n` and the word for one or many.
fn count_of(n: i64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn layout(title: &str, session: Option<&Session>, main: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · licensor" }
                link rel="icon" type="image/svg+xml" href="/favicon.svg";
                link rel="stylesheet" href="/page.css";
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header {
                    p.brand { "licensor · License Management" }
                    @if let Some(s) = session {
                        div.who {
                            span { "Account " strong { bdi { (s.account) } } " · " bdi { (s.who.actor) } " (" (role_name(s.who.role)) ")" }
                            form method="post" action="/sign-out" {
                                input type="hidden" name="csrf" value=(s.csrf);
                                button type="submit" { "Sign out" }
                            }
                        }
                    }
                }
                main #main { (main) }
            }
        }
    }
}

/// The sign-in form.
pub fn sign_in(secret: &str, error: Option<&Problem>) -> Markup {
    layout(
        "Sign in",
        None,
        html! {
            h1 { "Sign in" }
            @if let Some(p) = error { (problem_box(p)) }
            form.sign-in method="post" action="/sign-in" {
                input type="hidden" name="csrf" value=(secret);
                label for="token" { "API token" }
                input #token type="password" name="token" autocomplete="off" required;
                p.hint #token-hint { "A token from " code { "licensor token create" } "; the page keeps a session, not the token." }
                button type="submit" { "Sign in" }
            }
        },
    )
}

/// A refusal or error in the API's words.
fn problem_box(p: &Problem) -> Markup {
    html! {
        div.problem role="alert" {
            p {
                strong { (p.title) }
                @if let Some(reason) = p.reason.filter(|r| r.to_string() != p.title) { " (" code.reason { (reason) } ")" }
            }
            p.detail { (p.detail) }
        }
    }
}

/// A whole page saying what went wrong.
pub fn problem(p: &Problem, session: Option<&Session>) -> Markup {
    layout(
        &p.title,
        session,
        html! {
            h1 { (p.title) }
            (problem_box(p))
            p { a href="/" { "Back to the account" } }
        },
    )
}

fn licenses(n: i64) -> &'static str {
    if n == 1 { "license" } else { "licenses" }
}

fn outcome_box(o: &Outcome) -> Markup {
    match o {
        Outcome::Refused(p, _) => problem_box(p),
        Outcome::Written(organization, product, w) => {
            let e = &w.effect;
            html! {
                div.done role="status" {
                    p {
                        strong { bdi { (organization) } " " bdi { (product) } ": " (e.from) " → " (e.to) }
                        @if e.rehomed > 0 { "; " (e.rehomed) " in-use " (licenses(e.rehomed)) " moved to the account pool" }
                        @if e.displaced > 0 { "; " (count_of(e.displaced, "user", "users")) " displaced" }
                        @if e.is_noop() { " (nothing to change)" }
                    }
                }
            }
        }
    }
}

/// `instance / namespace / name`, or "unmanaged".
fn manager(a: &Allocation) -> String {
    match &a.managed_by {
        Some(m) => m.split('/').collect::<Vec<_>>().join(" / "),
        None => "unmanaged".into(),
    }
}

/// One pool's card; `i` makes its ids (names never do).
fn pool(i: usize, p: &PoolView) -> Markup {
    let used = p.dedicated + p.shared_in_use;
    let over = p.over_committed();
    let scale = p.total.max(used).max(1) as f64;
    let pct = |n: i64| format!("{:.2}%", n.max(0) as f64 * 100.0 / scale);
    let summary = format!(
        "{}: {} dedicated, {} shared in use, {} free of {}{}",
        p.product,
        p.dedicated,
        p.shared_in_use,
        p.free,
        p.total,
        if over > 0 {
            format!(", over-committed by {over}")
        } else {
            String::new()
        }
    );
    html! {
        section.pool data-product=(p.product) aria-labelledby=(format!("pool-{i}")) {
            h3 #(format!("pool-{i}")) { bdi { (p.product) } }
            svg.bar role="img" aria-label=(summary) viewBox="0 0 100 6" preserveAspectRatio="none" {
                rect.dedicated x="0" y="0" height="6" width=(pct(p.dedicated)) {}
                rect.shared x=(pct(p.dedicated)) y="0" height="6" width=(pct(p.shared_in_use)) {}
                @if over > 0 {
                    rect.over x=(pct(p.total)) y="0" height="6" width=(pct(over)) {}
                }
            }
            dl.figures {
                div { dt { "Total" } dd data-figure="total" { (p.total) } }
                div { dt { span.key.dedicated {} "Dedicated" } dd data-figure="dedicated" { (p.dedicated) } }
                div { dt { span.key.shared {} "Shared in use" } dd data-figure="sharedInUse" { (p.shared_in_use) } }
                div { dt { span.key.free {} "Free" } dd data-figure="free" { (p.free) } }
                @if over > 0 {
                    div.over-committed { dt { span.key.over {} "Over-committed" } dd data-figure="overCommitted" { (over) } }
                }
            }
        }
    }
}

/// One allocation's row; `i` makes its ids (names never do), and `typed`
/// is what was typed into its box when a change was refused.
/// `expiries`: the table has an Expires column (some allocation is
/// temporary), told as at `now`.
fn allocation_row(
    i: usize,
    a: &Allocation,
    session: &Session,
    typed: Option<&str>,
    expiries: Option<DateTime<Utc>>,
) -> Markup {
    let admin = session.who.role == Role::AccountAdmin;
    let id = format!("count-{i}");
    let shown = typed.map_or_else(|| a.dedicated.to_string(), str::to_string);
    html! {
        tr data-organization=(a.organization) data-product=(a.product) {
            th scope="row" data-label="Organization" { bdi { (a.organization) } }
            td data-label="Product" { bdi { (a.product) } }
            td.number data-field="dedicated" data-label="Dedicated" { (a.dedicated) }
            td.number data-field="inUse" data-label="In use" { (a.in_use) }
            td data-field="managedBy" data-label="Managed by" {
                @if a.managed_by.is_some() { (manager(a)) br; small { "changed in Git" } } @else { "unmanaged" }
            }
            @if let Some(now) = expiries {
                td data-field="expiry" data-label="Expires" {
                    @if let Some(e) = &a.expiry {
                        time datetime=(e.until_text()) { (e.describe(now)) }
                    } @else { "-" }
                }
            }
            @if admin {
                td.actions data-label="Actions" {
                    @if a.managed_by.is_none() {
                        form.edit method="post" action="/allocations/edit" {
                            input type="hidden" name="csrf" value=(session.csrf);
                            input type="hidden" name="organization" value=(a.organization);
                            input type="hidden" name="product" value=(a.product);
                            input type="hidden" name="version" value=(a.version);
                            label.visually-hidden for=(id) { "Dedicated " (a.product) " licenses for " (a.organization) }
                            input #(id) type="number" name="dedicated" min="0" max=(MAX_COUNT) value=(shown) required;
                            button type="submit" aria-label=(format!("Edit {} {}", a.organization, a.product)) { "✎ Edit" }
                        }
                        a.revoke href=(format!("/revoke?{}", query(&[("organization", &a.organization), ("product", &a.product)])))
                            aria-label=(format!("Revoke {} {}", a.organization, a.product)) { "← Revoke" }
                    } @else {
                        span.muted { "no edits here" }
                    }
                }
            }
        }
    }
}

pub fn query(pairs: &[(&str, &str)]) -> String {
    serde_urlencoded::to_string(pairs).unwrap_or_default()
}

/// The account: pools, allocations, the audit log.
pub fn account(
    session: &Session,
    snapshot: &Snapshot,
    audit: &[AuditEntry],
    q: &AuditQuery,
    outcome: Option<&Outcome>,
    now: DateTime<Utc>,
    history: &History,
) -> Markup {
    let range = history.range;
    let admin = session.who.role == Role::AccountAdmin;
    // Temporary allocations get a column saying when each ends.
    let expiries = snapshot
        .allocations
        .iter()
        .any(|a| a.expiry.is_some())
        .then_some(now);
    let pools: Vec<PoolView> = snapshot.pools.iter().map(PoolView::from).collect();
    let matching: Vec<&AuditEntry> = audit
        .iter()
        .rev()
        .filter(|e| q.organization.is_empty() || e.organization.as_deref() == Some(&q.organization))
        .filter(|e| q.product.is_empty() || e.product.as_deref() == Some(&q.product))
        .collect();
    let pages = matching.len().div_ceil(AUDIT_PAGE).max(1);
    let page = q.page.unwrap_or(1).clamp(1, pages);
    let shown = matching
        .iter()
        .skip((page - 1) * AUDIT_PAGE)
        .take(AUDIT_PAGE);
    let page_link = |n: usize| {
        format!(
            "/?{}#audit",
            query(&[
                ("organization", &q.organization),
                ("product", &q.product),
                ("page", &n.to_string())
            ])
        )
    };
    layout(
        &format!("Account {}", session.account),
        Some(session),
        html! {
            h1 { "Account " (session.account) }
            @if let Some(o) = outcome { (outcome_box(o)) }
            section #pools aria-labelledby="pools-title" {
                h2 #pools-title { "Pools" }
                div.pools { @for (i, p) in pools.iter().enumerate() { (pool(i, p)) } }
            }
            section #organizations aria-labelledby="organizations-title" {
                h2 #organizations-title { "Organizations" }
                @if !admin { p.hint { "Signed in as a Viewer: nothing can be changed here." } }
                div.scroll role="region" tabindex="0" aria-label="Dedicated licenses table" {
                    table #allocations {
                        caption.visually-hidden { "Dedicated licenses by organization and product" }
                        (header_row(["Organization", "Product", "Dedicated", "In use", "Managed by"]
                            .into_iter()
                            .chain(expiries.is_some().then_some("Expires"))
                            .chain(admin.then_some("Actions"))))
                        tbody {
                            @for (i, a) in snapshot.allocations.iter().enumerate() {
                                (allocation_row(i, a, session, outcome.and_then(|o| o.typed_for(a)), expiries))
                            }
                        }
                    }
                }
                @if admin { (give_form(session, snapshot, outcome)) }
            }
            section #history aria-labelledby="history-title" {
                h2 #history-title { "History" }
                nav.ranges aria-label="History range" {
                    @for r in Range::ALL {
                        a href=(format!("/?{}#history", query(&[
                            ("organization", &q.organization),
                            ("product", &q.product),
                            ("range", r.as_str()),
                        ])))
                            aria-current=[(r == range).then_some("page")] { (r.words()) }
                    }
                }
                @if audit.is_empty() {
                    p.empty { "No changes recorded yet: the history fills in as licenses are given, changed and used." }
                } @else {
                    p.hint {
                        (count_of(history.changes as i64, "recorded change", "recorded changes")) " over " (range.words())
                        @if q.organization.is_empty() { "; filter the audit log by an organization below to see its allocations' history too" }
                        "."
                    }
                    (super::chart::history(history, &q.organization))
                }
            }
            section #audit aria-labelledby="audit-title" {
                h2 #audit-title { "Audit log" }
                form.filter method="get" action="/" {
                    label for="filter-organization" { "Organization" }
                    select #filter-organization name="organization" {
                        option value="" { "all" }
                        @for o in &snapshot.organizations {
                            option value=(o) selected[*o == q.organization] { (o) }
                        }
                    }
                    label for="filter-product" { "Product" }
                    select #filter-product name="product" {
                        option value="" { "all" }
                        @for p in &pools {
                            option value=(p.product) selected[p.product == q.product] { (p.product) }
                        }
                    }
                    input type="hidden" name="range" value=(range.as_str());
                    button type="submit" { "Filter" }
                }
                p.download { a href="/audit.csv" download { "Download the whole audit log (CSV)" } }
                div.scroll role="region" tabindex="0" aria-label="Audit log table" {
                    table #audit-log {
                        caption.visually-hidden { "Changes, newest first" }
                        (header_row(["Time", "Who", "Action", "Organization", "Product", "Change"]))
                        tbody {
                            @for e in shown {
                                tr data-id=(e.id) {
                                    td { time datetime=(e.time) { (e.time.get(..19).unwrap_or(&e.time).replace('T', " ")) } }
                                    td { bdi { (e.actor) } }
                                    td { (e.action.as_str()) }
                                    td { bdi { (e.organization.as_deref().unwrap_or("")) } }
                                    td { bdi { (e.product.as_deref().unwrap_or("")) } }
                                    td {
                                        @if let Some(token) = &e.subject {
                                            "token " bdi { (token) }
                                        } @else if e.action == AuditAction::Seed {
                                            "account loaded from a fixture"
                                        } @else {
                                            (e.from) " → " (e.to)
                                            @if e.rehomed > 0 { ", " (e.rehomed) " rehomed" }
                                            @if e.displaced > 0 { ", " (e.displaced) " displaced" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                nav.pager aria-label="Audit log pages" {
                    @if page > 1 { a rel="prev" href=(page_link(page - 1)) { "Newer" } }
                    span { "Page " (page) " of " (pages) " (" (matching.len()) " entries)" }
                    @if page < pages { a rel="next" href=(page_link(page + 1)) { "Older" } }
                }
            }
        },
    )
}

/// The confirmation box of a revoke.
pub fn confirm_revoke(
    session: &Session,
    organization: &str,
    product: &str,
    dry: &Written,
    version: i64,
) -> Markup {
    let e = &dry.effect;
    html! {
        (layout(&format!("Revoke {organization} {product}"), Some(session), html! {
            h1 { "Revoke " (organization) "'s " (product) " licenses?" }
            div.confirm role="alertdialog" aria-labelledby="confirm-title" aria-describedby="confirm-numbers" tabindex="-1" autofocus {
                h2 #confirm-title { "Revoke " (e.from) " " (product) " " (licenses(e.from)) " of " (organization) }
                ul #confirm-numbers {
                    li data-figure="rehomed" { (e.rehomed) " in-use " (licenses(e.rehomed)) " move to the account pool" }
                    li data-figure="displaced" { (count_of(e.displaced, "user", "users")) " would be displaced (left without a license)" }
                }
                form method="post" action="/allocations/revoke" {
                    input type="hidden" name="csrf" value=(session.csrf);
                    input type="hidden" name="organization" value=(organization);
                    input type="hidden" name="product" value=(product);
                    input type="hidden" name="version" value=(version);
                    @if e.displaced > 0 {
                        p {
                            input #displace type="checkbox" name="displace" value="yes" required;
                            label for="displace" { "Displace " (count_of(e.displaced, "user", "users")) }
                        }
                    }
                    button.danger type="submit" { "Revoke" }
                    " "
                    a href="/" { "Cancel" }
                }
            }
        }))
    }
}

/// "Give licenses": an organization that holds none of a product gets some
/// (a new, unmanaged allocation). Offers only the pairs it does not hold.
fn give_form(session: &Session, snapshot: &Snapshot, outcome: Option<&Outcome>) -> Markup {
    let holds = |o: &str, p: &str| {
        snapshot
            .allocations
            .iter()
            .any(|a| a.organization == o && a.product == p)
    };
    let open: Vec<(&String, &String)> = snapshot
        .organizations
        .iter()
        .flat_map(|o| snapshot.pools.iter().map(move |p| (o, &p.product)))
        .filter(|(o, p)| !holds(o, p))
        .collect();
    let typed = match outcome {
        Some(Outcome::Refused(_, Some(t))) if !holds(&t.organization, &t.product) => Some(t),
        _ => None,
    };
    html! {
        @if !open.is_empty() {
            form.give method="post" action="/allocations/give" aria-labelledby="give-title" {
                h3 #give-title { "Give licenses" }
                p.hint { "To an organization that holds none of a product; it is not managed from Git." }
                input type="hidden" name="csrf" value=(session.csrf);
                label for="give-organization" { "Organization" }
                select #give-organization name="organization" required {
                    @for o in &snapshot.organizations {
                        @if open.iter().any(|(x, _)| *x == o) {
                            option value=(o) selected[typed.is_some_and(|t| t.organization == *o)] { (o) }
                        }
                    }
                }
                label for="give-product" { "Product" }
                select #give-product name="product" required {
                    @for p in &snapshot.pools {
                        option value=(p.product) selected[typed.is_some_and(|t| t.product == p.product)] { (p.product) }
                    }
                }
                label for="give-count" { "Licenses" }
                input #give-count type="number" name="dedicated" min="1" max=(MAX_COUNT)
                    value=(typed.map_or("1", |t| t.count.as_str())) required;
                button type="submit" { "Give" }
            }
        }
    }
}
