//! The routes of the license platform API (DESIGN §5), each a thin call into
//! the embedded store's transaction functions, which decide with the same
//! rules as the planner. Reads carry an `ETag` (the allocation's version);
//! writes honour `If-Match` / `If-None-Match: *`, `Idempotency-Key` and
//! `?dryRun=true`. The caller was authenticated (and, for writes, found to
//! be the Account Admin) before a route runs: see [`super::authenticate`].

use axum::Json;
use axum::extract::{Extension, FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use utoipa::IntoParams;

use super::Shared;
use crate::api::{
    AccountState, NewOrganization, Organization, Problem, ProblemType, Product, PutAllocation,
    Release, Seats, TotalBody, audit_csv,
};
use crate::backend::store::{Principal, Store, in_place, off_thread};
use crate::backend::{AuditEntry, BackendError, Written};
use crate::domain::{
    Allocation, AllocationWrite, Refusal, Target, check_count, check_identifier,
    unknown_organization, unknown_product,
};

fn malformed(message: impl Into<String>) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, ProblemType::Malformed, message)
}

/// A JSON object body whose rejections are problem details. The body must
/// be an object: serde would otherwise read `[6]` as `{"dedicated": 6}`;
/// and no object in it may name a member twice, which parsers disagree on
/// (one keeps the first, another the last), so that two of them in front
/// of each other could read two different requests from one body.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        use axum::extract::rejection::JsonRejection as R;
        let value = match Json::<Unique>::from_request(req, state).await {
            Ok(Json(Unique(v))) => v,
            Err(R::MissingJsonContentType(_)) => {
                return Err(Problem::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    ProblemType::UnsupportedMediaType,
                    "send the body as application/json",
                ));
            }
            Err(R::BytesRejection(e)) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ProblemType::TooLarge,
                    "the body is too large",
                ));
            }
            Err(e) => return Err(malformed(e.body_text())),
        };
        if !value.is_object() {
            return Err(malformed("the body must be a JSON object"));
        }
        serde_json::from_value(value)
            .map(Body)
            .map_err(|e| malformed(format!("the body does not fit: {e}")))
    }
}

/// A JSON value whose objects name each member once; a duplicate name is
/// an error that says which.
struct Unique(serde_json::Value);

impl<'de> Deserialize<'de> for Unique {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueVisitor).map(Unique)
    }
}

struct UniqueVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Unique(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(items.into())
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = serde_json::Map::new();
        while let Some(name) = map.next_key::<String>()? {
            if members.contains_key(&name) {
                return Err(serde::de::Error::custom(format!(
                    "the member {name:?} is named twice"
                )));
            }
            let Unique(v) = map.next_value()?;
            members.insert(name, v);
        }
        Ok(members.into())
    }
}

/// Query parameters whose rejections are problem details.
pub struct Params<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| Params(v))
            .map_err(|e| malformed(e.body_text()))
    }
}

/// Path parameters whose rejections are problem details.
pub struct Segments<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Names + Send> FromRequestParts<S> for Segments<T> {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Problem> {
        let Path(v) = Path::<T>::from_request_parts(parts, state)
            .await
            .map_err(|e| malformed(e.body_text()))?;
        v.check().map_err(|r| Problem::refusal(&r))?;
        Ok(Segments(v))
    }
}

/// A path whose organization id and product name, if any, are checked
/// against the one alphabet before anything else: one that breaks it names
/// nothing the account could have (404, with the rule in the message).
pub trait Names {
    fn check(&self) -> Result<(), Refusal> {
        Ok(())
    }
}

impl Names for AccountPath {}

impl Names for ProductPath {
    fn check(&self) -> Result<(), Refusal> {
        named(&self.product, unknown_product)
    }
}

impl Names for AllocationPath {
    fn check(&self) -> Result<(), Refusal> {
        named(&self.organization, unknown_organization)?;
        named(&self.product, unknown_product)
    }
}

fn named(value: &str, unknown: fn(&str) -> Refusal) -> Result<(), Refusal> {
    check_identifier("the name", value).map_err(|rule| {
        let mut r = unknown(value);
        r.message = rule.message;
        r
    })
}

/// Runs a store call for a request (the page's handlers too) off the async
/// threads, so that the request's deadline can answer while it waits.
pub(super) async fn store<T: Send + 'static>(
    s: &Shared,
    f: impl FnOnce(&Store) -> Result<T, BackendError> + Send + 'static,
) -> Result<T, Problem> {
    let store = s.store.clone();
    off_thread(move || f(&store)).await.map_err(Problem::from)
}

