//! The OpenAPI 3.1 document of the platform API, generated from the routes
//! and the wire types of [`crate::api`]. The routes declare their success
//! answers and parameters; [`Contract`] adds what every operation shares,
//! from one table, so the document cannot forget a route: the bearer
//! security scheme, every problem status the operation can answer (with the
//! problem schema and `Retry-After` where it applies), the conditional and
//! idempotency headers of allocation writes, and the links a stateful
//! client follows (a written allocation can be read back).

use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Operation, ParameterBuilder, ParameterIn};
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, Required};
use utoipa::{Modify, OpenApi};

use super::routes;
use crate::api::problem::MEDIA_TYPE;
use crate::api::{Problem, SeatClaim, SeatRelease};
use crate::domain::{IDENTIFIER_PATTERN, MAX_IDENTIFIER};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "licensor license platform API",
        description = "Dedicated licenses of a license account. Every error is an RFC 9457 problem document (application/problem+json) with a stable type per refusal reason. Writes need the AccountAdmin role; reads any token of the account."
    ),
    paths(
        routes::get_account,
        routes::list_products,
        routes::put_product,
        routes::list_organizations,
        routes::create_organization,
        routes::list_allocations,
        routes::get_allocation,
        routes::put_allocation,
        routes::delete_allocation,
        routes::release_allocation,
        routes::seats,
        routes::audit
    ),
    components(schemas(Problem, SeatClaim, SeatRelease)),
    modifiers(&Contract)
)]
struct ApiDoc;

/// The OpenAPI document, generated from the routes and types.
pub fn document() -> String {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_default();
    link_writes_to_reads(&mut doc);
    identifiers(&mut doc);
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// Organization ids and product names, wherever they are taken (a path
/// segment, a new organization's id), follow the one alphabet of
/// [`IDENTIFIER_PATTERN`]. Added as JSON because utoipa takes a pattern only
/// as a literal, and the rule must be written once.
fn identifiers(doc: &mut serde_json::Value) {
    let rule = |schema: &mut serde_json::Value| {
        schema["minLength"] = 1.into();
        schema["maxLength"] = MAX_IDENTIFIER.into();
        schema["pattern"] = IDENTIFIER_PATTERN.into();
    };
    if let Some(id) = doc.pointer_mut("/components/schemas/NewOrganization/properties/id") {
        rule(id);
    }
    let Some(paths) = doc["paths"].as_object_mut() else {
        return;
    };
    for op in paths
        .values_mut()
        .filter_map(|i| i.as_object_mut())
        .flat_map(|i| i.values_mut())
    {
        for p in op["parameters"].as_array_mut().into_iter().flatten() {
            if p["in"] == "path" && (p["name"] == "organization" || p["name"] == "product") {
                rule(&mut p["schema"]);
            }
        }
    }
}

/// After a write, the allocation can be read back: a link from the 200 of
/// PUT and DELETE to GET of the same allocation, for stateful clients.
/// Written as JSON because utoipa 5.5 spells a link's `operationId` in
/// snake case, which OpenAPI tools do not read.
fn link_writes_to_reads(doc: &mut serde_json::Value) {
    let path = "/v1/accounts/{account}/organizations/{organization}/allocations/{product}";
    let link = serde_json::json!({
        "GetAllocation": {
            "operationId": "get_allocation",
            "parameters": {
                "account": "$request.path.account",
                "organization": "$request.path.organization",
                "product": "$request.path.product"
            },
            "description": "The allocation as it is now"
        }
    });
    for method in ["put", "delete"] {
        if let Some(ok) = doc
            .pointer_mut(&format!(
                "/paths/{}/{method}/responses/200",
                path.replace('~', "~0").replace('/', "~1")
            ))
            .and_then(serde_json::Value::as_object_mut)
        {
            ok.insert("links".into(), link.clone());
        }
    }
}

/// What every operation shares; see the module contract.
struct Contract;

/// What kind of operation, for the problems it can answer.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Read,
    /// A write with a JSON body.
    WriteWithBody,
    /// A write without a body (DELETE).
    Write,
}

const BEARER: &str = "bearer";

impl Modify for Contract {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API token of the account (`licensor token create`); the scheme name is case-insensitive",
                    ))
                    .build(),
            ),
        );
        doc.security = Some(vec![SecurityRequirement::new::<_, _, String>(BEARER, [])]);
        for (path, item) in doc.paths.paths.iter_mut() {
            let allocation = path.ends_with("/allocations/{product}");
            if let Some(op) = item.get.as_mut() {
                problems(op, Kind::Read);
            }
            if let Some(op) = item.put.as_mut() {
                problems(op, Kind::WriteWithBody);
            }
            if let Some(op) = item.post.as_mut() {
                problems(op, Kind::WriteWithBody);
            }
            if let Some(op) = item.delete.as_mut() {
                problems(op, Kind::Write);
            }
            if allocation {
                for op in [item.put.as_mut(), item.delete.as_mut()]
                    .into_iter()
                    .flatten()
                {
                    conditional_write(op);
                }
            }
        }
    }
}

