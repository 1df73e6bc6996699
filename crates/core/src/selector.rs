use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use utoipa::openapi::schema::{
    AdditionalProperties, ArrayBuilder, ArrayItems, ObjectBuilder, OneOfBuilder, Schema, Type,
};
use utoipa::openapi::RefOr;

use crate::SpecError;

/// A label selector, Kubernetes style: `k=v`, `k!=v`, `k in (a,b)`,
/// `k notin (a,b)`, `k` (has the label), `!k` (lacks it); terms joined by
/// commas must all match. The empty selector matches every node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Selector {
    terms: Vec<Term>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Term {
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl Selector {
    pub fn parse(field: &str, s: &str) -> Result<Selector, SpecError> {
        let mut terms = Vec::new();
        for raw in split_terms(s).map_err(|m| SpecError::new(field, m))? {
            terms.push(parse_term(raw).map_err(|m| SpecError::new(field, m))?);
        }
        Ok(Selector { terms })
    }

    pub fn is_empty(&self) -> bool {
        self.terms.is_empty()
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.terms.iter().all(|t| match t {
            Term::Eq(k, v) => labels.get(k) == Some(v),
            Term::NotEq(k, v) => labels.get(k) != Some(v),
            Term::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Term::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Term::Exists(k) => labels.contains_key(k),
            Term::NotExists(k) => !labels.contains_key(k),
        })
    }
}

fn split_terms(s: &str) -> Result<Vec<&str>, String> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0usize);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err(format!("{s:?} has unbalanced parentheses"));
        }
    }
    if depth != 0 {
        return Err(format!("{s:?} has unbalanced parentheses"));
    }
    out.push(&s[start..]);
    let out: Vec<&str> = out.into_iter().map(str::trim).collect();
    if out.len() == 1 && out[0].is_empty() {
        return Ok(Vec::new());
    }
    if let Some(_empty) = out.iter().find(|t| t.is_empty()) {
        return Err(format!("{s:?} has an empty term"));
    }
    Ok(out)
}

fn parse_term(t: &str) -> Result<Term, String> {
    if let Some((k, rest)) = split_word(t, " notin ") {
        return Ok(Term::NotIn(key(k)?, set(rest)?));
    }
    if let Some((k, rest)) = split_word(t, " in ") {
        return Ok(Term::In(key(k)?, set(rest)?));
    }
    if let Some((k, v)) = t.split_once("!=") {
        return Ok(Term::NotEq(key(k)?, value(v)?));
    }
    if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
        return Ok(Term::Eq(key(k)?, value(v)?));
    }
    if let Some(k) = t.strip_prefix('!') {
        return Ok(Term::NotExists(key(k)?));
    }
    Ok(Term::Exists(key(t)?))
}

fn split_word<'a>(t: &'a str, word: &str) -> Option<(&'a str, &'a str)> {
    t.find(word).map(|i| (&t[..i], &t[i + word.len()..]))
}

fn key(k: &str) -> Result<String, String> {
    let k = k.trim();
    let ok = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
    if ok {
        Ok(k.to_string())
    } else {
        Err(format!("{k:?} is not a valid label key"))
    }
}

fn value(v: &str) -> Result<String, String> {
    let v = v.trim();
    if v.is_empty() {
        return Err("a label value is missing".into());
    }
    if v.chars().any(|c| "(),=!".contains(c) || c.is_whitespace()) {
        return Err(format!("{v:?} is not a valid label value"));
    }
    Ok(v.to_string())
}

fn set(s: &str) -> Result<Vec<String>, String> {
    let inner = s
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| format!("{s:?} is not a set of values like (a,b)"))?;
    let vals: Vec<String> = inner.split(',').map(value).collect::<Result<_, _>>()?;
    if vals.iter().any(String::is_empty) {
        return Err(format!("{s:?} has an empty value"));
    }
    Ok(vals)
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let terms: Vec<String> = self
            .terms
            .iter()
            .map(|t| match t {
                Term::Eq(k, v) => format!("{k}={v}"),
                Term::NotEq(k, v) => format!("{k}!={v}"),
                Term::In(k, vs) => format!("{k} in ({})", vs.join(",")),
                Term::NotIn(k, vs) => format!("{k} notin ({})", vs.join(",")),
                Term::Exists(k) => k.clone(),
                Term::NotExists(k) => format!("!{k}"),
            })
            .collect();
        f.write_str(&terms.join(","))
    }
}

