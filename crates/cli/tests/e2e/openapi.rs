//! The OpenAPI document against what the control plane really sends: every
//! body a real fleet answers must match the schema the document gives for
//! it, with no field the document does not name.

use rollwave_api::{RolloutFile, StartRollout};
use rollwave_core::StrategyFile;
use serde_json::{json, Value};

use crate::harness::*;

/// Checks `value` against `schema` (JSON Schema as OpenAPI 3.1 uses it:
/// `$ref`, `type`, `enum`, `properties`, `required`, `additionalProperties`,
/// `items`, `prefixItems`, `oneOf`, `allOf`, `minimum`). Stricter than the
/// standard on one point: an object schema with `properties` and no
/// `additionalProperties` allows no other field, so that every field sent is
/// documented.
fn check(doc: &Value, schema: &Value, value: &Value, at: &str) -> Result<(), String> {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/components/schemas/");
        let target = &doc["components"]["schemas"][name];
        if target.is_null() {
            return Err(format!("{at}: unresolved {r}"));
        }
        return check(doc, target, value, at);
    }
    if let Some(all) = schema.get("allOf").and_then(Value::as_array) {
        // Each part names some of the fields: check each against the value
        // without the others' fields counting as undeclared.
        let names = declared(doc, schema);
        for part in all {
            check(doc, part, &only(value, &names, doc, part), at)?;
        }
        return Ok(());
    }
    if let Some(one) = schema.get("oneOf").and_then(Value::as_array) {
        let errors: Vec<String> = one
            .iter()
            .filter_map(|s| check(doc, s, value, at).err())
            .collect();
        return match one.len() - errors.len() {
            1 => Ok(()),
            0 => Err(format!("{at}: matches no oneOf: {errors:?}")),
            n => Err(format!("{at}: matches {n} of oneOf: {value}")),
        };
    }
    if let Some(types) = schema.get("type") {
        let types: Vec<&str> = match types {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => return Err(format!("{at}: bad type {types}")),
        };
        let ok = types.iter().any(|t| match *t {
            "null" => value.is_null(),
            "boolean" => value.is_boolean(),
            "integer" => value.is_i64() || value.is_u64(),
            "number" => value.is_number(),
            "string" => value.is_string(),
            "array" => value.is_array(),
            "object" => value.is_object(),
            _ => false,
        });
        if !ok {
            return Err(format!("{at}: {value} is not {types:?}"));
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
        if !allowed.contains(value) {
            return Err(format!("{at}: {value} is not one of {allowed:?}"));
        }
    }
    if let (Some(min), Some(n)) = (
        schema.get("minimum").and_then(Value::as_f64),
        value.as_f64(),
    ) {
        if n < min {
            return Err(format!("{at}: {n} is below {min}"));
        }
    }
    if let Value::Object(map) = value {
        let props = schema.get("properties").and_then(Value::as_object);
        for name in schema
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            if !map.contains_key(name) {
                return Err(format!("{at}: required field {name:?} is missing"));
            }
        }
        let extra = schema.get("additionalProperties");
        for (k, v) in map {
            let here = format!("{at}/{k}");
            match (props.and_then(|p| p.get(k)), extra) {
                (Some(s), _) => check(doc, s, v, &here)?,
                (None, Some(Value::Bool(false))) => return Err(format!("{here}: not allowed")),
                (None, Some(Value::Bool(true))) => {}
                (None, Some(s)) => check(doc, s, v, &here)?,
                (None, None) if props.is_some() => {
                    return Err(format!("{here}: not in the schema"))
                }
                (None, None) => {}
            }
        }
    }
    if let Value::Array(items) = value {
        let prefix = schema.get("prefixItems").and_then(Value::as_array);
        for (i, v) in items.iter().enumerate() {
            let here = format!("{at}/{i}");
            match (prefix.and_then(|p| p.get(i)), schema.get("items")) {
                (Some(s), _) => check(doc, s, v, &here)?,
                (None, Some(Value::Bool(false))) => return Err(format!("{here}: not allowed")),
                (None, Some(s)) => check(doc, s, v, &here)?,
                (None, None) => {}
            }
        }
    }
    Ok(())
}

/// The field names an object schema declares (through `$ref`, `allOf`).
fn declared(doc: &Value, schema: &Value) -> Vec<String> {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let name = r.trim_start_matches("#/components/schemas/");
        return declared(doc, &doc["components"]["schemas"][name]);
    }
    let mut out: Vec<String> = schema
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default();
    for part in schema
        .get("allOf")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        out.extend(declared(doc, part));
    }
    out
}

/// `value` without the fields `all` declares that `part` does not.
fn only(value: &Value, all: &[String], doc: &Value, part: &Value) -> Value {
    let Value::Object(map) = value else {
        return value.clone();
    };
    let mine = declared(doc, part);
    Value::Object(
        map.iter()
            .filter(|(k, _)| mine.contains(k) || !all.contains(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    )
}

/// The schema of a response (or, with `status` None, of the request body).
fn schema_of<'a>(doc: &'a Value, method: &str, path: &str, status: Option<u16>) -> &'a Value {
    let op = &doc["paths"][path][method];
    assert!(op.is_object(), "{method} {path} is not documented");
    let body = match status {
        Some(s) => &op["responses"][s.to_string()],
        None => &op["requestBody"],
    };
    let schema = &body["content"]["application/json"]["schema"];
    assert!(
        schema.is_object(),
        "{method} {path} {status:?} has no JSON schema"
    );
    schema
}

