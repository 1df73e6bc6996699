//! The label selector parser: no panic, and what `Display` writes parses
//! back to the same selector (the CLI shows selectors that users paste back).
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use rollwave_core::Selector;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let selector = match Selector::parse("selector", text) {
        Ok(s) => s,
        Err(e) => {
            assert_eq!(e.field, "selector");
            return;
        }
    };
    let shown = selector.to_string();
    let again = Selector::parse("selector", &shown)
        .unwrap_or_else(|e| panic!("{text:?} shows as {shown:?}, which does not parse: {e}"));
    assert_eq!(again, selector, "{text:?} shows as {shown:?}");
    assert_eq!(again.to_string(), shown);
    assert_eq!(selector.is_empty(), shown.is_empty());

    // A rollout's selector is stored as JSON.
    let json = serde_json::to_string(&selector).expect("a selector serializes");
    let back: Selector = serde_json::from_str(&json).expect("a stored selector reads back");
    assert_eq!(back, selector);

    // The empty selector matches everything; any selector is a total function.
    let labels: BTreeMap<String, String> = [("rack", "r1"), ("zone", "a")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    if selector.is_empty() {
        assert!(selector.matches(&labels) && selector.matches(&BTreeMap::new()));
    } else {
        selector.matches(&labels);
    }
});
