//! The routes of the license platform API (DESIGN §5), each a thin call into
//! the embedded store's transaction functions, which decide with the same
//! rules as the planner. Reads carry an `ETag` (the allocation's version);
//! writes honour `If-Match` / `If-None-Match: *`, `Idempotency-Key` and
//! `?dryRun=true`.

use axum::Json;
use axum::extract::{FromRequest, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::problem::{MALFORMED, MEDIA, NOT_FOUND, Problem, TOO_LARGE};
use super::{Shared, authorize};
use crate::backend::sqlite::Principal;
use crate::backend::{AuditEntry, BackendError, Written};
use crate::domain::{Allocation, AllocationWrite, PoolView, Reason, Refusal, SeatChange, Target};

/// A JSON body whose rejections are problem details.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = Problem;

    async fn from_request(req: Request, state: &S) -> Result<Self, Problem> {
        use axum::extract::rejection::JsonRejection as R;
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(R::MissingJsonContentType(_)) => Err(Problem::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                MEDIA,
                "send the body as application/json",
            )),
            Err(R::BytesRejection(e)) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(Problem::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    TOO_LARGE,
                    "the body is too large",
                ))
            }
            Err(e) => Err(Problem::new(
                StatusCode::BAD_REQUEST,
                MALFORMED,
                e.body_text(),
            )),
        }
    }
}

/// Runs a store call off the async threads.
async fn store<T: Send + 'static>(
    s: &Shared,
    f: impl FnOnce(&crate::backend::sqlite::Store) -> Result<T, BackendError> + Send + 'static,
) -> Result<T, Problem> {
    let store = s.store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(|e| Problem::from(BackendError::Unavailable(format!("store task: {e}"))))?
        .map_err(Problem::from)
}

#[derive(Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TotalBody {
    /// Licenses purchased; may go below what is handed out (R9).
    pub total: i64,
}

#[derive(Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NewOrganization {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Serialize, Deserialize, ToSchema)]
pub struct Organization {
    pub id: String,
}

/// The desired allocation.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PutAllocation {
    /// Dedicated licenses, 0..=1000000; 0 revokes all, in-use seats included.
    pub dedicated: i64,
    /// The manager of the allocation (R8), for example `default/licenses/qa`.
    #[serde(default)]
    pub managed_by: Option<String>,
    /// R6 consent.
    #[serde(default)]
    pub allow_user_displacement: bool,
}

#[derive(Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Release {
    pub managed_by: String,
}

/// Exactly one of `claim` and `release`.
#[derive(Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Seats {
    #[serde(default)]
    pub claim: Option<i64>,
    #[serde(default)]
    pub release: Option<i64>,
}

#[derive(Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProductFilter {
    pub product: Option<String>,
}

#[derive(Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WriteParams {
    /// Answer without writing.
    #[serde(default)]
    pub dry_run: bool,
}

#[derive(Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeleteParams {
    #[serde(default)]
    pub dry_run: bool,
    #[serde(default)]
    pub managed_by: Option<String>,
    #[serde(default)]
    pub allow_user_displacement: bool,
}

fn etag(version: i64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{version}\"")).unwrap_or(HeaderValue::from_static("\"0\""))
}

fn with_etag<T: Serialize>(body: T, version: Option<i64>) -> Response {
    let mut r = Json(body).into_response();
    if let Some(v) = version {
        r.headers_mut().insert(header::ETAG, etag(v));
    }
    r
}

/// `If-Match: "7"` -> 7; `If-None-Match: *` -> 0 (must not exist yet).
fn expected_version(headers: &HeaderMap) -> Result<Option<i64>, String> {
    if let Some(v) = headers.get(header::IF_MATCH) {
        let text = v.to_str().unwrap_or_default().trim();
        let version = text
            .trim_start_matches("W/")
            .trim_matches('"')
            .parse::<i64>()
            .map_err(|_| format!("If-Match {text:?} is not an ETag of this API"))?;
        return Ok(Some(version));
    }
    if headers.get(header::IF_NONE_MATCH).is_some_and(|v| v == "*") {
        return Ok(Some(0));
    }
    Ok(None)
}

