//! The OpenAPI document of the HTTP API, generated from the handlers'
//! `#[utoipa::path]` annotations and the wire types' `ToSchema` derives, and
//! served at `GET /v1/openapi.json`.

use axum::Json;
use rollwave_api::{AgentMessage, ErrorBody, ServerMessage};
use utoipa::OpenApi;

use crate::{events, http, service_logs, session, tokens};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "rollwave",
        description = "The rollwave control plane. Every error is `ErrorBody` JSON with the status \
its code maps to (an unknown path: 404; a method a path does not serve: 400), except where a \
response says plain text. Times are Unix milliseconds, durations milliseconds.",
    ),
    paths(
        http::health,
        session::connect,
        http::list_nodes,
        service_logs::logs,
        http::list_releases,
        http::push_release,
        http::sign_release,
        http::get_release,
        http::delete_release,
        http::artifact,
        http::list_rollouts,
        http::start_rollout,
        http::get_rollout,
        http::get_rollout_summary,
        http::plan_rollout,
        http::rollout_command,
        http::list_services,
        http::finalize,
        http::list_audit,
        events::stream,
        tokens::create,
        tokens::list,
        tokens::revoke,
        tokens::enroll,
        document,
    ),
    // The session's messages: no path returns them, agents exchange them
    // over the WebSocket.
    components(schemas(ErrorBody, AgentMessage, ServerMessage)),
    tags(
        (name = "fleet", description = "Nodes as their agents report them"),
        (name = "releases", description = "Artifacts, content-addressed and immutable"),
        (name = "rollouts", description = "Start, plan, watch and steer rollouts"),
        (name = "services", description = "Active versions (the version gate)"),
        (name = "agents", description = "The agent session"),
        (name = "meta", description = "The control plane itself"),
        (name = "audit", description = "Who changed what, and when"),
        (name = "tokens", description = "API tokens and join tokens (admin)"),
    )
)]
struct ApiDoc;

/// The document, with this build's version, and each operation's access
/// from the route table: the roles that may call it, its bearer token
/// requirement and its 401 and 403 answers.
pub(crate) fn spec() -> utoipa::openapi::OpenApi {
    use utoipa::openapi::security::{
        HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
    };
    use utoipa::openapi::{RefOr, ResponseBuilder};

    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    let components = doc.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "token",
        SecurityScheme::Http(
            HttpBuilder::new()
                .scheme(HttpAuthScheme::Bearer)
                .bearer_format("rw_<id>_<secret>")
                .build(),
        ),
    );
    let error = |description: &str| {
        RefOr::T(
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    utoipa::openapi::ContentBuilder::new()
                        .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                            "ErrorBody",
                        ))))
                        .build(),
                )
                .build(),
        )
    };
    for ((method, path), access) in http::routes().access_table() {
        if access == rollwave_core::Access::Public {
            continue;
        }
        let Some(item) = doc.paths.paths.get_mut(path) else {
            continue;
        };
        let op = match method.as_str() {
            "GET" => item.get.as_mut(),
            "POST" => item.post.as_mut(),
            "DELETE" => item.delete.as_mut(),
            _ => None,
        };
        let Some(op) = op else { continue };
        op.security = Some(vec![SecurityRequirement::new(
            "token",
            Vec::<String>::new(),
        )]);
        let roles = format!("Needs a token of role {}.", access.roles());
        op.description = Some(match op.description.take() {
            Some(d) if !d.is_empty() => format!("{d}\n\n{roles}"),
            _ => roles,
        });
        let responses = &mut op.responses.responses;
        responses.entry("401".into()).or_insert_with(|| {
            error("No token, or one that is malformed, unknown, revoked or expired")
        });
        responses.entry("403".into()).or_insert_with(|| {
            error(&format!(
                "The token's role may not: this needs {}",
                access.roles()
            ))
        });
    }
    doc
}