/// [`store`] for a read of a few rows by key (a token, an allocation): on
/// a store whose reads never wait for a writer (SQLite's, in WAL mode), in
/// place (see [`in_place`]). Never for a read that grows with the account
/// (a snapshot, the audit log): in place, the request's deadline could not
/// answer while it runs.
pub(super) async fn point_read<T: Send + 'static>(
    s: &Shared,
    f: impl FnOnce(&Store) -> Result<T, BackendError> + Send + 'static,
) -> Result<T, Problem> {
    let store = s.store.clone();
    let read = if store.reads_never_wait() {
        in_place(move || f(&store)).await
    } else {
        off_thread(move || f(&store)).await
    };
    read.map_err(Problem::from)
}

#[derive(Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ProductFilter {
    /// Only this product's allocations.
    pub product: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WriteParams {
    /// Answer without writing.
    #[serde(default)]
    pub dry_run: Option<bool>,
}

#[derive(Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteParams {
    /// Answer without writing.
    #[serde(default)]
    pub dry_run: Option<bool>,
    /// The manager removing the allocation (R8).
    #[serde(default)]
    pub managed_by: Option<String>,
    /// R6 consent.
    #[serde(default)]
    pub allow_user_displacement: Option<bool>,
}

/// The `{account}` path segment.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct AccountPath {
    /// The license account.
    #[param(example = "acme")]
    pub account: String,
}

/// The path of one product.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct ProductPath {
    /// The license account.
    #[param(example = "acme")]
    pub account: String,
    /// The product's exact name.
    #[param(example = "TestOps")]
    pub product: String,
}

/// The path of one organization's allocation (or seats) of one product.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Path)]
pub struct AllocationPath {
    /// The license account.
    #[param(example = "acme")]
    pub account: String,
    /// The organization's id.
    #[param(example = "qa-team")]
    pub organization: String,
    /// The product's exact name.
    #[param(example = "TestOps")]
    pub product: String,
}

fn etag(version: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

fn with_etag<T: serde::Serialize>(body: T, version: Option<i64>) -> Response {
    let mut r = Json(body).into_response();
    if let Some(v) = version {
        r.headers_mut().insert(header::ETAG, etag(v));
    }
    r
}

/// What a write is conditional on, read from `If-Match` and
/// `If-None-Match` (RFC 9110 §13.1): a version, "must not exist yet", or
/// "nothing can match" (an empty `If-Match` lists no version).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Condition {
    None,
    Version(i64),
    Absent,
    NothingMatches,
}

/// Reads the conditional headers; anything unreadable is malformed (400),
/// judged before any precondition is (412).
fn condition(headers: &HeaderMap) -> Result<Condition, String> {
    let text = |name| {
        headers
            .get(name)
            .map(|v: &HeaderValue| v.to_str().unwrap_or("\u{fffd}").trim().to_string())
    };
    let none_match = match text(header::IF_NONE_MATCH).as_deref() {
        None | Some("") => Condition::None,
        Some("*") => Condition::Absent,
        Some(other) => return Err(format!("If-None-Match {other:?}: writes take only *")),
    };
    match text(header::IF_MATCH) {
        None => Ok(none_match),
        Some(t) if t.is_empty() => Ok(Condition::NothingMatches),
        Some(t) => t
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .and_then(|v| v.parse::<i64>().ok())
            .filter(|v| *v > 0)
            .map(Condition::Version)
            // A weak validator never matches for a write (RFC 9110 §13.1.1).
            .ok_or_else(|| {
                format!(
                    "If-Match {t:?} is not an ETag of this API (a quoted version, as ETag sends it)"
                )
            }),
    }
}

impl Condition {
    /// The version the store is to check (0: must not exist), judged once
    /// the whole request is known to be well-formed; `None` when nothing can
    /// match (412).
    fn expected_version(self) -> Option<Option<i64>> {
        match self {
            Condition::None => Some(None),
            Condition::Version(v) => Some(Some(v)),
            Condition::Absent => Some(Some(0)),
            Condition::NothingMatches => None,
        }
    }
}

fn nothing_matches() -> Problem {
    Problem::new(
        StatusCode::PRECONDITION_FAILED,
        ProblemType::Stale,
        "If-Match names no version, so none matches; send the ETag you read",
    )
}