fn malformed(message: String) -> Problem {
    Problem::new(StatusCode::BAD_REQUEST, MALFORMED, message)
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, String> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => match v.to_str() {
            Ok(k) if !k.is_empty() && k.len() <= 255 => Ok(Some(k.to_string())),
            _ => Err("Idempotency-Key must be 1 to 255 visible characters".into()),
        },
    }
}

#[utoipa::path(get, path = "/v1/accounts/{account}/products", responses((status = 200, body = [PoolView])))]
pub async fn list_products(
    State(s): State<Shared>,
    Path(account): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    authorize(&s, &headers, &account).await?;
    let pools = store(&s, move |st| st.snapshot(&account)).await?.pools;
    Ok(Json(pools.iter().map(PoolView::from).collect::<Vec<_>>()).into_response())
}

#[utoipa::path(put, path = "/v1/accounts/{account}/products/{product}", request_body = TotalBody, responses((status = 200, body = PoolView)))]
pub async fn put_product(
    State(s): State<Shared>,
    Path((account, product)): Path<(String, String)>,
    headers: HeaderMap,
    Body(body): Body<TotalBody>,
) -> Result<Response, Problem> {
    let who = authorize(&s, &headers, &account).await?;
    let pool = store(&s, move |st| {
        st.set_total(&account, &who, &product, body.total)
    })
    .await?;
    Ok(Json(pool).into_response())
}