#[tokio::test(flavor = "multi_thread")]
async fn every_answer_matches_the_openapi_document() {
    let fleet = installed_fleet(2).await;
    push(&fleet, "2.0.0", true).await;
    let r = start(&fleet, "2.0.0", |s| s.auto_finalize = Some(true))
        .await
        .unwrap();
    let done = wait_done(&fleet, r.id).await;
    assert!(done.fully_upgraded(), "{done:#?}");
    let url = fleet.url();
    let http = fleet.http();

    let doc: Value = http
        .get(format!("{url}/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["info"]["title"], "rollwave");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));

    let id = r.id.to_string();
    let gets: Vec<(String, &str, u16)> = vec![
        ("/v1/health".into(), "/v1/health", 200),
        ("/v1/nodes".into(), "/v1/nodes", 200),
        ("/v1/releases".into(), "/v1/releases", 200),
        (
            "/v1/releases/api/2.0.0".into(),
            "/v1/releases/{service}/{version}",
            200,
        ),
        (
            "/v1/releases/api/9.9.9".into(),
            "/v1/releases/{service}/{version}",
            404,
        ),
        ("/v1/rollouts".into(), "/v1/rollouts", 200),
        (format!("/v1/rollouts/{id}"), "/v1/rollouts/{id}", 200),
        ("/v1/rollouts/abc".into(), "/v1/rollouts/{id}", 400),
        ("/v1/services".into(), "/v1/services", 200),
    ];
    for (real, documented, status) in gets {
        let resp = http.get(format!("{url}{real}")).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "GET {real}");
        let body: Value = resp.json().await.unwrap();
        let schema = schema_of(&doc, "get", documented, Some(status));
        if let Err(e) = check(&doc, schema, &body, "") {
            panic!("GET {real} ({status}) does not match the document: {e}\n{body:#}");
        }
    }

    // Bodies sent, and what they are answered with.
    let spec = RolloutFile {
        service: Some(SERVICE.into()),
        version: Some("1.0.0".into()),
        downgrade: Some(true),
        strategy: StrategyFile {
            batch: Some("50%".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let same = RolloutFile {
        version: Some("2.0.0".into()),
        downgrade: None,
        ..spec.clone()
    };
    let plan = serde_json::to_value(StartRollout {
        spec,
        plan_id: None,
    })
    .unwrap();
    let plan_same = serde_json::to_value(StartRollout {
        spec: same,
        plan_id: None,
    })
    .unwrap();
    let posts: Vec<(String, &str, Value, u16)> = vec![
        // The version every node runs: a plan that switches nothing.
        ("/v1/plan".into(), "/v1/plan", plan_same, 200),
        // Below the active version, finalized by the rollout: a plan is
        // refused as a start is.
        ("/v1/plan".into(), "/v1/plan", plan.clone(), 409),
        ("/v1/rollouts".into(), "/v1/rollouts", plan, 409),
        (
            "/v1/services/api/finalize".into(),
            "/v1/services/{service}/finalize",
            json!({}),
            200,
        ),
        (
            format!("/v1/rollouts/{id}/pause"),
            "/v1/rollouts/{id}/{command}",
            json!({}),
            409,
        ),
    ];
    for (real, documented, body, status) in posts {
        if let Some(request) = doc["paths"][documented]["post"].get("requestBody") {
            let schema = &request["content"]["application/json"]["schema"];
            if let Err(e) = check(&doc, schema, &body, "") {
                panic!("the body sent to {real} does not match the document: {e}");
            }
        }
        let resp = http
            .post(format!("{url}{real}"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "POST {real}");
        let answer: Value = resp.json().await.unwrap();
        let schema = schema_of(&doc, "post", documented, Some(status));
        if let Err(e) = check(&doc, schema, &answer, "") {
            panic!("POST {real} ({status}) does not match the document: {e}\n{answer:#}");
        }
    }
    // Deletes: a release the nodes would go back to, one unknown, one
    // nothing uses.
    push(&fleet, "3.0.0", true).await;
    let deletes = [
        ("/v1/releases/api/1.0.0", 409),
        ("/v1/releases/api/9.9.9", 404),
        ("/v1/releases/api/3.0.0", 200),
    ];
    for (real, status) in deletes {
        let resp = http.delete(format!("{url}{real}")).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "DELETE {real}");
        let answer: Value = resp.json().await.unwrap();
        let schema = schema_of(
            &doc,
            "delete",
            "/v1/releases/{service}/{version}",
            Some(status),
        );
        if let Err(e) = check(&doc, schema, &answer, "") {
            panic!("DELETE {real} ({status}) does not match the document: {e}\n{answer:#}");
        }
    }
    // The validator itself refuses what it should.
    let rollout = schema_of(&doc, "get", "/v1/rollouts/{id}", Some(200));
    assert!(check(&doc, rollout, &json!({"rollout": {"id": 1}}), "").is_err());
    assert!(check(&doc, rollout, &json!({"nope": 1}), "").is_err());
}