/// The headers of an allocation write, each readable or malformed (400),
/// before anything is judged.
fn write_headers(headers: &HeaderMap) -> Result<(Option<String>, Condition), String> {
    Ok((idempotency_key(headers)?, condition(headers)?))
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, String> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        // The documented pattern, `^[\x21-\x7e]{1,255}$`: no space inside.
        Some(v) => match v.to_str() {
            Ok(k) if (1..=255).contains(&k.len()) && k.bytes().all(|b| b.is_ascii_graphic()) => {
                Ok(Some(k.to_string()))
            }
            _ => Err("Idempotency-Key must be 1 to 255 visible characters, no spaces".into()),
        },
    }
}

#[utoipa::path(get, path = "/v1/accounts/{account}", params(AccountPath),
    responses((status = 200, description = "The account's pools, organizations and allocations, read at one moment", body = AccountState)))]
pub async fn get_account(
    State(s): State<Shared>,
    Segments(AccountPath { account }): Segments<AccountPath>,
) -> Result<Response, Problem> {
    let snapshot = store(&s, move |st| st.snapshot(&account)).await?;
    Ok(Json(AccountState {
        products: snapshot.pools.iter().map(Product::from).collect(),
        organizations: snapshot
            .organizations
            .into_iter()
            .map(|id| Organization { id })
            .collect(),
        allocations: snapshot.allocations,
    })
    .into_response())
}

#[utoipa::path(get, path = "/v1/accounts/{account}/products", params(AccountPath),
    responses((status = 200, description = "The account's pools", body = [Product])))]
pub async fn list_products(
    State(s): State<Shared>,
    Segments(AccountPath { account }): Segments<AccountPath>,
) -> Result<Response, Problem> {
    let pools = store(&s, move |st| st.snapshot(&account)).await?.pools;
    Ok(Json(pools.iter().map(Product::from).collect::<Vec<_>>()).into_response())
}

#[utoipa::path(put, path = "/v1/accounts/{account}/products/{product}", params(ProductPath),
    request_body = TotalBody,
    responses((status = 200, description = "The pool afterwards", body = Product)))]
pub async fn put_product(
    State(s): State<Shared>,
    Segments(ProductPath { account, product }): Segments<ProductPath>,
    Extension(who): Extension<Principal>,
    Body(body): Body<TotalBody>,
) -> Result<Response, Problem> {
    let pool = store(&s, move |st| {
        st.set_total(&account, &who, &product, body.total)
    })
    .await?;
    Ok(Json(Product::from(&pool)).into_response())
}

#[utoipa::path(get, path = "/v1/accounts/{account}/organizations", params(AccountPath),
    responses((status = 200, description = "The account's organizations", body = [Organization])))]
pub async fn list_organizations(
    State(s): State<Shared>,
    Segments(AccountPath { account }): Segments<AccountPath>,
) -> Result<Response, Problem> {
    let orgs = store(&s, move |st| st.snapshot(&account))
        .await?
        .organizations;
    Ok(Json(
        orgs.into_iter()
            .map(|id| Organization { id })
            .collect::<Vec<_>>(),
    )
    .into_response())
}

#[utoipa::path(post, path = "/v1/accounts/{account}/organizations", params(AccountPath),
    request_body = NewOrganization,
    responses((status = 201, description = "Created", body = Organization)))]
pub async fn create_organization(
    State(s): State<Shared>,
    Segments(AccountPath { account }): Segments<AccountPath>,
    Extension(who): Extension<Principal>,
    Body(body): Body<NewOrganization>,
) -> Result<Response, Problem> {
    let id = body.id.clone();
    store(&s, move |st| {
        st.create_organization(&account, &who, &body.id, body.name.as_deref())
    })
    .await?;
    Ok((StatusCode::CREATED, Json(Organization { id })).into_response())
}

#[utoipa::path(get, path = "/v1/accounts/{account}/allocations", params(AccountPath, ProductFilter),
    responses((status = 200, description = "The account's allocations", body = [Allocation])))]
pub async fn list_allocations(
    State(s): State<Shared>,
    Segments(AccountPath { account }): Segments<AccountPath>,
    Params(filter): Params<ProductFilter>,
) -> Result<Response, Problem> {
    let mut allocations = store(&s, move |st| st.snapshot(&account))
        .await?
        .allocations;
    if let Some(p) = filter.product {
        allocations.retain(|a| a.product == p);
    }
    Ok(Json(allocations).into_response())
}