#[utoipa::path(get, path = "/v1/accounts/{account}/organizations", responses((status = 200, body = [Organization])))]
pub async fn list_organizations(
    State(s): State<Shared>,
    Path(account): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    authorize(&s, &headers, &account).await?;
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

#[utoipa::path(post, path = "/v1/accounts/{account}/organizations", request_body = NewOrganization, responses((status = 201, body = Organization)))]
pub async fn create_organization(
    State(s): State<Shared>,
    Path(account): Path<String>,
    headers: HeaderMap,
    Body(body): Body<NewOrganization>,
) -> Result<Response, Problem> {
    let who = authorize(&s, &headers, &account).await?;
    let id = body.id.clone();
    store(&s, move |st| {
        st.create_organization(&account, &who, &body.id, body.name.as_deref())
    })
    .await?;
    Ok((StatusCode::CREATED, Json(Organization { id })).into_response())
}

#[utoipa::path(get, path = "/v1/accounts/{account}/allocations", params(ProductFilter), responses((status = 200, body = [Allocation])))]
pub async fn list_allocations(
    State(s): State<Shared>,
    Path(account): Path<String>,
    Query(filter): Query<ProductFilter>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    authorize(&s, &headers, &account).await?;
    let mut allocations = store(&s, move |st| st.snapshot(&account))
        .await?
        .allocations;
    if let Some(p) = filter.product {
        allocations.retain(|a| a.product == p);
    }
    Ok(Json(allocations).into_response())
}

#[utoipa::path(get, path = "/v1/accounts/{account}/organizations/{organization}/allocations/{product}", responses((status = 200, body = Allocation)))]
pub async fn get_allocation(
    State(s): State<Shared>,
    Path((account, org, product)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    authorize(&s, &headers, &account).await?;
    let (o, p) = (org.clone(), product.clone());
    let seen = store(&s, move |st| st.observe(&account, &o, &p)).await?;
    if seen.pools.is_empty() {
        let r = Refusal::new(
            Reason::UnknownProduct,
            format!("the account has no {product} pool"),
        );
        return Err(Problem::refusal(&r));
    }
    if seen.organizations.is_empty() {
        let r = Refusal::new(
            Reason::UnknownOrganization,
            format!("organization {org} does not exist in the account"),
        );
        return Err(Problem::refusal(&r));
    }
    match seen.allocations.into_iter().next() {
        Some(a) => {
            let v = a.version;
            Ok(with_etag(a, Some(v)))
        }
        None => Err(Problem::new(
            StatusCode::NOT_FOUND,
            NOT_FOUND,
            format!("organization {org} has no {product} allocation"),
        )),
    }
}

#[utoipa::path(put, path = "/v1/accounts/{account}/organizations/{organization}/allocations/{product}", params(WriteParams), request_body = PutAllocation, responses((status = 200, body = Written)))]
pub async fn put_allocation(
    State(s): State<Shared>,
    Path((account, org, product)): Path<(String, String, String)>,
    Query(params): Query<WriteParams>,
    headers: HeaderMap,
    Body(body): Body<PutAllocation>,
) -> Result<Response, Problem> {
    let who = authorize(&s, &headers, &account).await?;
    let write = AllocationWrite {
        organization: org,
        product,
        target: Target::Count(body.dedicated),
        managed_by: body.managed_by,
        allow_user_displacement: body.allow_user_displacement,
        expected_version: expected_version(&headers).map_err(malformed)?,
        idempotency_key: idempotency_key(&headers).map_err(malformed)?,
    };
    written(&s, account, who, write, params.dry_run).await
}

#[utoipa::path(delete, path = "/v1/accounts/{account}/organizations/{organization}/allocations/{product}", params(DeleteParams), responses((status = 200, body = Written)))]
pub async fn delete_allocation(
    State(s): State<Shared>,
    Path((account, org, product)): Path<(String, String, String)>,
    Query(params): Query<DeleteParams>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let who = authorize(&s, &headers, &account).await?;
    let write = AllocationWrite {
        organization: org,
        product,
        target: Target::Remove,
        managed_by: params.managed_by,
        allow_user_displacement: params.allow_user_displacement,
        expected_version: expected_version(&headers).map_err(malformed)?,
        idempotency_key: idempotency_key(&headers).map_err(malformed)?,
    };
    written(&s, account, who, write, params.dry_run).await
}

async fn written(
    s: &Shared,
    account: String,
    who: Principal,
    write: AllocationWrite,
    dry_run: bool,
) -> Result<Response, Problem> {
    let w = store(s, move |st| st.write(&account, &who, &write, dry_run)).await?;
    let version = w.allocation.as_ref().map(|a| a.version);
    Ok(with_etag(w, version))
}

#[utoipa::path(post, path = "/v1/accounts/{account}/organizations/{organization}/allocations/{product}/release", request_body = Release, responses((status = 204)))]
pub async fn release_allocation(
    State(s): State<Shared>,
    Path((account, org, product)): Path<(String, String, String)>,
    headers: HeaderMap,
    Body(body): Body<Release>,
) -> Result<Response, Problem> {
    let who = authorize(&s, &headers, &account).await?;
    store(&s, move |st| {
        st.release(&account, &who, &org, &product, &body.managed_by)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(post, path = "/v1/accounts/{account}/organizations/{organization}/seats/{product}", request_body = Seats, responses((status = 204)))]
pub async fn seats(
    State(s): State<Shared>,
    Path((account, org, product)): Path<(String, String, String)>,
    headers: HeaderMap,
    Body(body): Body<Seats>,
) -> Result<Response, Problem> {
    let who = authorize(&s, &headers, &account).await?;
    let change = match (body.claim, body.release) {
        (Some(n), None) => SeatChange::Claim(n),
        (None, Some(n)) => SeatChange::Release(n),
        _ => {
            return Err(Problem::new(
                StatusCode::BAD_REQUEST,
                MALFORMED,
                "send exactly one of claim and release",
            ));
        }
    };
    store(&s, move |st| {
        st.seats(&account, &who, &org, &product, change)
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[utoipa::path(get, path = "/v1/accounts/{account}/audit", responses((status = 200, body = [AuditEntry])))]
pub async fn audit(
    State(s): State<Shared>,
    Path(account): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    authorize(&s, &headers, &account).await?;
    let entries = store(&s, move |st| st.audit(&account)).await?;
    Ok(Json(entries).into_response())
}