/// The problems an operation of `kind` can answer, by status.
fn problems(op: &mut Operation, kind: Kind) {
    let mut add = |status: u16, when: &str| {
        op.responses
            .responses
            .entry(status.to_string())
            .or_insert_with(|| problem(status, when).into());
    };
    add(
        400,
        "The request cannot be read: path, query, headers or body (malformed-request)",
    );
    add(401, "No valid bearer token for the account (unauthorized)");
    add(
        404,
        "No such organization, product or allocation (unknown-organization, unknown-product, not-found)",
    );
    add(
        429,
        "Too many requests; retry after Retry-After seconds (rate-limited)",
    );
    add(
        503,
        "The store is unavailable or the request took too long; retry after Retry-After seconds, with the same Idempotency-Key (backend-unavailable, timeout)",
    );
    if kind != Kind::Read {
        add(403, "The token is not the Account Admin's (forbidden)");
        add(
            409,
            "Refused by the rules: insufficient-pool, below-in-use, would-displace-users, conflict",
        );
        add(
            422,
            "A count out of range (invalid), or an Idempotency-Key already used for another request (idempotency-key-reused)",
        );
    }
    if kind == Kind::WriteWithBody {
        add(413, "The body is over the size limit (body-too-large)");
        add(
            415,
            "The body is not application/json (unsupported-media-type)",
        );
    }
}

fn problem(status: u16, description: &str) -> Response {
    let mut response = ResponseBuilder::new().description(description).content(
        MEDIA_TYPE,
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("Problem")))
            .build(),
    );
    if status == 429 || status == 503 {
        response = response.header(
            "Retry-After",
            HeaderBuilder::new()
                .schema(
                    ObjectBuilder::new()
                        .schema_type(Type::Integer)
                        .minimum(Some(0)),
                )
                .description(Some("Seconds to wait before retrying"))
                .build(),
        );
    }
    if status == 401 {
        response = response.header(
            "WWW-Authenticate",
            HeaderBuilder::new()
                .schema(ObjectBuilder::new().schema_type(Type::String))
                .description(Some("Bearer"))
                .build(),
        );
    }
    response.build()
}

/// `If-Match`, `If-None-Match: *` and `Idempotency-Key`, and the 412 a
/// stale `If-Match` answers.
fn conditional_write(op: &mut Operation) {
    let header = |name: &str, pattern: &str, example: &str, description: &str| {
        ParameterBuilder::new()
            .name(name)
            .parameter_in(ParameterIn::Header)
            .required(Required::False)
            .description(Some(description))
            .schema(Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(pattern)),
            ))
            .example(Some(example.into()))
            .build()
    };
    let params = op.parameters.get_or_insert_with(Vec::new);
    params.push(header(
        "If-Match",
        r#"^("[1-9][0-9]{0,17}")?$"#,
        r#""7""#,
        "Write only if the allocation is at this version (its ETag, quoted); a stale one answers 412, and so does an empty one, which names no version (RFC 9110 §13.1.1)",
    ));
    params.push(header(
        "If-None-Match",
        r"^\*?$",
        "*",
        "`*`: write only if the allocation does not exist yet; empty: no condition",
    ));
    params.push(header(
        "Idempotency-Key",
        r"^[\x21-\x7e]{1,255}$",
        "raise-qa-team-to-10",
        "Names one intent: the same key and request replays the first answer; the same key with another request is 422",
    ));
    op.responses
        .responses
        .entry("412".into())
        .or_insert_with(|| {
            problem(
                412,
                "If-Match named another version; read the allocation and plan again (stale)",
            )
            .into()
        });
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    /// Every operation declares its path parameters, the bearer scheme
    /// applies, and every problem status is documented as problem+json.
    #[test]
    fn every_operation_documents_its_parameters_and_problems() {
        let doc: Value = serde_json::from_str(&super::document()).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        assert_eq!(
            doc["components"]["securitySchemes"]["bearer"]["scheme"],
            "bearer"
        );
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let declared: Vec<&str> = op["parameters"]
                    .as_array()
                    .map(|ps| {
                        ps.iter()
                            .filter(|p| p["in"] == "path")
                            .map(|p| p["name"].as_str().unwrap())
                            .collect()
                    })
                    .unwrap_or_default();
                for segment in path.split('/').filter(|s| s.starts_with('{')) {
                    let name = segment.trim_matches(|c| c == '{' || c == '}');
                    assert!(
                        declared.contains(&name),
                        "{method} {path}: {name} undeclared"
                    );
                }
                for status in ["400", "401", "404", "429", "503"] {
                    let r = &op["responses"][status];
                    assert!(
                        r["content"]["application/problem+json"]["schema"]["$ref"]
                            == "#/components/schemas/Problem",
                        "{method} {path} {status}: {r}"
                    );
                }
                for p in op["parameters"].as_array().into_iter().flatten() {
                    if p["in"] == "query" {
                        assert_ne!(p["required"], true, "{method} {path}: {p}");
                    }
                }
            }
        }
        let put = &doc["paths"]["/v1/accounts/{account}/organizations/{organization}/allocations/{product}"]
            ["put"];
        let headers: Vec<&str> = put["parameters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["in"] == "header")
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(headers, ["If-Match", "If-None-Match", "Idempotency-Key"]);
        assert!(put["responses"]["412"].is_object());
        assert!(put["responses"]["200"]["headers"]["ETag"].is_object());
        assert_eq!(
            put["responses"]["200"]["links"]["GetAllocation"]["operationId"],
            "get_allocation"
        );
        assert_eq!(
            put["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            "#/components/schemas/PutAllocation"
        );
        let id = &doc["components"]["schemas"]["NewOrganization"]["properties"]["id"];
        assert_eq!(id["pattern"], crate::domain::IDENTIFIER_PATTERN);
        assert_eq!(
            put["parameters"][1]["schema"]["pattern"],
            crate::domain::IDENTIFIER_PATTERN
        );
        let seats = &doc["components"]["schemas"]["Seats"];
        assert_eq!(seats["oneOf"].as_array().map(Vec::len), Some(2), "{seats}");
    }
}