#[utoipa::path(get, path = "/v1/accounts/{account}/organizations/{organization}/allocations/{product}",
    params(AllocationPath),
    responses((status = 200, description = "The allocation; ETag is its version", body = Allocation,
        headers(("ETag" = String, description = "The allocation's version, quoted")))))]
pub async fn get_allocation(
    State(s): State<Shared>,
    Segments(AllocationPath {
        account,
        organization,
        product,
    }): Segments<AllocationPath>,
) -> Result<Response, Problem> {
    let (o, p) = (organization.clone(), product.clone());
    let seen = point_read(&s, move |st| st.observe(&account, &o, &p)).await?;
    if seen.pools.is_empty() {
        return Err(Problem::refusal(&unknown_product(&product)));
    }
    if seen.organizations.is_empty() {
        return Err(Problem::refusal(&unknown_organization(&organization)));
    }
    match seen.allocations.into_iter().next() {
        Some(a) => {
            let v = a.version;
            Ok(with_etag(a, Some(v)))
        }
        None => Err(Problem::new(
            StatusCode::NOT_FOUND,
            ProblemType::NotFound,
            format!("organization {organization} has no {product} allocation"),
        )),
    }
}

#[utoipa::path(put, path = "/v1/accounts/{account}/organizations/{organization}/allocations/{product}",
    params(AllocationPath, WriteParams), request_body = PutAllocation,
    responses((status = 200, description = "Decided (and, unless a dry run, written)", body = Written,
        headers(("ETag" = String, description = "The allocation's version afterwards")))))]
pub async fn put_allocation(
    State(s): State<Shared>,
    Segments(AllocationPath {
        account,
        organization,
        product,
    }): Segments<AllocationPath>,
    Params(params): Params<WriteParams>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    Body(body): Body<PutAllocation>,
) -> Result<Response, Problem> {
    let (idempotency_key, condition) = write_headers(&headers).map_err(malformed)?;
    check_count(body.dedicated).map_err(|r| Problem::refusal(&r))?;
    let write = AllocationWrite {
        managed_by: body.managed_by,
        allow_user_displacement: body.allow_user_displacement,
        deletion_policy: body.deletion_policy,
        expiry: body.expiry,
        expected_version: condition.expected_version().ok_or_else(nothing_matches)?,
        idempotency_key,
        ..AllocationWrite::new(organization, product, Target::Count(body.dedicated))
    };
    written(&s, account, who, write, params.dry_run.unwrap_or(false)).await
}

#[utoipa::path(delete, path = "/v1/accounts/{account}/organizations/{organization}/allocations/{product}",
    params(AllocationPath, DeleteParams),
    responses((status = 200, description = "Revoked and removed (or nothing to remove)", body = Written)))]
pub async fn delete_allocation(
    State(s): State<Shared>,
    Segments(AllocationPath {
        account,
        organization,
        product,
    }): Segments<AllocationPath>,
    Params(params): Params<DeleteParams>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let (idempotency_key, condition) = write_headers(&headers).map_err(malformed)?;
    let write = AllocationWrite {
        managed_by: params.managed_by,
        allow_user_displacement: params.allow_user_displacement.unwrap_or(false),
        expected_version: condition.expected_version().ok_or_else(nothing_matches)?,
        idempotency_key,
        ..AllocationWrite::new(organization, product, Target::Remove)
    };
    written(&s, account, who, write, params.dry_run.unwrap_or(false)).await
}

async fn written(
    s: &Shared,
    account: String,
    who: Principal,
    write: AllocationWrite,
    dry_run: bool,
) -> Result<Response, Problem> {
    let w = if dry_run {
        store(s, move |st| st.write(&account, &who, &write, true)).await?
    } else {
        s.store
            .clone()
            .write_async(account, who, write)
            .await
            .map_err(Problem::from)?
    };
    let version = w.allocation.as_ref().map(|a| a.version);
    Ok(with_etag(w, version))
}

#[utoipa::path(post, path = "/v1/accounts/{account}/organizations/{organization}/allocations/{product}/release",
    params(AllocationPath), request_body = Release,
    responses((status = 204, description = "Released (or nothing was managed)")))]
pub async fn release_allocation(
    State(s): State<Shared>,
    Segments(at): Segments<AllocationPath>,
    Extension(who): Extension<Principal>,
    Body(body): Body<Release>,
) -> Result<Response, Problem> {
    no_content(&s, move |st| {
        st.release(
            &at.account,
            &who,
            &at.organization,
            &at.product,
            &body.managed_by,
        )
    })
    .await
}

