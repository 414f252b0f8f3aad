//! The cleanup finalizer's JSON patches, written once for the operator
//! (which patches an existing object) and the mutating webhook (which
//! patches an object being created).

use json_patch::Patch;
use serde_json::json;

use crate::resource::FINALIZER;

/// Adds the finalizer to an object whose list is `finalizers`. With
/// `guarded`, an empty list is first tested to be absent, so the patch
/// fails rather than clobbers a list someone set meanwhile (the operator's
/// patch; at admission the object is the one being created).
pub fn add(finalizers: &[String], guarded: bool) -> Patch {
    let ops = match (finalizers.is_empty(), guarded) {
        (false, _) => json!([{"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER}]),
        (true, true) => json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}
        ]),
        (true, false) => {
            json!([{"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]}])
        }
    };
    serde_json::from_value(ops).expect("a well-formed JSON patch")
}

/// Removes the finalizer from an object whose list is `finalizers`, testing
/// that it is still where it was seen; `None` when it is not there.
pub fn remove(finalizers: &[String]) -> Option<Patch> {
    let i = finalizers.iter().position(|f| f == FINALIZER)?;
    let path = format!("/metadata/finalizers/{i}");
    let ops = json!([
        {"op": "test", "path": path, "value": FINALIZER},
        {"op": "remove", "path": path}
    ]);
    Some(serde_json::from_value(ops).expect("a well-formed JSON patch"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn patches_apply_to_the_lists_they_were_made_for() {
        let apply = |list: Value, patch: Patch| {
            let mut doc = json!({"metadata": {}});
            if !list.is_null() {
                doc["metadata"]["finalizers"] = list;
            }
            json_patch::patch(&mut doc, &patch).map(|()| doc["metadata"]["finalizers"].clone())
        };
        assert_eq!(
            apply(Value::Null, add(&[], false)).unwrap(),
            json!([FINALIZER])
        );
        // The guarded one tests for an absent list first (the API server
        // reads a test of null on a missing member as passing; the operator
        // tests on the real one show that), so a list set meanwhile fails it.
        let guarded = serde_json::to_value(add(&[], true)).unwrap();
        assert_eq!(
            guarded[0],
            json!({"op": "test", "path": "/metadata/finalizers", "value": null})
        );
        assert!(apply(json!(["other"]), add(&[], true)).is_err());
        let seen = vec!["other".to_string()];
        assert_eq!(
            apply(json!(["other"]), add(&seen, true)).unwrap(),
            json!(["other", FINALIZER])
        );
        let seen = vec!["other".to_string(), FINALIZER.to_string()];
        assert_eq!(
            apply(json!(["other", FINALIZER]), remove(&seen).unwrap()).unwrap(),
            json!(["other"])
        );
        assert!(remove(&["other".to_string()]).is_none());
    }
}
