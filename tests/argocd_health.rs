//! The Argo CD health check (`examples/gitops/argocd-health.lua`) run in a
//! Lua 5.1 interpreter, as Argo CD runs it, against statuses the operator
//! writes.

use mlua::{Lua, LuaSerdeExt, Value as LuaValue};
use serde_json::{Value, json};

const SCRIPT: &str = include_str!("../examples/gitops/argocd-health.lua");

/// `(status, message)` the script gives `obj`.
fn health(obj: Value) -> (String, String) {
    let lua = Lua::new();
    let obj: LuaValue = lua.to_value(&obj).unwrap();
    lua.globals().set("obj", obj).unwrap();
    let hs: mlua::Table = lua.load(SCRIPT).eval().unwrap();
    (hs.get("status").unwrap(), hs.get("message").unwrap())
}

fn license(generation: i64, observed: i64, conditions: Value) -> Value {
    json!({
        "apiVersion": "licensor.dev/v1alpha1",
        "kind": "DedicatedLicense",
        "metadata": {"name": "qa", "generation": generation},
        "status": {"observedGeneration": observed, "conditions": conditions}
    })
}

fn condition(kind: &str, status: &str, reason: &str) -> Value {
    json!({"type": kind, "status": status, "reason": reason, "message": format!("{reason} message")})
}

#[test]
fn conditions_map_to_argo_cd_health() {
    let cases = [
        (
            json!({"metadata": {"name": "qa", "generation": 1}}),
            "Progressing",
        ),
        // New and not seen by the operator: the status the schema defaults.
        (license(1, 0, json!([])), "Progressing"),
        (
            license(2, 1, json!([condition("Ready", "True", "Reconciled")])),
            "Progressing",
        ),
        (
            license(2, 2, json!([condition("Ready", "True", "Reconciled")])),
            "Healthy",
        ),
        (
            license(
                2,
                2,
                json!([
                    condition("Ready", "False", "BelowInUse"),
                    condition("Stalled", "True", "BelowInUse")
                ]),
            ),
            "Degraded",
        ),
        (
            license(
                2,
                2,
                json!([
                    condition("Ready", "False", "BackendUnavailable"),
                    condition("Reconciling", "True", "BackendUnavailable")
                ]),
            ),
            "Progressing",
        ),
        (
            license(2, 2, json!([condition("Ready", "False", "Paused")])),
            "Suspended",
        ),
        (
            license(2, 2, json!([condition("Ready", "False", "OutOfSync")])),
            "Degraded",
        ),
    ];
    for (obj, want) in cases {
        let (status, message) = health(obj.clone());
        assert_eq!(status, want, "{obj}: {message}");
    }
    let (_, message) = health(license(
        1,
        1,
        json!([
            condition("Ready", "False", "BelowInUse"),
            condition("Stalled", "True", "BelowInUse")
        ]),
    ));
    assert_eq!(message, "BelowInUse: BelowInUse message");
}