/// This document: the API's paths and schemas, generated from the code
#[utoipa::path(
    get,
    path = "/v1/openapi.json",
    tag = "meta",
    responses(
        (status = 200, description = "An OpenAPI 3.1 document", body = serde_json::Value),
    )
)]
pub(crate) async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(spec())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use axum::http::Method;

    use super::*;

    /// Served by the router but not part of the API, so not documented:
    /// `(method, path)`, e.g. `("GET", "/ui/{file}")`.
    /// The dashboard's page and files, and Prometheus' scrape endpoint
    /// (its format is described by Prometheus, not by JSON schemas).
    const NOT_API: &[(&str, &str)] = &[("GET", "/"), ("GET", "/ui/{file}"), ("GET", "/metrics")];

    fn documented() -> BTreeSet<(String, String)> {
        let doc = serde_json::to_value(spec()).unwrap();
        let mut out = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
        out
    }

    #[test]
    fn every_route_is_documented() {
        let table: BTreeSet<(String, String)> = http::routes()
            .table()
            .into_iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        for (m, p) in NOT_API {
            let route = (m.to_string(), p.to_string());
            assert!(
                table.contains(&route),
                "NOT_API lists {m} {p}, which is not served"
            );
        }
        let served: BTreeSet<(String, String)> = table
            .into_iter()
            .filter(|(m, p)| !NOT_API.contains(&(m.as_str(), p.as_str())))
            .collect();
        let documented = documented();
        let missing: Vec<_> = served.difference(&documented).collect();
        assert!(
            missing.is_empty(),
            "served but not in the OpenAPI document: {missing:?}: annotate the handler with \
             #[utoipa::path(...)] and list it in ApiDoc's paths(...) (openapi.rs), or, if it is \
             not part of the API, add it to NOT_API"
        );
        let unserved: Vec<_> = documented.difference(&served).collect();
        assert!(
            unserved.is_empty(),
            "documented but not served: {unserved:?}: add it to http::routes() or remove it \
             from ApiDoc"
        );
    }

    #[test]
    fn routes_are_listed_once() {
        let table = http::routes().table();
        let unique: BTreeSet<_> = table.iter().collect();
        assert_eq!(unique.len(), table.len(), "{table:?}");
        assert!(table.contains(&(Method::GET, "/v1/openapi.json")));
    }

    #[test]
    fn the_document_names_rollwave_and_this_version() {
        let doc = serde_json::to_value(spec()).unwrap();
        assert_eq!(doc["info"]["title"], "rollwave");
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
        assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    }

    /// Every `$ref` points at a schema the document holds.
    #[test]
    fn every_reference_resolves() {
        let doc = serde_json::to_value(spec()).unwrap();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        let mut refs = Vec::new();
        collect_refs(&doc, &mut refs);
        assert!(!refs.is_empty());
        for r in refs {
            let name = r
                .strip_prefix("#/components/schemas/")
                .unwrap_or_else(|| panic!("unexpected reference {r}"));
            assert!(schemas.contains_key(name), "{r} is not in components");
        }
    }

    fn collect_refs(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v.as_str()) {
                        ("$ref", Some(r)) => out.push(r.to_string()),
                        _ => collect_refs(v, out),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|v| collect_refs(v, out)),
            _ => {}
        }
    }

    /// Error responses carry the JSON error body, except the ones the HTTP
    /// layer answers before a handler runs, which say so.
    #[test]
    fn error_responses_are_described() {
        let doc = serde_json::to_value(spec()).unwrap();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                for (status, resp) in op["responses"].as_object().unwrap() {
                    if !status.starts_with('4') && !status.starts_with('5') {
                        continue;
                    }
                    let content = resp["content"].as_object().unwrap_or_else(|| {
                        panic!("{method} {path} {status} has no body");
                    });
                    let json = &content
                        .get("application/json")
                        .map(|c| c["schema"]["$ref"].clone());
                    let plain = content.contains_key("text/plain");
                    assert!(
                        json.as_ref()
                            .is_some_and(|r| r == "#/components/schemas/ErrorBody")
                            || plain,
                        "{method} {path} {status}: {resp}"
                    );
                }
            }
        }
    }
}