/// Written by hand: serde writes each term as `{"kind": [key, values]}`
/// (a tuple variant), which the derive would describe as an array of any
/// object. On the wire: `{"terms": [{"eq": ["rack", "r1"]}, {"in": ["zone",
/// ["a", "b"]]}, {"exists": "canary"}]}`.
impl utoipa::PartialSchema for Selector {
    fn schema() -> RefOr<Schema> {
        let string = || ObjectBuilder::new().schema_type(Type::String);
        let text = || Schema::from(string());
        let texts = || Schema::from(ArrayBuilder::new().items(string()));
        let pair = |second: Schema| {
            Schema::from(
                ArrayBuilder::new()
                    .prefix_items([text(), second])
                    .items(ArrayItems::False)
                    .min_items(Some(2)),
            )
        };
        let term = |kind: &str, description: &str, value: Schema| {
            ObjectBuilder::new()
                .property(kind, value)
                .required(kind)
                .additional_properties(Some(AdditionalProperties::FreeForm(false)))
                .description(Some(description))
        };
        let terms = OneOfBuilder::new()
            .item(term("eq", "`key=value`: [key, value]", pair(text())))
            .item(term("not_eq", "`key!=value`: [key, value]", pair(text())))
            .item(term("in", "`key in (a,b)`: [key, [values]]", pair(texts())))
            .item(term(
                "not_in",
                "`key notin (a,b)`: [key, [values]]",
                pair(texts()),
            ))
            .item(term("exists", "`key`: the node has the label", text()))
            .item(term(
                "not_exists",
                "`!key`: the node lacks the label",
                text(),
            ));
        ObjectBuilder::new()
            .description(Some(
                "A parsed label selector: every term must match (none: every node).",
            ))
            .property("terms", ArrayBuilder::new().items(terms))
            .required("terms")
            .into()
    }
}

impl utoipa::ToSchema for Selector {}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn matches_each_term_kind() {
        let l = labels(&[("rack", "r1"), ("tier", "web")]);
        let m = |s: &str| Selector::parse("selector", s).unwrap().matches(&l);
        assert!(m(""));
        assert!(m("rack=r1"));
        assert!(m("rack==r1,tier=web"));
        assert!(!m("rack=r2"));
        assert!(m("rack!=r2"));
        assert!(m("rack in (r1, r2)"));
        assert!(!m("rack notin (r1,r2)"));
        assert!(m("zone notin (a)"));
        assert!(m("tier"));
        assert!(m("!zone"));
        assert!(!m("!tier"));
        assert!(m("rack in (r1,r2),tier"));
    }

    #[test]
    fn round_trips_through_display() {
        let s = Selector::parse("s", "rack in (r1,r2),tier!=db,!gpu").unwrap();
        assert_eq!(s.to_string(), "rack in (r1,r2),tier!=db,!gpu");
        assert_eq!(Selector::parse("s", &s.to_string()).unwrap(), s);
    }

    /// The hand-written schema names every kind of term serde writes.
    #[test]
    fn schema_names_every_term_kind() {
        let s = Selector::parse("s", "a=1,b!=2,c in (x,y),d notin (z),e,!f").unwrap();
        let json = serde_json::to_value(&s).unwrap();
        let schema = serde_json::to_value(<Selector as utoipa::PartialSchema>::schema()).unwrap();
        let kinds: Vec<&str> = schema["properties"]["terms"]["items"]["oneOf"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["required"][0].as_str().unwrap())
            .collect();
        let written: Vec<&str> = json["terms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_object().unwrap().keys().next().unwrap().as_str())
            .collect();
        assert_eq!(written, kinds);
        assert_eq!(
            json["terms"][2],
            serde_json::json!({"in": ["c", ["x", "y"]]})
        );
        assert_eq!(json["terms"][4], serde_json::json!({"exists": "e"}));
    }

    #[test]
    fn rejects_malformed_selectors() {
        for bad in [
            "rack in (r1",
            "rack=",
            "=v",
            "a,,b",
            "rack in r1",
            "k=v w",
            "a)",
        ] {
            let err = Selector::parse("selector", bad).unwrap_err();
            assert_eq!(err.field, "selector", "{bad}");
        }
    }
}