#[utoipa::path(post, path = "/v1/accounts/{account}/organizations/{organization}/seats/{product}",
    params(AllocationPath), request_body = Seats,
    responses((status = 204, description = "Seats claimed or released")))]
pub async fn seats(
    State(s): State<Shared>,
    Segments(at): Segments<AllocationPath>,
    Extension(who): Extension<Principal>,
    Body(body): Body<Seats>,
) -> Result<Response, Problem> {
    no_content(&s, move |st| {
        st.seats(
            &at.account,
            &who,
            &at.organization,
            &at.product,
            body.into(),
        )
    })
    .await
}

/// A store call whose answer is 204 No Content.
async fn no_content(
    s: &Shared,
    f: impl FnOnce(&Store) -> Result<(), BackendError> + Send + 'static,
) -> Result<Response, Problem> {
    store(s, f).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// How the audit log is answered.
#[derive(Deserialize, Clone, Copy, Default, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuditFormat {
    #[default]
    Json,
    /// `text/csv`, a header row first (see [`crate::api::audit_csv`]).
    Csv,
}

#[derive(Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    /// `json` (the default) or `csv`, for a spreadsheet.
    #[serde(default)]
    #[param(inline)]
    pub format: Option<AuditFormat>,
    /// Only the records after this one (its `id`): the next page of a long
    /// log starts after the last record of the page before.
    #[serde(default)]
    #[param(minimum = 0)]
    pub after: Option<i64>,
    /// At most this many records.
    #[serde(default)]
    #[param(minimum = 1)]
    pub limit: Option<i64>,
}

/// Records a CSV download reads at a time.
const CSV_PAGE: i64 = 1000;

#[utoipa::path(get, path = "/v1/accounts/{account}/audit", params(AccountPath, AuditParams),
    responses((status = 200, description = "The audit log, oldest first",
        content((Vec<AuditEntry> = "application/json"), (String = "text/csv")))))]
pub async fn audit(
    State(s): State<Shared>,
    Segments(AccountPath { account }): Segments<AccountPath>,
    Params(params): Params<AuditParams>,
) -> Result<Response, Problem> {
    let after = params.after.unwrap_or(0);
    let limit = params.limit.unwrap_or(i64::MAX);
    if after < 0 || limit < 1 {
        return Err(malformed("after is at least 0 and limit at least 1"));
    }
    if params.format.unwrap_or_default() == AuditFormat::Json {
        let entries = store(&s, move |st| st.audit_page(&account, after, limit)).await?;
        return Ok(Json(entries).into_response());
    }
    audit_download(s, account, after, limit).await
}

/// Up to `limit` records of the audit log of `account` after the record
/// `after`, as a CSV download (the API's `?format=csv`, the page's link).
pub(super) async fn audit_download(
    s: Shared,
    account: String,
    after: i64,
    limit: i64,
) -> Result<Response, Problem> {
    // The first page is read before answering, so a store that is down is
    // a problem, not a 200 cut short; then a page at a time, never the
    // whole log at once. Records added while it is read come at its end.
    let name = format!("attachment; filename=\"{account}-audit.csv\"");
    let page = move |s: &Shared, account: &str, after: i64, left: i64| {
        let account = account.to_string();
        let s = s.clone();
        async move {
            store(&s, move |st| {
                st.audit_page(&account, after, left.min(CSV_PAGE))
            })
            .await
        }
    };
    let first = page(&s, &account, after, limit).await?;
    // Where the next page starts, and how many records may follow.
    let next = |read: &[crate::api::AuditEntry], left: i64| {
        let left = left - read.len() as i64;
        read.last().filter(|_| left > 0).map(|e| (e.id, left))
    };
    let head = futures::stream::iter([Ok(audit_csv::header()), Ok(audit_csv::rows(&first))]);
    let rest = futures::stream::unfold(next(&first, limit), move |at| {
        let (s, account) = (s.clone(), account.clone());
        async move {
            let (after, left) = at?;
            match page(&s, &account, after, left).await {
                Ok(read) if read.is_empty() => None,
                Ok(read) => Some((Ok(audit_csv::rows(&read)), next(&read, left))),
                // Cut short: the client sees the body end early.
                Err(p) => Some((Err(std::io::Error::other(p.detail)), None)),
            }
        }
    });
    let body = axum::body::Body::from_stream(futures::StreamExt::chain(head, rest));
    Ok((
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_string()),
            (header::CONTENT_DISPOSITION, name),
        ],
        body,
    )
        .into_response())
}
